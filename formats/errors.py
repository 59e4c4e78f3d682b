"""The one user-facing error type of the ``formats`` package."""

from __future__ import annotations


class CnkError(ValueError):
    """A ``.cnk`` file or record is unusable, in one sentence a user can act on.

    It subclasses ``ValueError`` because every cause is bad input data (or a bad value given to
    ``Record``), so callers that already catch ``ValueError`` keep working; the CLI prints the
    message alone, without a traceback.
    """
