"""The command line's error type: a problem with what the user gave us, reported in one line.

Every check in the command line raises :class:`UserInputError` (a ``ValueError``) with a message that
names the file / column / option, the value found and what was expected.  ``softxent`` prints it as
``softxent: error: <message>`` on stderr and exits with status 2; the traceback is shown only with
``--debug``.
"""

from __future__ import annotations

__all__ = ["UserInputError", "DataError", "ModelFileError"]


class UserInputError(ValueError):
    """Bad input from the user (a file, a column, an option): exit status 2, one line, no traceback."""


class DataError(UserInputError):
    """A data file that cannot be used as given (missing, unknown format, bad columns, NaN, ...)."""


class ModelFileError(UserInputError):
    """A model folder that cannot be loaded (missing, corrupt, truncated, newer format, wrong shapes)."""
