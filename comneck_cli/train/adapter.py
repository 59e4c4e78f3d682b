"""``comneck train adapter``: the CoTAM decoder adapter A, trained with a multi-level loss on a frozen codec.

    x -> frozen codec (at a random rate R in --rates; semantic records with --semantic-strength) -> x_hat
    L = w_pix · MSE(A(x_hat), x) + w_shallow · MSE(C_s(A(x_hat)), C_s(x)) + w_deep · MSE(C_d(A(x_hat)), C_d(x))

x_hat is exactly what ``decode`` writes (entropy-coded, clamped, 8-bit); C_s and C_d are a shallow and a deep
hidden state of the frozen CLIP tower C (Hugging Face numbering, ``--layers 2,-2`` by default), both images resized
to C's input and normalised the same way (``neck.Teacher``). Pixels keep the details, the shallow state the
low-level structure CLIP builds on, the deep state the semantics the MLLM reads. Adam, one stage; resumable; the
adapter is exported with ``save_adapter`` and registered as kind ``adapter`` under ``adapter_registry_name``.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from comneck_cli.errors import ComneckError
from comneck_cli.train import checkpoint as ckpt
from comneck_cli.train.codec import TrainResult
from comneck_cli.train.export import publish
from comneck_cli.train.loop import (Clock, Means, Metrics, RunConfig, check_finite, crop_batches, default_run_dir, progress,
                   resolve_run, run_length, serialise, setup_runtime, teardown)
from comneck_cli.train.neck import Teacher, clip_tag, load_frozen_codec, load_training_clip


@dataclass(kw_only=True)
class AdapterTrainConfig(RunConfig):
    """What ``train_adapter`` does; None means the default (``ADAPTER_DEFAULTS``).

    ``rates``: (low, high) range R is drawn from per step for a variable-rate codec (a fixed-rate codec codes at
    ``quality``). ``layers``: the shallow and deep hidden states of the loss. ``loss_weights``: (pixel, shallow,
    deep). ``semantic_strength`` > 0 trains on semantic records guided by the same CLIP. ``clip_tag`` ``"none"``
    builds a randomly initialised CLIP (tests).
    """

    codec: str | None = None
    quality: int | None = None
    weights: Path | None = None
    clip_model: str | None = None
    clip_tag: str | None = None
    clip_weights: Path | None = None
    rates: tuple[float, float] | None = None
    layers: tuple[int, int] | None = None
    loss_weights: tuple[float, float, float] | None = None
    semantic_strength: float | None = None
    width: int | None = None
    blocks: int | None = None
    steps: int | None = None
    epochs: int | None = None
    lr: float | None = None
    register: str | None = "{name}"

    lmbda: ClassVar[float] = 0.0  # no rate term; ``resolve_run`` fills λ only where it is None


ADAPTER_DEFAULTS = {"clip_model": "ViT-L-14", "clip_tag": "openai", "rates": (1.0, 8.0), "layers": (2, -2),
                    "loss_weights": (1.0, 1.0, 1.0), "semantic_strength": 0.0, "width": 64, "blocks": 4,
                    "lr": 1e-4, "batch_size": 8, "crop": 256, "seed": 0}
TRAJECTORY = ("codec", "quality", "weights", "clip_model", "clip_tag", "clip_weights", "rates", "layers",
              "loss_weights", "semantic_strength", "width", "blocks", "lr", "batch_size", "crop", "seed")


def train_adapter(cfg: AdapterTrainConfig) -> TrainResult:
    """Train (or resume) the decoder adapter of a codec; export and register it."""
    from comneck_cli.codecs import check_quality, get_spec

    variable = cfg.codec is not None and get_spec(cfg.codec).variable_rate
    if variable and cfg.quality is None:
        cfg.quality = min(get_spec(cfg.codec).qualities)  # the rate is drawn per step; quality only names the load
    state = resolve_run(cfg, "adapter", TRAJECTORY, ADAPTER_DEFAULTS, "train adapter")
    check_quality(get_spec(cfg.codec), cfg.quality)
    for name, count in (("rates", 2), ("layers", 2), ("loss_weights", 3)):
        value = tuple(getattr(cfg, name))
        if len(value) != count:
            raise ComneckError(f"--{name.replace('_', '-')} takes {count} comma-separated numbers, got {len(value)}")
        setattr(cfg, name, value)
    if min(cfg.loss_weights) < 0 or not sum(cfg.loss_weights) > 0:
        raise ComneckError(f"--loss-weights {cfg.loss_weights} must be non-negative and not all zero")
    if variable:
        from comneck_cli.codecs import check_rate

        cfg.rates = tuple(check_rate(get_spec(cfg.codec), r) for r in sorted(cfg.rates))
    if cfg.semantic_strength and not variable:
        raise ComneckError(f"--semantic-strength needs a variable-rate codec, not {cfg.codec}")
    runtime = setup_runtime(cfg.device, cfg.precision)
    try:
        return _train(cfg, runtime, state, variable)
    finally:
        teardown(runtime)


@torch.no_grad()
def reconstruct(codec, x: Tensor, rate: float | None, guide=None, strength: float = 0.0) -> Tensor:
    """x_hat as ``decode`` writes it for x coded at ``rate`` (semantic records with a guide): 8-bit, on x's device.

    Each image is entropy-coded on its own, exactly as ``encode`` codes it, so A learns the decoder's real output.
    """
    from comneck_cli.coding.semantic import gain_map, semantic_map

    at = codec if rate is None else codec.at_rate(rate)
    y = at.analyze(x)
    y_hats = []
    for i in range(y.shape[0]):
        gain = None
        if guide is not None:
            image = x[i].mul(255).round().byte().permute(1, 2, 0).cpu().numpy()
            gain = gain_map(at.model, at.rate, semantic_map(image, guide, strength), tuple(y.shape[-2:]))
        y_hats.append(at.code(y[i : i + 1], gain=gain)[1])
    x_hat = at.synthesize(torch.cat(y_hats)).float()
    return x_hat.mul(255).round().div(255).clone().to(x.device)  # clone: a normal tensor, outside inference mode


class MultiLevel(torch.nn.Module):
    """The loss's CLIP side: C_s and C_d of an image (resized and normalised as the teacher does), one pass."""

    def __init__(self, clip: torch.nn.Module, layers: tuple[int, int]):
        super().__init__()
        from comneck_cli.clip.tower import resolve_layer, split_clip

        self.head, self.tail = split_clip(clip, 0)
        self.prep = Teacher(clip, self.head, self.tail, ())
        states = len(self.tail.blocks.resblocks) + 1
        self.indices = tuple(resolve_layer(layer, states, None) for layer in layers)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        states = self.tail(self.head(self.prep.preprocess(x)), layer=None, embedding=False).hidden_states
        return states[self.indices[0]], states[self.indices[1]]


