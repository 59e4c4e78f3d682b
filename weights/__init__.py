"""The registry of named model files: manifest, ``resolve(name)`` -> verified local file.

Two places hold entries, searched in this order:

1. the user registry, ``$COMNECK_HOME/weights`` (default ``~/.cache/comneck/weights``), filled by
   ``comneck weights import`` and by downloads from the CompressAI zoo;
2. the files shipped inside this package (``weights/manifest.json`` beside this module).

Every entry records the file's sha256; ``resolve`` checks it before anything loads the file, so a
swapped or damaged file is refused instead of being unpickled or decoded into garbage. Standard
library only: listing and resolving never import torch.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from comneck_cli.errors import RegistryError
from comneck_cli.io.outputs import umask

__all__ = [
    "Entry",
    "WeightsError",
    "entries",
    "file_sha256",
    "import_file",
    "lookup",
    "resolve",
    "retired_codec",
    "Shipped",
    "user_dir",
]

_SHIPPED_DIR = Path(__file__).resolve().parent
_MANIFEST = "manifest.json"
_SHIPPED = "shipped.json"  # every default codec file that has shipped, the retired ones included (issue #34)
_ENTRY_FIELDS = {"file", "sha256", "kind", "info"}
# A name becomes a file name (NAME + suffix): letters, digits, '-', '_' and '.', short enough for any file system.
_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}")


class WeightsError(RegistryError):
    """A registry problem a user can act on (missing name, bad digest, unreadable file)."""


@dataclass(frozen=True)
class Entry:
    """One named model file.

    ``kind`` is what loads it (``codec``, ``neck``, ``clip``, ``postprocess``, ``preedit``...); ``info`` holds
    what it was made for (codec name, quality, training data...), shown by ``comneck weights list``.
    """

    name: str
    file: str
    sha256: str
    kind: str
    info: dict[str, Any] = field(default_factory=dict)
    origin: str = "user"

    def path(self) -> Path:
        base = _SHIPPED_DIR if self.origin == "shipped" else user_dir()
        return base / self.file


def user_dir() -> Path:
    """The user registry folder (created on first write, not on read)."""
    home = os.environ.get("COMNECK_HOME")
    root = Path(home) if home else Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "comneck"
    return root / "weights"


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file, read in chunks so large checkpoints do not sit in memory twice."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _read_manifest(folder: Path, origin: str) -> dict[str, Entry]:
    path = folder / _MANIFEST
    if not path.is_file():
        return {}
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise WeightsError(f"weights manifest {path} is damaged ({exc}); fix or delete it") from exc
    if not isinstance(raw, dict):
        raise WeightsError(f"weights manifest {path} is damaged (a JSON {type(raw).__name__}, not an object of "
                           f"named entries); fix or delete it")
    for name, fields in raw.items():
        # Each entry as _write_manifest writes it; anything else would fail later, far from its cause.
        if not (isinstance(fields, dict) and _ENTRY_FIELDS >= set(fields) >= _ENTRY_FIELDS - {"info"}
                and all(isinstance(fields[k], str) for k in ("file", "sha256", "kind"))
                and isinstance(fields.get("info", {}), dict)):
            raise WeightsError(f"weights manifest {path} is damaged (entry {name!r} is not an object with the "
                               f"strings file, sha256, kind and an optional object info); fix or delete it")
    return {name: Entry(name=name, origin=origin, **fields) for name, fields in raw.items()}


def entries() -> dict[str, Entry]:
    """All registered names; a user entry shadows a shipped one of the same name."""
    merged = _read_manifest(_SHIPPED_DIR, "shipped")
    merged.update(_read_manifest(user_dir(), "user"))
    return merged


def lookup(name: str) -> Entry | None:
    return entries().get(name)


def resolve(name: str) -> Path:
    """The verified local file registered as ``name``.

    Raises WeightsError when the name is unknown, the file is gone, or its sha256 differs from the
    manifest (never load such a file: it may be a different model or a hostile pickle).
    """
    entry = lookup(name)
    if entry is None:
        raise WeightsError(
            f"no weights named {name!r} are registered; add a file with `comneck weights import {name} FILE`"
        )
    path = entry.path()
    if not path.is_file():
        raise WeightsError(
            f"weights {name!r} are registered but the file {path} is missing; "
            f"import it again with `comneck weights import {name} FILE`"
        )
    digest = file_sha256(path)
    if digest != entry.sha256:
        raise WeightsError(
            f"weights file {path} does not match its registered sha256 "
            f"({digest[:12]}… instead of {entry.sha256[:12]}…); it was changed or damaged, import it again"
        )
    return path


def import_file(name: str, source: Path, kind: str, info: dict[str, Any] | None = None, *, move: bool = False) -> Entry:
    """Copy (or move) ``source`` into the user registry as ``name`` and record its sha256.

    The copy and the manifest are written to temp files and renamed, so an interrupted import
    leaves the previous state intact; both get the mode ``open()`` would give (``0666 & ~umask``), so the other
    users of a shared registry can read them.
    """
    if not _NAME.fullmatch(name):
        raise WeightsError(f"invalid weights name {name[:40]!r}{'…' if len(name) > 40 else ''}: use up to 128 "
                           f"letters, digits, '-', '_' and '.', not starting with '.'")
    source = Path(source)
    if not source.is_file():
        raise WeightsError(f"cannot import {source}: no such file")
    folder = user_dir()
    suffix = "".join(source.suffixes[-2:]) if source.name.endswith(".pth.tar") else source.suffix
    target = folder / f"{name}{suffix}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".import-")
        os.close(fd)
    except OSError as exc:  # COMNECK_HOME naming a file, a read-only or full disk
        raise _unwritable(folder, exc) from None
    try:
        if move:
            shutil.move(str(source), tmp)
        else:
            shutil.copyfile(source, tmp)
        os.chmod(tmp, 0o666 & ~umask())  # mkstemp makes 0600, and a moved file keeps its own mode
        digest = file_sha256(Path(tmp))
        os.replace(tmp, target)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, OSError):  # reading the source or writing the copy
            raise WeightsError(f"cannot copy {source} into the user registry {folder} ({exc.strerror or exc})"
                               ) from None
        raise
    entry = Entry(name=name, file=target.name, sha256=digest, kind=kind, info=dict(info or {}))
    manifest = {n: e for n, e in _read_manifest(folder, "user").items()}
    manifest[name] = entry
    try:
        _write_manifest(folder, manifest)
    except OSError as exc:
        raise _unwritable(folder, exc) from None
    return entry


@dataclass(frozen=True)
class Shipped:
    """A codec file comneck once shipped as its default: the commit whose ``file`` (a path in the repository)
    holds it, so a record coded with it can be decoded after the default changed."""

    name: str
    codec: str
    file: str
    sha256: str
    commit: str

    def restore(self) -> str:
        """One sentence: the command that brings the file back, and how to decode with it (``weights``)."""
        local = f"{self.name}-{self.sha256[:8]}{Path(self.file).suffix}"
        return (f"comneck's default {self.name} from commit {self.commit[:12]}, no longer shipped; in a clone of "
                f"comneck's repository run `git show {self.commit[:12]}:{self.file} > {local}` and pass `weights` "
                f"{local}")


def retired_codec(digest: str) -> Shipped | None:
    """The default codec file that once shipped and whose sha256 begins with ``digest`` (hex, a record's weights
    digest), when no registered codec has that digest any more; None otherwise (unknown, or still registered)."""
    if any(e.kind == "codec" and e.sha256.startswith(digest) for e in entries().values()):
        return None
    try:
        table = json.loads((_SHIPPED_DIR / _SHIPPED).read_text(encoding="utf-8"))["defaults"]
        found = [Shipped(**{k: row[k] for k in ("name", "codec", "file", "sha256", "commit")}) for row in table]
    except (OSError, ValueError, KeyError, TypeError) as exc:  # a packaging fault: named, never a traceback
        raise WeightsError(f"the table of shipped codecs {_SHIPPED_DIR / _SHIPPED} is damaged ({exc})") from exc
    return next((s for s in found if s.sha256.startswith(digest)), None)


def _unwritable(folder: Path, exc: OSError) -> WeightsError:
    return WeightsError(f"cannot write to the user registry {folder} ({exc.strerror or exc}); set COMNECK_HOME "
                        f"to a writable folder")


def _write_manifest(folder: Path, manifest: dict[str, Entry]) -> None:
    raw = {n: {k: v for k, v in asdict(e).items() if k not in ("name", "origin")} for n, e in sorted(manifest.items())}
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".manifest-")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            os.fchmod(f.fileno(), 0o666 & ~umask())  # mkstemp makes 0600; the manifest is as readable as the files
            json.dump(raw, f, indent=2, sort_keys=True)
            f.write("\n")
        os.replace(tmp, folder / _MANIFEST)
    finally:
        Path(tmp).unlink(missing_ok=True)  # left only when the write failed
