"""``comneck train codec``: rate-distortion training for human perception, CompressAI's way.

Loss R + λ·255²·MSE(x, x̂) (``compressai.losses.RateDistortionLoss``), R in bits per pixel from the
likelihoods of ``y_hat`` and ``z_hat``. As in CompressAI's ``examples/train.py``: Adam on every
parameter but the entropy bottlenecks' ``quantiles`` (lr 1e-4, gradient norm clipped at 1.0), and a second
Adam (lr 1e-3) on the ``quantiles`` alone minimising ``model.aux_loss()``, so the bottleneck's coding
range follows its densities. The trained codec is exported with its entropy tables (``save_codec``) and
registered as ``{codec}-q{quality}``, where ``encode``/``decode`` find it.

A variable-rate codec (``mbt2018-mean-vbr``) is one model for every level: each step draws a level s
(reproducibly from the seed and step number, so resumed runs draw the same), runs CompressAI's
variable-rate path (``stage=2``: latents scaled by the level's gain, straight-through rounding, noisy
likelihoods) and weighs distortion by that level's λ; the file is registered under the codec's bare name.
``warmup`` steps first train the single-rate path (noisy latents, no gain) at the top level's λ, as Kamisli et
al. do before the variable-rate stage: from scratch, the levels' opposing λ otherwise slow the transforms down.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from comneck_cli.codecs import Codec, CodecSpec, check_quality, get_spec, registry_name
from comneck_cli.errors import ComneckError
from comneck_cli.train import checkpoint as ckpt
from comneck_cli.train.export import publish, write_codec
from comneck_cli.train.latents import latent_path, rate_bpp
from comneck_cli.train.losses import ZOO_LAMBDAS, rd_loss
from comneck_cli.train.loop import (Clock, Means, Metrics, RunConfig, Runtime, check_finite, codec_step, crop_batches,
                   default_run_dir, progress, resolve_run, run_length, serialise, setup_runtime, teardown)

DEFAULT_REGISTER = "{codec}-q{quality}"
CODEC_DEFAULTS = {"batch_size": 8, "crop": 256, "seed": 0, "lr": 1e-4, "aux_lr": 1e-3, "clip_max_norm": 1.0}


@dataclass(kw_only=True)
class CodecTrainConfig(RunConfig):
    """What ``train_codec`` does; None means the default (``CODEC_DEFAULTS``, λ from ``losses.LAMBDAS``).

    ``config`` overrides the codec's constructor arguments (tiny models for tests); ``init`` starts from a
    codec file (its own constructor arguments then apply).
    """

    codec: str | None = None
    quality: int | None = None
    steps: int | None = None
    epochs: int | None = None
    lr: float | None = None
    aux_lr: float | None = None
    clip_max_norm: float | None = None
    lmbda: float | None = None
    config: dict[str, Any] | None = None
    init: Path | None = None
    warmup: int | None = None
    register: str | None = DEFAULT_REGISTER


TRAJECTORY = ("codec", "quality", "config", "init", "lmbda", "lr", "aux_lr", "clip_max_norm", "batch_size",
              "crop", "seed", "warmup")


@dataclass
class TrainResult:
    """Where a run's outputs went, how long it ran and its last logged losses."""

    output: Path | None
    registered: str | None
    run_dir: Path
    steps: int
    final: dict[str, float] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)


def build_codec(spec: CodecSpec, quality: int, config: dict[str, Any] | None,
                init: Path | None) -> tuple[nn.Module, dict[str, Any]]:
    """A trainable CompressAI model (float32, CPU) and its constructor arguments.

    From ``init`` (a codec file, or a CompressAI zoo checkpoint) or freshly initialised from the quality
    table updated with ``config``.
    """
    if init is None:
        kwargs = {**_accepted(spec, spec.qualities[quality or max(spec.qualities)]), **(config or {})}
        try:
            return spec.constructor()(**kwargs), kwargs
        except TypeError as exc:
            raise ComneckError(f"--config {json.dumps(config)} does not fit {spec.name}: {exc}") from exc
    from comneck_cli.codecs import load_codec

    loaded = load_codec(spec.name, quality or max(spec.qualities), weights=Path(init))
    model, kwargs = loaded.model.cpu(), constructor_config(loaded)
    if config and any(kwargs.get(k) != v for k, v in config.items()):
        raise ComneckError(
            f"--config {json.dumps(config)} contradicts the architecture of --init {init} ({json.dumps(kwargs)}); "
            "drop --config"
        )
    return model, kwargs