def multilevel_loss(levels: MultiLevel, weights: tuple[float, float, float], out: Tensor, x: Tensor,
                    teacher: tuple[Tensor, Tensor]) -> dict[str, Tensor]:
    """{"pixel", "shallow", "deep", "loss"}: the three MSEs and their weighted sum."""
    shallow, deep = levels(out)
    terms = {"pixel": F.mse_loss(out, x), "shallow": F.mse_loss(shallow, teacher[0]),
             "deep": F.mse_loss(deep, teacher[1])}
    terms["loss"] = sum(w * terms[k] for w, k in zip(weights, ("pixel", "shallow", "deep")))
    return terms


def _train(cfg: AdapterTrainConfig, runtime, state: dict | None, variable: bool) -> TrainResult:
    from comneck_cli.models.adapter import DecoderAdapter, adapter_registry_name
    from comneck_cli.coding.semantic import Guide

    device = runtime.device
    name = adapter_registry_name(cfg.codec, cfg.quality)
    register = None if cfg.register is None else cfg.register.format(name=name, codec=cfg.codec, quality=cfg.quality)
    run_dir = Path(cfg.run_dir) if cfg.run_dir else default_run_dir(cfg.output, register or name)
    batches = crop_batches(cfg, runtime)
    total = run_length(cfg, state, batches.per_epoch)

    # Entropy coding stays on the CPU (codecs.py's device policy); only g_a and g_s move.
    codec, model = load_frozen_codec(cfg.codec, cfg.quality, cfg.weights, state, torch.device("cpu"), "--weights")
    model.g_a.to(device)
    model.g_s.to(device)
    codec = replace(codec, device=device)
    digest = codec.digest.hex()

    ckpt.seed_everything(cfg.seed)
    clip = load_training_clip(cfg, device).requires_grad_(False)
    levels = MultiLevel(clip, cfg.layers).to(device)
    guide = Guide(clip) if cfg.semantic_strength else None
    adapter = DecoderAdapter(width=cfg.width, blocks=cfg.blocks).to(device).train()
    runtime.broadcast(adapter)
    optimizer = torch.optim.Adam(adapter.parameters(), lr=cfg.lr)
    draw = random.Random(cfg.seed * 1000 + runtime.rank)  # the rate of each step; saved with the checkpoint

    start, clock, final = 0, Clock(), {}
    if state is not None:
        adapter.load_state_dict(state["adapter"])
        optimizer.load_state_dict(state["optimizer"])
        start, clock, final = int(state["step"]), Clock(float(state["seconds"])), dict(state.get("final", {}))
        ckpt.restore_rng(runtime.own(state["rng"]))
        draw.setstate(_tuple_state(runtime.own(state["draw"])))

    metrics = Metrics(run_dir / "metrics.jsonl", runtime.main, None if state is None else start)
    means = Means()

    def save_checkpoint(step: int) -> None:
        rngs = runtime.gather(ckpt.capture_rng())
        draws = runtime.gather(draw.getstate())
        if runtime.main:
            ckpt.save(run_dir / "checkpoint.pt", {
                "kind": "adapter", "config": serialise(cfg), "adapter": adapter.state_dict(),
                "optimizer": optimizer.state_dict(), "step": step, "total": total, "rng": rngs, "draw": draws,
                "seconds": clock.seconds(), "world": runtime.world, "final": final, "start_digest": digest,
            })

    with progress(total, start, f"train adapter {cfg.codec}", runtime.main and not cfg.quiet) as advance:
        for step, x, _ in batches.iterate(start, total):
            x = x.to(device, non_blocking=True)
            rate = draw.uniform(*cfg.rates) if variable else None
            x_hat = reconstruct(codec, x, rate, guide, cfg.semantic_strength)
            with torch.no_grad(), runtime.autocast():
                teacher = levels(x)
            optimizer.zero_grad(set_to_none=True)
            with runtime.autocast():
                terms = multilevel_loss(levels, cfg.loss_weights, adapter(x_hat), x, teacher)
            check_finite(terms["loss"], step + 1, "adapter")
            terms["loss"].backward()
            runtime.average_gradients(adapter.parameters())
            optimizer.step()
            means.add({key: value.item() for key, value in terms.items()})
            done = step + 1
            advance(loss=terms["loss"].item())
            if done % cfg.log_every == 0 or done == total:
                final = means.take()
                metrics.log({"step": done, **final, "lr": cfg.lr, "seconds": round(clock.seconds(), 3)})
            if done % cfg.checkpoint_every == 0 and done < total:
                save_checkpoint(done)
    save_checkpoint(total)

    output = registered = None
    if runtime.main:
        output, registered = _export(cfg, adapter, codec, final, total, register)
    runtime.barrier()
    return TrainResult(output=output, registered=registered, run_dir=run_dir, steps=total, final=final,
                       extra={"codec_digest": digest})


