"""The one user-facing error type of the comneck library."""


class ComneckError(Exception):
    """A failure the user can act on: the message is one sentence saying what, which file, and what to do."""
