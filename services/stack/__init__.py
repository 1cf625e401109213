"""The whole platform on one machine: the one table naming every service, the in-process stack, the tiny models,
the demo and the platform-wide `ponyctl` verbs. The only package that may import every service."""