def _tuple_state(saved: Any) -> tuple:
    """random.Random's state after a round trip through torch.save (lists where it had tuples)."""
    version, internal, gauss = saved
    return int(version), tuple(int(v) for v in internal), gauss


def _export(cfg: AdapterTrainConfig, adapter, codec, final: dict[str, float], total: int,
            register: str | None) -> tuple[Path | None, str | None]:
    from comneck_cli.models.adapter import AdapterInfo, save_adapter

    tag = str(clip_tag(cfg))
    info = AdapterInfo(codec=cfg.codec, codec_digest=codec.digest.hex(), clip_model=cfg.clip_model, clip_tag=tag,
                       layers=tuple(cfg.layers), loss_weights=tuple(cfg.loss_weights),
                       semantic_strength=float(cfg.semantic_strength), config=dict(adapter.config))
    registry_info = {"codec": cfg.codec, "codec_digest": info.codec_digest, "codec_weights": str(codec.source),
                     "clip_model": cfg.clip_model, "clip_tag": tag, "layers": list(cfg.layers),
                     "loss_weights": list(cfg.loss_weights), "rates": list(cfg.rates),
                     "semantic_strength": cfg.semantic_strength, "config": dict(adapter.config),
                     "trained_for": "decoder adapter: x_hat -> A -> MLLM, multi-level loss (CoTAM)",
                     "data": str(Path(cfg.data).resolve()), "steps": total, "final_losses": final}
    output, entry = publish(lambda path: save_adapter(adapter.eval(), path, info), ".safetensors", cfg.output,
                            register, "adapter", registry_info)
    return output, entry.name if entry else None
