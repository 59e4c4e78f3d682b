"""Trained models leave a run as files (``output``) and registry entries (``register``), written atomically.

A codec is exported with ``codecs.save_codec`` (safetensors, entropy tables rebuilt) and registered as
kind ``codec`` under ``{codec}-q{quality}`` by default, where ``encode``/``decode`` find it. A codec
retrained for machines only ((d3): g_a retrained for the neck, g_s left behind) carries the safetensors
metadata ``machine_only = "true"`` and ``info["machine_only"] = True`` in the registry.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

from torch import nn

from comneck_cli import weights as registry

from comneck_cli.codecs import save_codec
from comneck_cli.errors import ComneckError
from comneck_cli.io.outputs import umask

MACHINE_ONLY_KEY = "machine_only"


def _atomic(path: Path, write: Callable[[Path], None]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp" + path.suffix)
    os.close(fd)
    try:
        write(Path(tmp))
        os.chmod(tmp, 0o666 & ~umask())  # mkstemp makes 0600; an exported model gets what open() would give
        os.replace(tmp, path)
    except OSError as exc:
        raise ComneckError(f"cannot write {path}: {exc.strerror or exc}") from exc
    finally:
        Path(tmp).unlink(missing_ok=True)


def write_codec(model: nn.Module, path: Path, codec: str, quality: int, config: dict[str, Any], *,
                machine_only: bool = False) -> None:
    """``save_codec`` to ``path`` atomically; a machine-only codec gets ``machine_only = "true"`` metadata."""

    _atomic(path, lambda tmp: save_codec(model, tmp, codec, quality, config, machine_only=machine_only))


def is_machine_only(path: Path) -> bool:
    """Whether a codec file was retrained for machines only (its g_s does not reconstruct images)."""
    from comneck_cli.codecs import weights_info

    return weights_info(Path(path)).get(MACHINE_ONLY_KEY) == "true"


def publish(write: Callable[[Path], None], suffix: str, output: Path | None, register: str | None, kind: str,
            info: dict[str, Any]) -> tuple[Path | None, registry.Entry | None]:
    """Write a model to ``output`` and/or the registry as ``register`` (with ``info``), each atomically.

    ``write(path)`` writes the file; without ``output`` it is written to a temp folder and moved in.
    """
    if output is None and register is None:
        raise ComneckError("nothing would keep the trained model: pass `output` or `register`",
                           params=("output", "register"))
    entry = None
    if output is not None:
        _atomic(Path(output), write)
    if register is not None and output is not None:
        entry = registry.import_file(register, Path(output), kind, info)
    elif register is not None:
        folder = Path(tempfile.mkdtemp(prefix="comneck-train-"))
        try:
            tmp = folder / f"{register}{suffix}"
            write(tmp)
            entry = registry.import_file(register, tmp, kind, info, move=True)
        finally:
            shutil.rmtree(folder, ignore_errors=True)
    return output, entry
