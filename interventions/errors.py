"""Errors a user can fix (bad flags, paths, data), reported as one line without a traceback."""


class UserError(Exception):
    """A problem with the user's input: ``run.py`` prints ``error: <message>`` and exits 2."""
