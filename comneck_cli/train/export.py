"""Trained models leave a run as files (``output``) and registry entries (``register``), written atomically.

A codec is exported with ``codecs.save_codec`` (safetensors, entropy tables rebuilt) and registered as
kind ``codec`` under ``{codec}-q{quality}`` by default, where ``encode``/``decode`` find it. A codec
retrained for machines only ((d3): g_a retrained for the neck, g_s left behind) carries the safetensors
metadata ``machine_only = "true"`` and ``info["machine_only"] = True`` in the registry. Before it is written, each
entropy bottleneck's quantiles are fitted to its density (:func:`settle_quantiles`).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch
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


SETTLE_SCHEDULE = ((4000, 0.1, 0.05), (1000, 0.01, 1e-3))  # (at most so many Adam steps, lr, done below): coarse, fine


def settle_quantiles(model: nn.Module) -> float:
    """Fit the trainable quantiles of ``model``'s entropy bottlenecks to their densities; returns the aux loss after.

    Why: Adam moves a quantile by about its learning rate per step, and they start tens of units away, so at
    CompressAI's aux lr (1e-3) they need ~10⁵ steps to reach the density. A shorter run would export stale coding
    ranges and medians (z is rounded about its medians). The aux loss reads the density only, never data, so it
    is fitted here in seconds with the density held as trained: a coarse pass, then a fine one, each until the mean
    error per quantile (in logits) is below its bound.
    """
    from compressai.entropy_models import EntropyBottleneck

    bottlenecks = [m for m in model.modules() if isinstance(m, EntropyBottleneck) and m.quantiles.requires_grad]
    quantiles = [m.quantiles for m in bottlenecks]
    count = sum(q.numel() for q in quantiles)
    if not quantiles:  # frozen, or a codec without a factorized bottleneck
        return 0.0
    loss = torch.zeros(())
    with torch.enable_grad():
        for steps, lr, bound in SETTLE_SCHEDULE:
            optimizer = torch.optim.Adam(quantiles, lr=lr)
            for _ in range(steps):
                optimizer.zero_grad(set_to_none=True)
                loss = sum(m.loss() for m in bottlenecks)
                if loss.item() < bound * count:
                    break
                loss.backward()
                optimizer.step()
    return float(loss.detach())


def write_codec(model: nn.Module, path: Path, codec: str, quality: int, config: dict[str, Any], *,
                machine_only: bool = False) -> None:
    """:func:`settle_quantiles`, then ``save_codec`` to ``path`` atomically; a machine-only codec gets
    ``machine_only = "true"`` metadata."""
    settle_quantiles(model)
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
