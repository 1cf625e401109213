"""Tests of the style tagger service."""
