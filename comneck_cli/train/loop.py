"""What every training run shares: device and torchrun ranks, autocast, gradient averaging, metrics, lengths.

Data parallel: launched with ``torchrun --nproc_per_node N comneck train ...``, each rank reads its
shard of every epoch (``data.EpochSampler``), computes its gradients, and the gradients are averaged
across ranks before each optimizer step (one all-reduce of the flattened gradients per optimizer; the
models are not wrapped in DDP because the codec's latent path calls its sub-modules directly). Rank 0
alone writes checkpoints, metrics and outputs.
"""

from __future__ import annotations

import json
import os
import time
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import torch
from torch import nn

from comneck_cli.errors import ComneckError
from comneck_cli.train.data import Batches, ImageFolderCrops, steps_for


PRECISIONS = ("auto", "fp32", "bf16")


@dataclass
class Runtime:
    """Where this process trains: its device, and its rank among ``world`` torchrun processes."""

    device: torch.device
    rank: int = 0
    world: int = 1
    bf16: bool = False

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1

    def autocast(self) -> AbstractContextManager:
        """bfloat16 autocast where the run asked for it (``precision``), else full float32."""
        if self.bf16:
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return nullcontext()

    @contextmanager
    def autocast_transforms(self, model: nn.Module) -> Iterator[None]:
        """Autocast only ``g_a`` and ``g_s`` (returning float32) while a model's own ``forward`` runs, so its
        hyperprior, gains and likelihoods stay float32, as :func:`latents.latent_path` keeps them."""
        if not self.bf16:
            yield
            return
        modules = [getattr(model, name) for name in ("g_a", "g_s")]

        def wrapped(forward: Callable) -> Callable:
            def run(*args: Any, **kwargs: Any) -> torch.Tensor:
                with self.autocast():
                    return forward(*args, **kwargs).float()
            return run

        for module in modules:
            module.forward = wrapped(module.forward)
        try:
            yield
        finally:
            for module in modules:
                del module.forward  # back to the class's forward

    def average_gradients(self, parameters: Iterable[nn.Parameter]) -> None:
        """Average the gradients of ``parameters`` over all ranks (no-op in a single process)."""
        if not self.distributed:
            return
        import torch.distributed as dist

        params = [p for p in parameters if p.requires_grad]
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        if not grads:
            return
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        flat /= self.world
        offset = 0
        for p, g in zip(params, grads):
            n = g.numel()
            p.grad = flat[offset : offset + n].view_as(p).clone()
            offset += n

    def own(self, per_rank: list[Any]) -> Any:
        """This rank's entry of a checkpoint's per-rank list, or rank 0's if it was saved with another world size."""
        return per_rank[self.rank] if len(per_rank) == self.world else per_rank[0]

    def broadcast(self, module: nn.Module) -> None:
        """Start every rank from rank 0's parameters and buffers."""
        if not self.distributed:
            return
        import torch.distributed as dist

        for tensor in list(module.parameters()) + list(module.buffers()):
            if tensor.numel():
                dist.broadcast(tensor.data, src=0)

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's ``obj`` (in rank order) on every rank."""
        if not self.distributed:
            return [obj]
        import torch.distributed as dist

        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        if self.distributed:
            import torch.distributed as dist

            dist.barrier()


def setup_runtime(device: str, precision: str = "auto") -> Runtime:
    """Pick the device once, and join the torchrun process group when ``WORLD_SIZE`` > 1.

    Under torchrun each rank takes ``cuda:LOCAL_RANK`` (NCCL), or the CPU (gloo) with ``device`` "cpu".
    ``precision``: ``bf16``, ``fp32`` or ``auto`` (bf16 on CUDA only, so CPU runs stay exact).
    """
    from comneck_cli.coding import resolve_device

    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    chosen = resolve_device(device)
    if world > 1:
        import torch.distributed as dist

        if chosen.type == "cuda":
            chosen = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(chosen)
        if not dist.is_initialized():
            dist.init_process_group("nccl" if chosen.type == "cuda" else "gloo")
    if precision not in PRECISIONS:
        raise ComneckError(f"unknown `precision` {precision!r} (one of {', '.join(PRECISIONS)})", params=("precision",))
    bf16 = precision == "bf16" or (precision == "auto" and chosen.type == "cuda")
    return Runtime(device=chosen, rank=rank, world=world, bf16=bf16)


def teardown(runtime: Runtime) -> None:
    if runtime.distributed:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


