"""Safety service: ratings and allow/block decisions from an NSFW head, tag rules and the character codex.

app.py wires it; servicer.py is the gRPC transport; service.py (`SafetyService`) the logic: budgets, codex reload,
verdicts via policy.py, tag_rules.py and codex.py; model.py (`SafetyModel`) the NSFW head over the shared CLIP
tower; store.py the codex tables (`CodexStore`); client.py (`SafetyClient`) what others call; cli.py `ponyctl codex`.
"""
