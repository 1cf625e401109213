"""`ponyctl`: the command line of the platform."""
