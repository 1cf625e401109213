"""Safety service: ratings and allow/block decisions from an NSFW head, tag rules and the character codex."""
