"""Resumable training state: models, optimizers, step, random-number states, written atomically.

A checkpoint is one ``torch.save`` dict of tensors and plain values only, so it loads with
``weights_only=True`` (no pickled code runs). It is written to a temp file in the target folder, fsynced and
moved into place with ``os.replace``: a crash mid-write leaves the previous checkpoint intact.

The data order needs no state of its own: the batch of a step is a function of the seed and the step
(see ``data.Batches``). The random states kept are those the step consumes (CompressAI's quantisation noise
draws from torch's global generator) plus Python's and NumPy's for anything else that draws.
"""

from __future__ import annotations

import os
import random
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from comneck_cli.errors import ComneckError, MismatchError, ModelFileError
from comneck_cli.io.outputs import umask

FORMAT = "comneck-train-checkpoint"
VERSION = 1


def capture_rng() -> dict[str, Any]:
    """Python, NumPy, torch CPU and CUDA generator states, as tensors and plain values."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": [version, list(internal), gauss],
        "numpy": [kind, torch.from_numpy(np.asarray(keys, dtype=np.int64)), int(pos), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def save(path: Path, state: dict[str, Any]) -> None:
    """Write ``state`` to ``path`` all at once (temp file, fsync, ``os.replace``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), 0o666 & ~umask())  # mkstemp makes 0600; a checkpoint gets what open() would give
            torch.save({"format": FORMAT, "version": VERSION, **state}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        raise ComneckError(f"cannot write checkpoint {path}: {exc.strerror or exc}") from exc
    finally:
        Path(tmp).unlink(missing_ok=True)


def load(path: Path, kind: str) -> dict[str, Any]:
    """Read a checkpoint written by :func:`save` for a run of ``kind`` (``codec`` or ``neck``)."""
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"checkpoint {path} does not exist; pass the checkpoint.pt of an earlier run as `resume`",
                             params=("resume",))
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises UnpicklingError, RuntimeError, EOFError... for bad files
        raise ModelFileError(
            f"cannot read checkpoint {path} ({type(exc).__name__}); it is damaged or not a comneck checkpoint"
        ) from exc
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ModelFileError(f"{path} is not a comneck training checkpoint; pass the checkpoint.pt of an earlier run")
    if state.get("kind") != kind:
        raise MismatchError(
            f"checkpoint {path} is from `comneck train {state.get('kind')}`, not `comneck train {kind}`; "
            "resume it with that command"
        )
    return state
