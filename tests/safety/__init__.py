"""Tests of the safety service."""
