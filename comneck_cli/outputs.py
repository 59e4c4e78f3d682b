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
from pathlib import Path

from .errors import ComneckError

STDIO = "-"


def write_atomic(path: Path, data: bytes, *, force: bool = False) -> None:
    """Write ``data`` to ``path`` all at once, or not at all."""
    path = Path(path)
    if not force and path.exists():
        raise ComneckError(f"{path} already exists; pass --force to overwrite it")
    folder = path.parent if str(path.parent) else Path(".")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as exc:
        raise ComneckError(f"cannot write {path}: {exc.strerror or exc}") from exc
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if force:
            os.replace(tmp, path)
        else:
            try:
                os.link(tmp, path)
            except FileExistsError:
                raise ComneckError(f"{path} already exists; pass --force to overwrite it") from None
            except OSError as exc:
                # File systems without hard links: fall back to a rename after one more check.
                if exc.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.EXDEV, errno.ENOTSUP):
                    raise
                if path.exists():
                    raise ComneckError(f"{path} already exists; pass --force to overwrite it") from None
                os.replace(tmp, path)
    except ComneckError:
        raise
    except OSError as exc:
        raise ComneckError(f"cannot write {path}: {exc.strerror or exc}") from exc
    finally:
        Path(tmp).unlink(missing_ok=True)


def write_stdout(data: bytes) -> None:
    sys.stdout.buffer.write(data)
    sys.stdout.buffer.flush()


def is_dir_target(output: str | None) -> bool:
    """An ``-o`` value names a folder when it exists as one or ends with a path separator."""
    return output is not None and output != STDIO and (output.endswith(("/", os.sep)) or Path(output).is_dir())


def numbered(path: Path, index: int) -> Path:
    """``photo.png`` -> ``photo_0002.png`` for the second of several outputs sharing one name."""
    return path.with_name(f"{path.stem}_{index:04d}{path.suffix}")
