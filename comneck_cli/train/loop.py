"""What every training run shares: device and torchrun ranks, autocast, gradient averaging, progress, metrics.

Data parallel: launched with ``torchrun --nproc_per_node N comneck train ...``, each rank reads its
shard of every epoch (``data.EpochSampler``), computes its gradients, and the gradients are averaged
across ranks before each optimizer step (one all-reduce of the flattened gradients per optimizer; the
models are not wrapped in DDP because the codec's latent path calls its sub-modules directly). Rank 0
alone writes checkpoints, metrics and outputs.
"""

from __future__ import annotations

import json
import os
import sys
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
        """bfloat16 autocast where the run asked for it (``--precision``), else full float32."""
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

    Under torchrun each rank takes ``cuda:LOCAL_RANK`` (NCCL), or the CPU (gloo) with ``--device cpu``.
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
        raise ComneckError(f"unknown precision {precision!r} (one of {', '.join(PRECISIONS)})")
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
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is None:
            self.path.write_text("", encoding="utf-8")
        elif self.path.exists():
            keep = [line for line in self.path.read_text(encoding="utf-8").splitlines()
                    if line.strip() and json.loads(line)["step"] <= resume_step]
            tmp = self.path.with_name(f".{self.path.name}.tmp")
            tmp.write_text("".join(line + "\n" for line in keep), encoding="utf-8")
            os.replace(tmp, self.path)

    def log(self, row: dict[str, Any]) -> None:
        if self.enabled:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(row) + "\n")


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


@contextmanager
def progress(total: int, done: int, label: str, enabled: bool) -> Iterator[Callable[..., None]]:
    """A rich progress bar on stderr (terminal only); yields ``advance(**fields)`` showing the latest losses."""
    if not enabled or total < 1 or not sys.stderr.isatty():
        yield lambda **fields: None
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                  TextColumn("{task.fields[status]}"), console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task(label, total=total, completed=done, status="")

        def advance(**fields: Any) -> None:
            status = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in fields.items())
            bar.update(task, advance=1, status=status)

        yield advance


class Clock:
    """Training seconds, carried across resumes."""

    def __init__(self, already: float = 0.0):
        self.already, self.start = already, time.monotonic()

    def seconds(self) -> float:
        return self.already + time.monotonic() - self.start


def check_finite(value: torch.Tensor, step: int, what: str) -> None:
    if not torch.isfinite(value):
        raise ComneckError(
            f"the {what} loss became {value.item()} at step {step}; lower --lr or resume from an earlier checkpoint"
        )


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


def crop_batches(cfg: RunConfig, runtime: Runtime, labelled: bool = False, resize: bool = False) -> Batches:
    """This rank's batches of crops of ``cfg.data`` (labelled: with class indices): random ones, or with ``resize``
    the resized centre square of each image (``data.resize_centre_crop``)."""
    dataset = ImageFolderCrops(cfg.data, cfg.crop, classes_file=cfg.classes, labelled=labelled, resize=resize)
    return Batches(dataset, cfg.batch_size, cfg.seed, runtime.rank, runtime.world, cfg.workers,
                   pin_memory=runtime.device.type == "cuda")


def run_length(cfg: Any, state: dict[str, Any] | None, per_epoch: int) -> int:
    """Steps of a one-stage run: the resumed run's unless --steps/--epochs are given, never short of its step."""
    if state is not None and cfg.steps is None and cfg.epochs is None:
        total = int(state["total"])
    else:
        total = steps_for(cfg.epochs, cfg.steps, per_epoch)
    check_length(state, total)
    return total


def check_length(state: dict[str, Any] | None, total: int) -> None:
    """A resumed run cannot end before the step its checkpoint reached."""
    if state is not None and total < int(state["step"]):
        raise ComneckError(
            f"the checkpoint is already at step {state['step']}, past the {total} steps asked for; "
            "pass --steps/--epochs that reach at least that far"
        )