def constructor_config(loaded: Codec) -> dict[str, Any]:
    """The constructor arguments of a loaded codec: from a comneck file's metadata, else its N and M."""
    from comneck_cli.codecs import weights_info

    meta = weights_info(loaded.source)
    if "config" in meta:
        return json.loads(meta["config"])
    if hasattr(loaded.model, "N") and hasattr(loaded.model, "M"):
        return _accepted(loaded.spec, {"N": int(loaded.model.N), "M": int(loaded.model.M)})
    return _accepted(loaded.spec, loaded.spec.qualities[loaded.quality])


def _accepted(spec: CodecSpec, kwargs: dict[str, Any]) -> dict[str, Any]:
    """Drop quality-table keys the constructor does not name (cheng2020 takes N only; its table also lists M)."""
    import inspect

    names = inspect.signature(spec.constructor().__init__).parameters
    return {k: v for k, v in kwargs.items() if k in names}


def split_parameters(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """CompressAI's ``net_aux`` split: (every parameter but the bottlenecks' quantiles, the quantiles), by name."""
    named = sorted((n, p) for n, p in model.named_parameters() if p.requires_grad)
    return ([p for n, p in named if not n.endswith(".quantiles")], [p for n, p in named if n.endswith(".quantiles")])


def _resolve(cfg: CodecTrainConfig) -> dict[str, Any] | None:
    """Fill defaults; on resume take the trajectory from the checkpoint. Returns the checkpoint state."""
    state = resolve_run(cfg, "codec", TRAJECTORY, CODEC_DEFAULTS, "train codec")
    spec = get_spec(cfg.codec)
    if cfg.warmup and not spec.variable_rate:
        raise ComneckError("--warmup-steps applies to variable-rate codecs only")
    if spec.variable_rate and (cfg.quality is not None or cfg.lmbda is not None):
        raise ComneckError(f"{cfg.codec} is variable-rate: it trains every level at once, each at its own λ "
                           f"({', '.join(f'{l:g}' for l in ZOO_LAMBDAS)}); drop -q/--lmbda")
    return state


def level_for_step(seed: int, step: int, levels: int) -> int:
    """The level a variable-rate step trains: a function of (seed, step) only, so a resumed run draws the same."""
    import random

    return random.Random(seed * 1_000_003 + step).randrange(levels)


def train_codec(cfg: CodecTrainConfig) -> TrainResult:
    """Train (or resume training) a codec for human perception; export and register it. See the module doc."""
    state = _resolve(cfg)
    spec = get_spec(cfg.codec)
    if not spec.variable_rate:
        check_quality(spec, cfg.quality)
    runtime = setup_runtime(cfg.device, cfg.precision)
    try:
        return _train(cfg, spec, runtime, state)
    finally:
        teardown(runtime)


def _train(cfg: CodecTrainConfig, spec: CodecSpec, runtime: Runtime, state: dict | None) -> TrainResult:
    name = registry_name(cfg.codec, cfg.quality)
    register = None if cfg.register is None else cfg.register.format(codec=cfg.codec, quality=cfg.quality)
    if spec.variable_rate and cfg.register == DEFAULT_REGISTER:
        register = name
    run_dir = Path(cfg.run_dir) if cfg.run_dir else default_run_dir(cfg.output, register or name)
    batches = crop_batches(cfg, runtime)
    total = run_length(cfg, state, batches.per_epoch)

    ckpt.seed_everything(cfg.seed)
    model, model_config = build_codec(spec, cfg.quality, cfg.config, cfg.init)
    model.to(runtime.device).train()
    runtime.broadcast(model)
    net_params, aux_params = split_parameters(model)
    optimizer = torch.optim.Adam(net_params, lr=cfg.lr)
    aux_optimizer = torch.optim.Adam(aux_params, lr=cfg.aux_lr)
    start, clock = 0, Clock()
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        aux_optimizer.load_state_dict(state["aux_optimizer"])
        start, clock = int(state["step"]), Clock(float(state["seconds"]))
        ckpt.restore_rng(runtime.own(state["rng"]))
    elif runtime.rank:
        torch.manual_seed(cfg.seed + runtime.rank)  # different quantisation noise per rank

    metrics = Metrics(run_dir / "metrics.jsonl", runtime.main, None if state is None else start)
    means = Means()
    final: dict[str, float] = dict(state.get("final", {})) if state else {}

    def save_checkpoint(step: int) -> None:
        rngs = runtime.gather(ckpt.capture_rng())
        if runtime.main:
            ckpt.save(run_dir / "checkpoint.pt", {
                "kind": "codec", "config": serialise(cfg), "model_config": model_config, "model": model.state_dict(),
                "optimizer": optimizer.state_dict(), "aux_optimizer": aux_optimizer.state_dict(), "step": step,
                "total": total, "rng": rngs, "seconds": clock.seconds(), "world": runtime.world, "final": final,
            })

    with progress(total, start, f"train {name}", runtime.main and not cfg.quiet) as advance:
        for step, x, _ in batches.iterate(start, total):
            x = x.to(runtime.device, non_blocking=True)
            optimizer.zero_grad(set_to_none=True)
            aux_optimizer.zero_grad(set_to_none=True)
            level = level_for_step(cfg.seed, step, model.levels) if spec.variable_rate else None
            warming = level is not None and step < (cfg.warmup or 0)
            if warming:
                level = model.levels - 1  # Kamisli et al.'s stage 1: the single-rate path at the top level's λ
            if level is None:
                with runtime.autocast():
                    latents = latent_path(model, spec.family, x, "noise")
                    x_hat, likelihoods = model.g_s(latents.y_hat).float(), latents.likelihoods
            else:
                with runtime.autocast_transforms(model):
                    out = model(x, stage=1 if warming else 2, s=level)
                x_hat, likelihoods = out["x_hat"], out["likelihoods"]
            bpp = rate_bpp(likelihoods, x.shape[0] * x.shape[2] * x.shape[3])
            loss, mse = rd_loss(bpp, x_hat, x, cfg.lmbda if level is None else model.lmbda[level])
            check_finite(loss, step + 1, "rate-distortion")
            loss.backward()
            aux = codec_step(runtime, model, net_params, optimizer, aux_optimizer, cfg.clip_max_norm)

            values = {"loss": loss.item(), "bpp": bpp.item(), "mse": mse.item(), "aux": aux}
            means.add(values)
            done = step + 1
            advance(loss=values["loss"], bpp=values["bpp"])
            if done % cfg.log_every == 0 or done == total:
                final = means.take()
                metrics.log({"step": done, "stage": "rd", **final, "lr": optimizer.param_groups[0]["lr"],
                             "seconds": round(clock.seconds(), 3)})
            if done % cfg.checkpoint_every == 0 and done < total:
                save_checkpoint(done)
    save_checkpoint(total)

    output = entry = None
    if runtime.main:
        info = {
            "codec": cfg.codec, "quality": cfg.quality, "trained_for": "human perception: R + λ·255²·MSE",
            "lmbda": list(model.lmbda) if spec.variable_rate else cfg.lmbda, "data": str(Path(cfg.data).resolve()), "steps": total, "final_losses": final,
            "config": model_config, "init": None if cfg.init is None else str(cfg.init), "machine_only": False,
        }
        model.eval()
        quality = 0 if spec.variable_rate else cfg.quality  # 0: every level
        output, entry = publish(lambda path: write_codec(model, path, cfg.codec, quality, model_config),
                                ".safetensors", cfg.output, register, "codec", info)
    runtime.barrier()
    return TrainResult(output=output, registered=entry.name if entry else None, run_dir=run_dir, steps=total,
                       final=final)