class Metrics:
    """``metrics.jsonl``: one JSON object per logged step (step, stage, losses, bpp, lr, seconds), rank 0 only.

    On resume the lines after the resumed step are dropped, so the file reads as one uninterrupted run.
    """

    def __init__(self, path: Path, enabled: bool, resume_step: int | None):
        self.path, self.enabled = Path(path), enabled
        if not enabled:
            return
        try:  # the run's first write: a run folder that cannot be written fails here, before any step
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if resume_step is None:
                self.path.write_text("", encoding="utf-8")
            elif self.path.exists():
                keep = [line for line in self.path.read_text(encoding="utf-8").splitlines()
                        if line.strip() and json.loads(line)["step"] <= resume_step]
                tmp = self.path.with_name(f".{self.path.name}.tmp")
                tmp.write_text("".join(line + "\n" for line in keep), encoding="utf-8")
                os.replace(tmp, self.path)
        except OSError as exc:
            self._refuse(exc)

    def _refuse(self, exc: OSError) -> None:
        raise ComneckError(f"cannot write {self.path}: {exc.strerror or exc}; pass a writable `run_dir`",
                           params=("run_dir",)) from None

    def log(self, row: dict[str, Any]) -> None:
        if self.enabled:
            try:
                with open(self.path, "a", encoding="utf-8") as f:
                    f.write(json.dumps(row) + "\n")
            except OSError as exc:
                self._refuse(exc)


class Means:
    """The mean of each logged value over the steps since the last ``metrics.jsonl`` line."""

    def __init__(self) -> None:
        self.totals: dict[str, float] = {}
        self.count = 0

    def add(self, values: dict[str, float]) -> None:
        for key, value in values.items():
            self.totals[key] = self.totals.get(key, 0.0) + value
        self.count += 1

    def take(self) -> dict[str, float]:
        """The means so far; the next ones start from nothing."""
        means = {k: v / self.count for k, v in self.totals.items()}
        self.totals, self.count = {}, 0
        return means


def read_metrics(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


class Clock:
    """Training seconds, carried across resumes."""

    def __init__(self, already: float = 0.0):
        self.already, self.start = already, time.monotonic()

    def seconds(self) -> float:
        return self.already + time.monotonic() - self.start


def check_finite(value: torch.Tensor, step: int, what: str) -> None:
    if not torch.isfinite(value):
        raise ComneckError(f"the {what} loss became {value.item()} at step {step}; lower `lr` or resume from an "
                           "earlier checkpoint", params=("lr",))


def codec_step(runtime: Runtime, model: nn.Module, params: list[nn.Parameter], optimizer: torch.optim.Optimizer,
               aux_optimizer: torch.optim.Optimizer, clip_max_norm: float) -> float:
    """Apply the codec's averaged (and, with ``clip_max_norm`` > 0, clipped) gradients, then one step of the
    bottlenecks' ``aux_loss`` on their own optimizer, as CompressAI trains; returns the aux loss."""
    runtime.average_gradients(params)
    if clip_max_norm > 0:
        torch.nn.utils.clip_grad_norm_(params, clip_max_norm)
    optimizer.step()
    aux_loss = model.aux_loss()
    aux_loss.backward()
    aux_optimizer.step()
    return aux_loss.item()


def crop_batches(cfg: Any, runtime: Runtime, labelled: bool = False, resize: bool | str = False) -> Batches:
    """This rank's batches of crops of ``cfg.data`` (labelled: with class indices): random ones, or with ``resize``
    (True, or the filter) the resized centre square of each image (``data.resize_centre_crop``)."""
    dataset = ImageFolderCrops(cfg.data, cfg.crop, classes_file=cfg.classes, labelled=labelled, resize=resize)
    return Batches(dataset, cfg.batch_size, cfg.seed, runtime.rank, runtime.world, cfg.workers,
                   pin_memory=runtime.device.type == "cuda")


def run_length(cfg: Any, state: dict[str, Any] | None, per_epoch: int) -> int:
    """Steps of a one-stage run: the resumed run's unless ``steps``/``epochs`` are given, never short of its step."""
    if state is not None and cfg.steps is None and cfg.epochs is None:
        total = int(state["total"])
    else:
        total = steps_for(cfg.epochs, cfg.steps, per_epoch)
    check_length(state, total)
    return total


def check_length(state: dict[str, Any] | None, total: int) -> None:
    """A resumed run cannot end before the step its checkpoint reached."""
    if state is not None and total < int(state["step"]):
        raise ComneckError(f"the checkpoint is already at step {state['step']}, past the {total} steps asked for; "
                           "pass `steps` or `epochs` that reach at least that far", params=("steps", "epochs"))


def default_run_dir(output: Path | None, name: str) -> Path:
    """Where checkpoint.pt and metrics.jsonl go without a ``run_dir``."""
    if output is not None:
        return Path(output).parent / f"{Path(output).stem}.run"
    from comneck_cli.weights import user_dir

    return user_dir().parent / "runs" / name
