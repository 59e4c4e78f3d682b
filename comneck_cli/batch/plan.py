"""Planning a batch job on the driver: which inputs (a folder walked, or a list of paths), in which order, and
in which chunks; every worker gets the same plan whatever the engine."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Sequence, TextIO

from comneck_cli.errors import ComneckError, InputError
from comneck_cli.io.outputs import STDIO

PATH_MAX = 4096  # Linux's limit on a path's length: a longer line of a list of paths names no file


@dataclass(frozen=True)
class Item:
    """One input: ``source`` is absolute (workers may run elsewhere), ``label`` is the path as the user gave it,
    ``relative`` is the POSIX path mirrored under ``--output`` (``a/b.png`` -> ``OUT/a/b.cnk``)."""

    source: str
    label: str
    relative: str


def plan_inputs(spec: str, suffixes: Sequence[str], output: Path, relative_to: Path | None = None,
                stdin: Iterable[str] | None = None) -> tuple[list[Item], list[dict[str, str]]]:
    """Items in sorted order, and the entries refused while planning (``{"path", "reason"}``).

    ``spec`` is a folder (walked recursively for ``suffixes``; hidden entries, ``output`` itself and anything that
    is not a regular file are left out), a text file listing paths (one a line, relative to ``relative_to``, default the current folder), or
    ``-`` for such a list on stdin.
    """
    if spec == STDIO:
        return _listed((stdin if stdin is not None else _bounded_lines(sys.stdin)), relative_to)
    path = Path(spec)
    if path.is_dir():
        return _walk(path, suffixes, output), []
    if not path.exists():
        raise InputError(f"`input` {spec} does not exist; give a folder, a text file listing paths, or -",
                         params=["input"])
    if not path.is_file():  # reading a FIFO or a device as a list would block or never end
        raise InputError(f"`input` {spec} is not a regular file (a FIFO, socket or device); give a folder, a text "
                         f"file listing paths, or - for such a list on stdin", params=["input"])
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        text = None
    if text is None or "\x00" in text:
        raise InputError(f"`input` {spec} is neither a folder nor a text file listing paths; for single "
                         f"files use `comneck encode|decode|features`", params=["input"])
    return _listed(text.splitlines(), relative_to)


def _walk(root: Path, suffixes: Sequence[str], output: Path) -> list[Item]:
    root_abs = Path(os.path.abspath(root))
    skip = Path(os.path.abspath(output))
    found = []
    for folder, dirs, files in os.walk(root_abs):
        here = Path(folder)
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and here / d != skip)
        for name in files:
            source = here / name
            # Only regular files (symlinks to them included): opening a FIFO would block the job forever.
            if not name.startswith(".") and name.lower().endswith(tuple(suffixes)) and source.is_file():
                relative = source.relative_to(root_abs).as_posix()
                found.append(Item(str(source), str(root / relative), relative))
    return sorted(found, key=lambda item: item.relative)


def _bounded_lines(stream: TextIO) -> Iterator[str]:
    """The lines of a list of paths on ``stream``, each read with a bound (a path is at most PATH_MAX, 4096 bytes):
    a stream that is no such list (``< /dev/zero``) is refused at its first line, never read into memory whole."""
    while line := stream.readline(PATH_MAX + 2):
        if "\x00" in line or (len(line) > PATH_MAX and not line.endswith("\n")):
            raise InputError(f"`input` - is not a list of paths: a line longer than {PATH_MAX} characters or with "
                             "a NUL byte; give one path a line", params=["input"])
        yield line


def _listed(lines: Iterable[str], relative_to: Path | None) -> tuple[list[Item], list[dict[str, str]]]:
    base = Path(os.path.abspath(relative_to if relative_to is not None else Path.cwd()))
    items, refused, seen = [], [], set()
    for line in lines:
        entry = line.rstrip("\r\n")
        if not entry.strip() or entry.lstrip().startswith("#"):
            continue
        source = Path(os.path.abspath(entry))
        if source in seen:
            continue
        seen.add(source)
        if source.is_dir():  # `.` or a folder: it has no file name for an output to mirror
            refused.append({"path": entry, "reason": "is a folder, not a file; list the files in it, or give "
                                                     "the folder itself as `input`", "params": ["input"]})
            continue
        if source.exists() and not source.is_file():  # reading a FIFO would block the job forever
            refused.append({"path": entry, "reason": "is not a regular file (a FIFO, socket or device); list "
                                                     "only files"})
            continue
        try:
            relative = source.relative_to(base).as_posix()
        except ValueError:
            refused.append({"path": entry, "reason": f"not under {base}, which output paths mirror; "
                                                     f"pass `relative_to` a folder that holds it",
                            "params": ["relative_to"]})
            continue
        items.append(Item(str(source), entry, relative))
    return sorted(items, key=lambda item: item.relative), refused


def chunks(items: Sequence[Item], size: int) -> list[list[Item]]:
    return [list(items[i : i + size]) for i in range(0, len(items), size)]


def records_of(item: Item, limits) -> list:
    """Every record of a ``.cnk`` input, read under ``limits``."""
    from comneck_cli.formats import CnkError, read_file

    try:
        return read_file(item.source, limits)
    except CnkError as exc:
        raise ComneckError(str(exc), params=exc.params) from None  # `max_pixels` stays a flag in the reason

