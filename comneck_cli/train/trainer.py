"""The one trainer skeleton every run plugs into: step loop, resume, metrics, checkpoints, export.

A run (codec, vbr, neck, postprocess, adapter) is a :class:`Run`: it builds its models, optimizers and batches when
constructed, takes one optimizer step in :meth:`Run.step` (forward, loss, backward, clipping, ``optimizer.step``,
under ``runtime.autocast()`` where it wants it) and writes its files in :meth:`Run.export`. :func:`train` does the
rest, the same for all of them::

    setup_runtime (device, torchrun ranks, precision)
    run = build(runtime)                       # the run seeds, builds and loads its models
    restore run.saved() / rank states / RNGs from the checkpoint, or seed each rank's noise
    for step, x, labels in run.batches.iterate(start, run.total):
        values = run.step(step, x, labels)     # {"loss": ..., "bpp": ...}
        metrics.jsonl every ``log_every`` steps and at run.bounds; checkpoint.pt every ``checkpoint_every``
        on_progress(done, total)
        stop early once ``cfg.minutes`` of wall time have passed
    checkpoint.pt at the end; run.export(final) on rank 0; TrainResult

A checkpoint holds ``kind``, ``config`` (the config dataclass), ``step``, ``total``, ``rng`` (per rank),
``seconds``, ``world``, ``final``, each entry of :meth:`Run.saved` as its ``state_dict()``, the plain values of
:meth:`Run.plain` and the per-rank values of :meth:`Run.rank_states`: it loads with ``weights_only=True``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor

from comneck_cli.train import checkpoint as ckpt
from comneck_cli.train.config import RunConfig, serialise
from comneck_cli.train.data import Batches
from comneck_cli.train.loop import Clock, Means, Metrics, Runtime, setup_runtime, teardown

Progress = Callable[[int, int], None]


@dataclass
class TrainResult:
    """Where a run's outputs went, how long it ran and its last logged losses."""

    output: Path | None
    registered: str | None
    run_dir: Path
    steps: int
    final: dict[str, float] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)


class Run:
    """One kind of training, as :func:`train` drives it. A subclass sets, when constructed:

    ``kind`` (the checkpoint's kind, e.g. ``"codec"``), ``cfg`` (its :class:`RunConfig`), ``runtime``, ``state``
    (the checkpoint being resumed, or None), ``run_dir``, ``batches`` (:class:`data.Batches`), ``total`` (steps)
    and, for staged runs, ``bounds`` (the step that ends each stage: always logged).
    """

    kind: str
    cfg: RunConfig
    runtime: Runtime
    state: dict[str, Any] | None
    run_dir: Path
    batches: Batches
    total: int
    bounds: tuple[int, ...] = ()

    def saved(self) -> dict[str, Any]:
        """Checkpoint entries with ``state_dict``/``load_state_dict``: models and optimizers, by checkpoint key."""
        raise NotImplementedError

    def plain(self) -> dict[str, Any]:
        """Plain values the checkpoint also keeps (a model's constructor arguments, the codec digest)."""
        return {}

    def rank_states(self) -> dict[str, Any]:
        """Values each rank keeps for itself (a private random generator's state), by checkpoint key."""
        return {}

    def restore_rank_states(self, states: dict[str, Any]) -> None:
        """Take back this rank's :meth:`rank_states` from a checkpoint."""

    def step(self, step: int, x: Tensor, labels: Tensor) -> dict[str, float]:
        """One optimizer step on a batch (already on the device); the values to log (``loss`` first)."""
        raise NotImplementedError

    def describe(self, step: int) -> dict[str, Any]:
        """What a metrics line says of ``step`` besides its losses: the stage, the learning rate."""
        return {}

    def export(self, final: dict[str, float]) -> tuple[Path | None, str | None, dict[str, Any]]:
        """Write the trained models (rank 0 only): (output file, registry name, extra result fields)."""
        raise NotImplementedError


class StagedRun(Run):
    """A run in stages: ``stages[i]`` (with a ``name`` and an ``lr``) ends at step ``bounds[i]``."""

    stages: tuple[Any, ...]

    def stage_index(self, step: int) -> int:
        return next(i for i, bound in enumerate(self.bounds) if step < bound)

    def describe(self, step: int) -> dict[str, Any]:
        stage = self.stages[self.stage_index(step)]
        return {"stage": stage.name, "lr": stage.lr}


def train(cfg: RunConfig, build: Callable[[Runtime], Run], on_progress: Progress | None = None) -> TrainResult:
    """Set up the device and ranks from ``cfg``, ``build`` the run there, train it to its end and export it.

    ``on_progress(done, total)`` is called with the step reached, once before the first step and after each.
    """
    runtime = setup_runtime(cfg.device, cfg.precision)
    try:
        return fit(build(runtime), on_progress)
    finally:
        teardown(runtime)


def fit(run: Run, on_progress: Progress | None = None) -> TrainResult:
    """Train a built run from its start (or its checkpoint's step) to ``run.total``; see the module doc."""
    cfg, runtime, state, total = run.cfg, run.runtime, run.state, run.total
    start, clock, final = 0, Clock(), {}
    if state is not None:
        for key, value in run.saved().items():
            value.load_state_dict(state[key])
        run.restore_rank_states({key: runtime.own(state[key]) for key in run.rank_states()})
        start, clock, final = int(state["step"]), Clock(float(state["seconds"])), dict(state.get("final", {}))
        ckpt.restore_rng(runtime.own(state["rng"]))
    elif runtime.rank:
        torch.manual_seed(cfg.seed + runtime.rank)  # different noise per rank
    metrics = Metrics(run.run_dir / "metrics.jsonl", runtime.main, None if state is None else start)
    means = Means()

    def save_checkpoint(step: int) -> None:
        rngs = runtime.gather(ckpt.capture_rng())
        ranks = {key: runtime.gather(value) for key, value in run.rank_states().items()}
        if runtime.main:
            ckpt.save(run.run_dir / "checkpoint.pt", {
                "kind": run.kind, "config": serialise(cfg), **{k: v.state_dict() for k, v in run.saved().items()},
                **run.plain(), **ranks, "step": step, "total": total, "rng": rngs, "seconds": clock.seconds(),
                "world": runtime.world, "final": final,
            })

    if on_progress is not None:
        on_progress(start, total)
    device = runtime.device
    deadline = None if cfg.minutes is None else time.monotonic() + 60 * cfg.minutes
    end = total
    for step, x, labels in run.batches.iterate(start, total):
        values = run.step(step, x.to(device, non_blocking=True), labels.to(device, non_blocking=True))
        means.add(values)
        done = step + 1
        # rank 0's clock decides for every rank, so all stop after the same step
        out_of_time = deadline is not None and done < total and runtime.gather(time.monotonic() >= deadline)[0]
        if done % cfg.log_every == 0 or done == total or done in run.bounds or out_of_time:
            final = means.take() or final
            metrics.log({"step": done, **run.describe(step), **final, "seconds": round(clock.seconds(), 3)})
        if done % cfg.checkpoint_every == 0 and done < total and not out_of_time:
            save_checkpoint(done)
        if on_progress is not None:
            on_progress(done, total)
        if out_of_time:
            end = done
            break
    save_checkpoint(end)  # its "total" stays the planned length: `resume` goes on to it
    run.total = end  # a run stopped by `minutes` exports what it has learnt, saying how many steps that was

    output, registered, extra = None, None, {}
    if runtime.main:
        output, registered, extra = run.export(final)
    runtime.barrier()
    return TrainResult(output=output, registered=registered, run_dir=run.run_dir, steps=end, final=final,
                       extra=extra)
