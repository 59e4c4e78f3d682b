"""The container's error type: a :class:`comneck_cli.errors.FormatError` (stdlib only, like the container)."""

from __future__ import annotations

from comneck_cli.errors import FormatError


class CnkError(FormatError):
    """A ``.cnk`` file or record is unusable, in one sentence a user can act on.

    It is a ``ValueError`` too (through :class:`FormatError`) because every cause is bad input data (or a bad value
    given to ``Record``), so callers that already catch ``ValueError`` keep working; the CLI prints the message
    alone, without a traceback.
    """
