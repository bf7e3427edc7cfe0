"""Errors shared by the commands (host-free: importing this pulls in nothing else)."""


class UsageError(ValueError):
    """A bad command line, recipe or input: reported in one line, without a traceback (exit 2)."""
