"""Where results go: atomic, never-clobbering writes and output-path planning.

Every file is written to a temp file in its target folder and then moved into place, so a crash,
Ctrl-C or a full disk never leaves a partial output; without ``force`` an existing file is never
replaced, even by a concurrent process (the final step is a hard link, which fails if the name exists).
"""

from __future__ import annotations

import errno
import os
import sys
import tempfile
import threading
from pathlib import Path
from typing import Callable, Protocol, Sequence, TypeVar

from comneck_cli.errors import ComneckError

STDIO = "-"
NO_RECORDS = "no records in file (empty input)"  # decode, features and info say the same of an empty .cnk input
NO_SUCH_FILE = "no such file"  # every command says the same of a missing input (encode, decode, features, info)
_UMASK_LOCK = threading.Lock()
T = TypeVar("T")


class Report(Protocol):
    """Where a function over many inputs reports: a warning, or one input that failed (the others go on; ``fail``
    may raise to stop the run). The CLI's run state is one."""

    def warn(self, text: str) -> None: ...

    def fail(self, label: str, exc: BaseException) -> None: ...


def umask() -> int:
    """The process umask, read without changing it where Linux shows it (``os.umask`` can only set it, so
    reading it that way briefly sets another mask that a concurrent thread's file would get)."""
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    with _UMASK_LOCK:
        mask = os.umask(0o077)  # the strictest mask while it is briefly swapped
        os.umask(mask)
    return mask


def make_folder(folder: Path) -> None:
    """Create ``folder`` and its parents (nothing if it exists), or say in one sentence why it cannot be."""
    try:
        Path(folder).mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ComneckError(f"cannot create folder {folder}: {exc.strerror or exc}") from None


def read_problem(exc: OSError) -> str:
    """Why an input could not be read, in the words every command uses: :data:`NO_SUCH_FILE`, else the system's."""
    return NO_SUCH_FILE if isinstance(exc, FileNotFoundError) else exc.strerror or str(exc)


def refuse_terminal(what: str = "binary data") -> None:
    """Refuse to write ``what`` to stdout when it is a terminal (as gzip does): it would only garble the screen."""
    if sys.stdout.isatty():
        raise ComneckError(f"refusing to write {what} to a terminal; redirect stdout (> FILE or | COMMAND) or "
                           "pass -o FILE")


def _exists(path: Path) -> ComneckError:
    return ComneckError(f"{path} already exists; pass `force` to overwrite it", params=["force"])


def refuse_existing(target: Path | None, force: bool) -> None:
    """Refuse an output that exists, unless ``force``, and one that is not a regular file (a device, FIFO, socket or
    folder) even with it: checked before an input is read and coded."""
    if target is None:
        return
    try:
        refuse_special(Path(target))
        exists = Path(target).exists()
    except OSError as exc:  # a name the system cannot even stat (ENAMETOOLONG): one line, not a traceback
        raise ComneckError(f"cannot write {target}: {exc.strerror or exc}") from None
    if not force and exists:
        raise _exists(Path(target))


def refuse_special(target: Path) -> None:
    """Refuse to replace something that is not a regular file (``/dev/sda``, a FIFO, a socket, a folder), with or
    without ``force``: moving a file into its place would destroy a device node or a pipe, not update a file."""
    if target.exists() and not target.is_file():
        raise ComneckError(f"{target} exists and is not a regular file; outputs never replace a device, FIFO, "
                           "socket or folder, with or without `force`: choose another name", params=["force"])


def refuse_input(target: Path | None, inputs: Sequence[str | Path]) -> None:
    """Refuse an output that is one of the run's ``inputs`` (the same path, or the same file under another name),
    with or without ``force``: checked before any input is read."""
    if target is not None and (found := _inputs_at([target], _input_files(inputs))) is not None:
        raise ComneckError(f"{target} is also an input of this run ({found[1]}); an output never replaces an input, "
                           "with or without `force`: choose another name", params=["force"])


def _input_files(inputs: Sequence[str | Path] | Sequence[tuple[str, str | Path]]) -> dict[tuple[int, int], str]:
    """Each readable input file's identity (device, inode) -> its label; ``-`` (stdin) has none. Identities, not
    names, so that ``./a.png``, ``A.PNG`` on a file system that ignores case, and links all count as the input."""
    found = {}
    for entry in inputs:
        label, path = entry if isinstance(entry, tuple) else (str(entry), entry)
        if str(path) == STDIO:
            continue
        try:
            st = os.stat(path)
        except (OSError, ValueError):  # missing or unreadable: its reader says so
            continue
        found.setdefault((st.st_dev, st.st_ino), label)
    return found


def _inputs_at(targets: Sequence[Path], identities: dict[tuple[int, int], str]) -> tuple[Path, str] | None:
    """The first of ``targets`` that already is an input, and that input's label; or None."""
    for target in targets:
        try:
            st = os.stat(target)
        except (OSError, ValueError):  # not there yet (the usual case), or a name the system cannot even stat
            continue
        if (st.st_dev, st.st_ino) in identities:
            return target, identities[(st.st_dev, st.st_ino)]
    return None


def check_target(target: Path, force: bool) -> None:
    """Refuse an output file that exists (without ``force``) or whose folder cannot be written, before any model
    loads: the same refusal after minutes of loading and coding would waste them."""
    refuse_existing(target, force)
    folder = next((p for p in target.absolute().parents if p.exists()), Path("/"))
    if not folder.is_dir() or not os.access(folder, os.W_OK | os.X_OK):
        raise ComneckError(f"cannot write {target}: {folder} is not a writable folder")


