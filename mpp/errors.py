"""Errors a user can fix: reported as one line with exit code 2, before any heavy work."""


class UsageError(ValueError):
    """A bad flag, value, path or dataset, named in the message together with what is allowed."""
