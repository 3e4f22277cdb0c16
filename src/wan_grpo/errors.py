"""Errors a user can fix: the CLI prints them as one line naming the fix, with no traceback."""


class UserError(Exception):
    """Bad input (a missing file, an unknown layout, a bad flag). The message names the fix."""