def write_atomic(path: Path, data: bytes, *, force: bool = False) -> None:
    """Write ``data`` to ``path`` all at once, or not at all."""
    path = Path(path)
    refuse_existing(path, force)
    folder = path.parent if str(path.parent) else Path(".")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as exc:
        raise ComneckError(f"cannot write {path}: {exc.strerror or exc}") from exc
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), 0o666 & ~umask())  # mkstemp makes 0600; give what open() would, before linking
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if force:
            os.replace(tmp, path)
        else:
            try:
                os.link(tmp, path)
            except FileExistsError:
                raise _exists(path) from None
            except OSError as exc:
                # File systems without hard links: fall back to a rename after one more check.
                if exc.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.EXDEV, errno.ENOTSUP):
                    raise
                if path.exists():
                    raise _exists(path) from None
                os.replace(tmp, path)
    except ComneckError:
        raise
    except OSError as exc:
        raise ComneckError(f"cannot write {path}: {exc.strerror or exc}") from exc
    finally:
        Path(tmp).unlink(missing_ok=True)


def write_stdout(data: bytes) -> None:
    """Write ``data`` to stdout; a full device or a closed pipe is a ComneckError."""
    try:
        sys.stdout.buffer.write(data)
        sys.stdout.buffer.flush()
    except OSError as exc:
        # What stayed in the buffer would fail again at exit, where Python prints it as "Exception ignored":
        # point stdout at /dev/null so that the one error line is all the user sees.
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            os.close(devnull)
        except (OSError, ValueError):  # no real file descriptor (tests' captured output)
            pass
        raise ComneckError(f"cannot write to stdout: {exc.strerror or exc}") from None


def is_dir_target(output: str | None) -> bool:
    """An ``-o`` value names a folder when it exists as one or ends with a path separator."""
    if output is None or output == STDIO:
        return False
    try:
        return output.endswith(("/", os.sep)) or Path(output).is_dir()
    except OSError:  # a name too long to stat (ENAMETOOLONG): not a folder; writing it says why it fails
        return False


def decoded_name(source: Path) -> Path:
    """``photo.cnk`` -> ``photo.decoded.png``, the default output of ``decode``: ``encode`` wrote ``photo.cnk`` from
    ``photo.png`` (or ``.jpg``...), so decoding beside it must not take -- or with ``--force`` replace -- that name."""
    return source.with_name(f"{source.stem}.decoded.png")


def numbered(path: Path, index: int) -> Path:
    """``photo.png`` -> ``photo_0002.png`` for the second of several outputs sharing one name."""
    return path.with_name(f"{path.stem}_{index:04d}{path.suffix}")


def clashes(claims: Sequence[tuple[str, Sequence[Path]]], inputs: Sequence[tuple[str, str | Path]] = ()
            ) -> dict[int, str]:
    """Plan a run's outputs before anything is written, so that no output replaces another of the same run.

    ``claims`` holds, in the order the run takes its inputs, each input's label and every path it would write. An
    input that would write a path that an earlier input also writes is refused: the result maps its index to the
    reason, one sentence naming the earlier input. Paths compare as the file system sees them: absolute, and
    regardless of case in a folder whose file system ignores case. Refusing (rather than renaming) keeps every
    name a pure function of its input, which resuming a batch relies on. An input whose output would be one of the
    run's ``inputs`` (label, path) is refused too, with or without ``force``.
    """
    owners: dict[str, str] = {}
    refused: dict[int, str] = {}
    folds: dict[Path, bool] = {}
    identities = _input_files(inputs)
    for index, (label, paths) in enumerate(claims):
        if identities and (found := _inputs_at(paths, identities)) is not None:
            refused[index] = (f"its output {found[0]} is an input of this run ({found[1]}); an output never replaces "
                              "an input: choose another output")
            continue
        keys = [(_path_key(Path(path), folds), path) for path in paths]
        taken = next(((path, owners[key]) for key, path in keys if key in owners), None)
        if taken is not None:
            refused[index] = f"would write the same output as {taken[1]} ({taken[0]}); rename one of them"
            continue
        owners.update((key, label) for key, _ in keys)
    return refused


def without_clashes(entries: Sequence[T], claim: Callable[[T], tuple[str, Sequence[Path | None]]],
                    report: Report, inputs: Sequence[str] = ()) -> list[T]:
    """``entries`` (inputs, or decode's records) less those that would write an output that an earlier entry of
    the run writes (:func:`clashes`): each refused one is reported failed, naming the other. ``claim(entry)`` gives
    its label and output paths (None: stdout or the one shared stream, which cannot clash). An entry whose output is
    one of the run's ``inputs`` (file names) is refused too."""
    claims = [(label, [t for t in targets if t is not None]) for label, targets in map(claim, entries)]
    refused = clashes(claims, [(name, name) for name in inputs])
    for index, reason in refused.items():
        report.fail(claims[index][0], ComneckError(reason))
    return [entry for index, entry in enumerate(entries) if index not in refused]


def _path_key(path: Path, folds: dict[Path, bool]) -> str:
    full = Path(os.path.abspath(path))
    if full.parent not in folds:
        folds[full.parent] = _ignores_case(full.parent)
    return str(full).casefold() if folds[full.parent] else str(full)


def _ignores_case(folder: Path) -> bool:
    """Whether ``folder`` (or, before it exists, its nearest existing parent) is on a file system that ignores
    case (macOS and Windows by default): one whose name with its case swapped is the same folder."""
    for existing in (folder, *folder.parents):
        swapped = existing.with_name(existing.name.swapcase()) if existing.name else existing
        if swapped == existing or not os.path.exists(existing):  # os.path: False for a name too long to stat
            continue  # no letters to swap, or not there yet: ask the parent
        try:
            return swapped.exists() and os.path.samefile(existing, swapped)
        except OSError:
            return False
    return False
