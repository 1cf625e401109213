"""The captioner service (`pony.v1.Captioner`): VLM captions of several kinds, guided by tags and characters."""
