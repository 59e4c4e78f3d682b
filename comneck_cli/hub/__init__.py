"""One rule for "a file or a registry name", for every kind of model file comneck loads (standard library only).

Codec weights, necks, CLIP weights, post-processing U-Nets, decoder adapters and pre-editing modules are all named
the same way, by :func:`resolve`:

1. a value that is an existing file is that file (a path always wins over a registry name);
2. else a name registered in :mod:`comneck_cli.weights` is its file, sha256-checked before anything reads it, and
   refused when it was registered as another kind of model;
3. else it is an error: "does not exist" for a value that looks like a path (a folder separator or a model-file
   suffix), "neither a file nor a registered name" for anything else.

Given nothing, a caller's default registry name applies (``{codec}-q{quality}-neck``...); :func:`find` is the
lookup for defaults that fall back on something else (CompressAI's zoo, open_clip's hub), and :func:`find_digest`
the one for a file named by its content (the weights digest a ``.cnk`` record carries).
"""

from __future__ import annotations

import os
from pathlib import Path

from comneck_cli import weights as registry
from comneck_cli.errors import MismatchError, ModelFileError, RegistryError

__all__ = ["KINDS", "find", "find_digest", "portable", "resolve"]

# Every registry kind and the words errors name its files by (``comneck weights import --kind`` offers these).
KINDS: dict[str, str] = {
    "codec": "codec weights",
    "neck": "neck",
    "clip": "CLIP weights",
    "postprocess": "post-processing U-Net",
    "adapter": "decoder adapter",
    "preedit": "pre-editing module",
}
# A value ending so, or holding a folder separator, is meant as a file: when missing it is said so, not looked up.
MODEL_SUFFIXES = (".safetensors", ".pt", ".pth", ".tar", ".bin", ".ckpt")


def _looks_like_a_path(value: str) -> bool:
    return "/" in value or os.sep in value or value.lower().endswith(MODEL_SUFFIXES)


def find(name: str, kind: str) -> Path | None:
    """The verified file registered as ``name`` (a :class:`~comneck_cli.weights.WeightsError` when it is missing or
    changed, a :class:`MismatchError` when it is another kind of model), or None when nothing is registered so."""
    entry = registry.lookup(name)
    if entry is None:
        return None
    if entry.kind != kind:
        raise MismatchError(f"{name!r} is registered as {entry.kind} weights, not as {KINDS[kind]}; pass a "
                            f"{KINDS[kind]} file or name (`comneck weights list` shows each name's kind)")
    return registry.resolve(name)


def find_digest(digest: str, kind: str) -> Path | None:
    """The verified file of a registered ``kind`` whose sha256 begins with ``digest`` (hex: the weights digest a
    record carries, its first 4 bytes), or None when none does; of several names for the same bytes, the first in sorted order."""
    names = sorted(e.name for e in registry.entries().values() if e.kind == kind and e.sha256.startswith(digest))
    return registry.resolve(names[0]) if names else None


def resolve(value: str | Path | None, kind: str, *, default: str | None = None, param: str | None = None,
            hint: str = "") -> Path:
    """The local, verified file of ``value`` by the module's rule (an existing file, else a registered name of this
    ``kind``); ``value`` None means the registry name ``default``.

    ``param`` is the parameter ``value`` came in (default: ``kind``), named in errors so the CLI can show its flag;
    ``hint`` says how else to get such a file when nothing is registered as ``default``.
    """
    param = param or kind
    what = KINDS[kind]
    if value is None:
        if default is None:
            raise RegistryError(f"no {what} given; pass `{param}` FILE or NAME", params=(param,))
        found = find(default, kind)
        if found is None:
            raise RegistryError(f"no {what} {default!r} is registered; pass `{param}` FILE or NAME"
                                + (f", or {hint}" if hint else ""), params=(param,))
        return found
    path = Path(value)
    if path.is_file():
        return path
    found = find(str(value), kind)
    if found is not None:
        return found
    if _looks_like_a_path(str(value)):
        raise ModelFileError(f"{what} file {value} does not exist; pass an existing file or a registered name",
                             params=(param,))
    raise RegistryError(f"{what} {str(value)!r} is neither a file nor a registered name; pass an existing file or one "
                        f"of the names `comneck weights list` shows", params=(param,))


def portable(value: str | Path | None) -> str | None:
    """``value`` as another process in another folder resolves it the same way (batch workers): an existing path
    made absolute, anything else (a registry name) unchanged; None stays None."""
    if value is None:
        return None
    return os.path.abspath(value) if Path(value).exists() else str(value)
