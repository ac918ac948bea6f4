"""Errors a user can act on.

A `QCompilerError` carries one line that names the problem and the fix; the CLI prints it and
exits with status 2, never a traceback.
"""


class QCompilerError(Exception):
    """Bad input or an impossible option combination, with the fix in the message."""


class PassError(QCompilerError):
    """A pass failed; the message says which pass and which passes ran before it."""