def default_run_dir(output: Path | None, name: str) -> Path:
    """Where checkpoint.pt and metrics.jsonl go when --run-dir is not given."""
    if output is not None:
        return Path(output).parent / f"{Path(output).stem}.run"
    from comneck_cli.weights import user_dir

    return user_dir().parent / "runs" / name


@dataclass(kw_only=True)
class RunConfig:
    """Settings every training run takes.

    ``steps``/``epochs``: the run's length (exactly one; the neck takes one value per stage). On
    ``resume`` the checkpoint's own settings decide the trajectory (model, λ, learning rates, batch size,
    crop, seed); a field given here that differs from them is an error, and only the length, the
    outputs and where the run executes may change. ``register``: registry name (``{codec}``,
    ``{quality}`` and ``{scenario}`` are filled in), None to skip. ``run_dir`` holds ``checkpoint.pt``
    and ``metrics.jsonl`` (default: beside ``output``, else in the user registry's ``runs`` folder).
    """

    data: Path | None = None
    classes: Path | None = None
    output: Path | None = None
    register: str | None = None
    batch_size: int | None = None
    crop: int | None = None
    seed: int | None = None
    device: str = "auto"
    precision: str = "auto"
    resume: Path | None = None
    run_dir: Path | None = None
    checkpoint_every: int = 500
    log_every: int = 10
    workers: int = 0
    quiet: bool = False


def serialise(cfg: Any) -> dict[str, Any]:
    """A config dataclass as plain JSON-able values (paths as strings)."""
    from dataclasses import fields

    return {f.name: _plain(getattr(cfg, f.name)) for f in fields(cfg)}


def _plain(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def merge_resumed(cfg: Any, saved: dict[str, Any], trajectory: tuple[str, ...]) -> None:
    """Take the trajectory fields from a checkpoint's config; a differing value given now is an error."""
    from dataclasses import fields

    paths = {f.name for f in fields(cfg) if "Path" in str(f.type)}
    for name in trajectory:
        given, stored = _plain(getattr(cfg, name)), _plain(saved.get(name))
        if given is not None and given != stored:
            flag = "--" + name.replace("_", "-")
            raise ComneckError(
                f"the checkpoint was trained with {flag} {stored}, not {given}; drop {flag} to resume it, "
                "or start a new run without --resume"
            )
        if name in paths and stored is not None:
            stored = Path(stored)
        elif isinstance(stored, list):
            stored = tuple(stored)
        setattr(cfg, name, stored)


def resolve_run(cfg: Any, kind: str, trajectory: tuple[str, ...], defaults: dict[str, Any], command: str):
    """What ``train codec`` and ``train neck`` share before training: resume state, required options, defaults, λ.

    On resume the trajectory (model, λ, rates, batch, crop, seed) comes from the checkpoint. Returns its state.
    """
    from comneck_cli.train import checkpoint as ckpt
    from comneck_cli.train.losses import default_lambda

    state = None
    if cfg.resume is not None:
        state = ckpt.load(cfg.resume, kind)
        merge_resumed(cfg, state["config"], trajectory)
        cfg.data = cfg.data or Path(state["config"]["data"])
        cfg.run_dir = cfg.run_dir or Path(cfg.resume).parent
    from comneck_cli.codecs import get_spec

    variable_rate = cfg.codec is not None and get_spec(cfg.codec).variable_rate
    if cfg.codec is None or (cfg.quality is None and not variable_rate) or cfg.data is None:
        raise ComneckError(f"{command} needs --codec, -q/--quality and --data (or --resume CHECKPOINT)")
    for name, value in defaults.items():
        if getattr(cfg, name) is None:
            setattr(cfg, name, value)
    if cfg.lmbda is None and not variable_rate:  # a variable-rate codec trains each level at its own λ
        cfg.lmbda = default_lambda(cfg.codec, cfg.quality)
    if cfg.crop % 64:
        raise ComneckError(f"--crop {cfg.crop} is not a multiple of 64, which the codec's transforms need")
    return state
