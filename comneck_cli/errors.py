"""The one exception root of comneck, and its typed subclasses (stdlib only: the container imports it).

Every error comneck raises on purpose is a :class:`ComneckError` whose message is one sentence a user can act on:
what went wrong, which file, what to do. The library speaks in its own words: a message names a parameter in
backticks (```weights```) and lists it in ``params``; the command line shows its flag instead (``--weights``)
through :meth:`ComneckError.render`, so neither layer needs to know the other's spelling.
"""

from __future__ import annotations

from typing import Callable, Sequence


class ComneckError(Exception):
    """A failure the user can act on; ``params`` are the parameters the message names in backticks."""

    def __init__(self, message: str = "", *, params: Sequence[str] = ()) -> None:
        super().__init__(message)
        self.params = tuple(params)

    def render(self, spell: Callable[[str], str]) -> str:
        """The message with each named parameter spelled by ``spell`` (the CLI passes its flag names)."""
        text = str(self)
        for name in self.params:
            text = text.replace(f"`{name}`", spell(name))
        return text


class UsageError(ComneckError):
    """A parameter's value is out of range or contradicts another one (the CLI exits 2, as for its own usage)."""


class FormatError(ComneckError, ValueError):
    """A ``.cnk`` file or record is unusable (a ``ValueError`` too: every cause is bad input data)."""


class RegistryError(ComneckError):
    """A registry problem: a missing name, a file that does not match its sha256, an unwritable registry."""


class ModelFileError(ComneckError):
    """A model file is missing, unreadable, or not the kind of model it is used as (wrong layout or shapes)."""


class MismatchError(ComneckError):
    """Two things that must belong together do not: a record and the codec weights, a neck and its codec."""


class InputError(ComneckError):
    """An input (image, video, list of paths) cannot be read or exceeds a limit."""
