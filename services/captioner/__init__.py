"""The captioner service (`pony.v1.Captioner`): VLM captions of several kinds, guided by tags and characters.

`app.py` wires it; `servicer.py` is the gRPC transport; `service.py` (`CaptionerService`) holds the logic (kinds,
prompts, clean-up, per-item errors); `model.py` (`CaptionerModel`) loads the VLM through the Auto classes and
generates, and builds the tiny LLaVA; `client.py` (`CaptionerClient`) is how other deployables call it."""
