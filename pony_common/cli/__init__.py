"""`ponyctl`: the entry point and the shared `worker` verb; every other verb comes from a package's `cli.py`
through the `pony.cli` entry points, so this package names no service."""
