"""CLI errors: a UsageError ends the command with exit code 2 and one line of reason."""


class UsageError(Exception):
    """Bad arguments or input named on the command line."""
