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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from comneck_cli.codecs import Codec, CodecSpec, check_quality, get_spec, registry_name
from comneck_cli.errors import ComneckError
from comneck_cli.train import checkpoint as ckpt
from comneck_cli.train import gainmaps
from comneck_cli.train.config import RunConfig, resolve_run, setting
from comneck_cli.train.export import publish, write_codec
from comneck_cli.train.latents import latent_path, rate_bpp, variable_rate_path
from comneck_cli.train.loop import Runtime, check_finite, codec_step, crop_batches, default_run_dir, run_length
from comneck_cli.train.losses import ZOO_LAMBDAS, rd_loss
from comneck_cli.train.trainer import Progress, Run, TrainResult, train

DEFAULT_REGISTER = "{codec}-q{quality}"


@dataclass(kw_only=True)
class CodecTrainConfig(RunConfig):
    """What ``train_codec`` does; None means the setting's default (λ from ``losses.LAMBDAS``).

    ``config`` overrides the codec's constructor arguments (tiny models for tests); ``init`` starts from a
    codec file (its own constructor arguments then apply); ``init_pca``, a folder of photos, starts
    ``lapped-pca-vbr``'s linear paths at their blocks' principal components (``codecs.lapped``). ``warmup``:
    variable-rate codecs' single-rate steps.
    ``gain_maps``: the share of variable-rate steps coded at a spatially varying gain (``gainmaps``; default
    ``gainmaps.DEFAULT_FRACTION`` for variable-rate codecs, else 0), of strength up to ``gain_map_strength``;
    ``gain_map_source``: ``random`` only, as this run loads no CLIP.
    ``freeze``: parameter-name prefixes held fixed (``g_a``, ``g_s.linear``, …), for staged training: e.g. the
    entropy model first on ``lapped-pca-vbr``'s PCA transforms, then the residual branches on a fixed linear path.
    """

    codec: str | None = setting()
    quality: int | None = setting()
    steps: int | None = setting(trajectory=False)
    epochs: int | None = setting(trajectory=False)
    lr: float | None = setting(1e-4)
    aux_lr: float | None = setting(1e-3)
    clip_max_norm: float | None = setting(1.0)
    lmbda: float | None = setting()
    config: dict[str, Any] | None = setting()
    init: Path | None = setting()
    init_pca: Path | None = setting()
    warmup: int | None = setting()
    gain_maps: float | None = setting()
    gain_map_strength: float | None = setting(gainmaps.DEFAULT_MAX_STRENGTH)
    gain_map_source: str | None = setting("random")
    freeze: list[str] | None = setting()
    register: str | None = DEFAULT_REGISTER


def build_codec(spec: CodecSpec, quality: int, config: dict[str, Any] | None,
                init: Path | None, init_pca: Path | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """A trainable CompressAI model (float32, CPU) and its constructor arguments.

    From ``init`` (a codec file, or a CompressAI zoo checkpoint) or freshly initialised from the quality
    table updated with ``config``. With ``init``, a ``config`` that changes only M to a larger width widens the
    codec's latent, keeping what it computes (:func:`comneck_cli.train.widen.widen_latent`); any other change is
    refused.
    """
    if init is None:
        kwargs = {**_accepted(spec, spec.qualities[quality or max(spec.qualities)]), **(config or {})}
        try:
            model = spec.constructor()(**kwargs)
        except TypeError as exc:
            raise ComneckError(f"`config` {json.dumps(config)} does not fit {spec.name}: {exc}",
                               params=("config",)) from exc
        if init_pca is not None:
            _initialise_pca(model, Path(init_pca))
        return model, kwargs
    if init_pca is not None:
        raise ComneckError("`init_pca` starts a new codec; `init` continues a trained one: give one of them",
                           params=("init_pca", "init"))
    from comneck_cli.codecs import load_codec

    loaded = load_codec(spec.name, quality or max(spec.qualities), weights=Path(init))
    model, kwargs = loaded.model.cpu(), constructor_config(loaded)
    changed = {k for k, v in (config or {}).items() if kwargs.get(k) != v}
    if changed == {"M"} and isinstance(config["M"], int) and config["M"] > kwargs.get("M", config["M"]):
        from comneck_cli.train.widen import widen_latent

        return widen_latent(model, kwargs, config["M"]), {**kwargs, "M": config["M"]}
    if changed:
        raise ComneckError(f"`config` {json.dumps(config)} contradicts the architecture of `init` {init} "
                           f"({json.dumps(kwargs)}); drop `config`, or give only a larger M to widen it",
                           params=("config", "init"))
    return model, kwargs


def _initialise_pca(model: nn.Module, folder: Path) -> None:
    """``lapped-pca-vbr``'s linear paths from the principal components of the photos in ``folder``."""
    from comneck_cli.codecs.lapped import LappedPcaVbr, initialise_pca
    from comneck_cli.io.images import IMAGE_SUFFIXES, read_image

    if not isinstance(model, LappedPcaVbr):
        raise ComneckError("`init_pca` applies to lapped-pca-vbr only, whose g_a and g_s have a linear path",
                           params=("init_pca",))
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES) if folder.is_dir() else []
    images = [torch.from_numpy(read_image(p).copy()).permute(2, 0, 1).float().div(255)[None] for p in files]
    try:
        initialise_pca(model, images)
    except ValueError as exc:  # no photos, or too few blocks for M components
        raise ComneckError(f"`init_pca` {folder}: {exc}", params=("init_pca",)) from None


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


def freeze_parameters(model: nn.Module, prefixes: list[str], codec: str) -> None:
    """Hold the parameters whose names start with one of ``prefixes`` (whole dotted parts) fixed."""
    names = [n for n, _ in model.named_parameters()]
    for prefix in prefixes:
        if not any(n == prefix or n.startswith(prefix + ".") for n in names):
            modules = sorted({n.split(".")[0] for n in names})
            raise ComneckError(f"`freeze` {prefix!r} names no parameter of {codec}; its modules are "
                               f"{', '.join(modules)}", params=("freeze",))
    for name, parameter in model.named_parameters():
        if any(name == p or name.startswith(p + ".") for p in prefixes):
            parameter.requires_grad_(False)


def split_parameters(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """CompressAI's ``net_aux`` split: (every parameter but the bottlenecks' quantiles, the quantiles), by name."""
    named = sorted((n, p) for n, p in model.named_parameters() if p.requires_grad)
    return ([p for n, p in named if not n.endswith(".quantiles")], [p for n, p in named if n.endswith(".quantiles")])


def _resolve(cfg: CodecTrainConfig) -> dict[str, Any] | None:
    """Fill defaults; on resume take the trajectory from the checkpoint. Returns the checkpoint state."""
    state = resolve_run(cfg, "codec", "train codec")
    spec = get_spec(cfg.codec)
    if cfg.warmup and not spec.variable_rate:
        raise ComneckError("`warmup` applies to variable-rate codecs only", params=("warmup",))
    if spec.variable_rate and (cfg.quality is not None or cfg.lmbda is not None):
        raise ComneckError(f"{cfg.codec} is variable-rate: it trains every level at once, each at its own λ "
                           f"({', '.join(f'{l:g}' for l in ZOO_LAMBDAS)}); drop `quality`/`lmbda`",
                           params=("quality", "lmbda"))
    if not spec.variable_rate:
        check_quality(spec, cfg.quality)
    if cfg.gain_maps is None:  # a run from before gain maps resumes without them
        cfg.gain_maps = gainmaps.DEFAULT_FRACTION if spec.variable_rate and state is None else 0.0
    gainmaps.check_settings(cfg.gain_maps, cfg.gain_map_strength, cfg.gain_map_source, spec.variable_rate, False)
    return state


def level_for_step(seed: int, step: int, levels: int) -> int:
    """The level a variable-rate step trains: a function of (seed, step) only, so a resumed run draws the same."""
    import random

    return random.Random(seed * 1_000_003 + step).randrange(levels)


def train_codec(cfg: CodecTrainConfig, on_progress: Progress | None = None) -> TrainResult:
    """Train (or resume training) a codec for human perception; export and register it. See the module doc.

    ``on_progress(done, total)`` follows the steps.
    """
    state = _resolve(cfg)
    return train(cfg, lambda runtime: CodecRun(cfg, runtime, state), on_progress)


class CodecRun(Run):
    """R + λ·255²·MSE on the codec (a variable-rate codec: at each step's level, after the warm-up)."""

    kind = "codec"

    def __init__(self, cfg: CodecTrainConfig, runtime: Runtime, state: dict[str, Any] | None):
        self.cfg, self.runtime, self.state = cfg, runtime, state
        self.spec = spec = get_spec(cfg.codec)
        self.name = registry_name(cfg.codec, cfg.quality)
        self.register = None if cfg.register is None else cfg.register.format(codec=cfg.codec, quality=cfg.quality)
        if spec.variable_rate and cfg.register == DEFAULT_REGISTER:
            self.register = self.name
        self.run_dir = Path(cfg.run_dir) if cfg.run_dir else default_run_dir(cfg.output, self.register or self.name)
        self.batches = crop_batches(cfg, runtime)
        self.total = run_length(cfg, state, self.batches.per_epoch)

        ckpt.seed_everything(cfg.seed)
        pca = cfg.init_pca if state is None else None  # a resumed run loads its weights: no photos needed
        self.model, self.model_config = build_codec(spec, cfg.quality, cfg.config, cfg.init, pca)
        freeze_parameters(self.model, cfg.freeze or [], cfg.codec)
        self.model.to(runtime.device).train()
        runtime.broadcast(self.model)
        self.net_params, aux_params = split_parameters(self.model)
        self.optimizer = torch.optim.Adam(self.net_params, lr=cfg.lr)
        self.aux_optimizer = torch.optim.Adam(aux_params, lr=cfg.aux_lr)
        self.maps = gainmaps.GainMaps(self.model, cfg.seed, fraction=cfg.gain_maps,
                                      max_strength=cfg.gain_map_strength, source=cfg.gain_map_source)

    def saved(self) -> dict[str, Any]:
        return {"model": self.model, "optimizer": self.optimizer, "aux_optimizer": self.aux_optimizer}

    def plain(self) -> dict[str, Any]:
        return {"model_config": self.model_config}

    def describe(self, step: int) -> dict[str, Any]:
        return {"stage": "rd", "lr": self.optimizer.param_groups[0]["lr"]}

    def step(self, step: int, x: Tensor, labels: Tensor) -> dict[str, float]:
        cfg, model, runtime = self.cfg, self.model, self.runtime
        self.optimizer.zero_grad(set_to_none=True)
        self.aux_optimizer.zero_grad(set_to_none=True)
        level = level_for_step(cfg.seed, step, model.levels) if self.spec.variable_rate else None
        warming = level is not None and step < (cfg.warmup or 0)
        if warming:
            level = model.levels - 1  # Kamisli et al.'s stage 1: the single-rate path at the top level's λ
        gains = None if level is None or warming else self.maps(step, x, level + 1.0)
        if level is None:
            with runtime.autocast():
                latents = latent_path(model, self.spec.family, x, "noise")
                x_hat, likelihoods = model.g_s(latents.y_hat).float(), latents.likelihoods
        elif gains is not None:  # the rate's level, its gain varying over the grid as ``--semantic`` codes
            with runtime.autocast_transforms(model):
                latents = variable_rate_path(model, x, gains)
                x_hat, likelihoods = model.g_s(latents.y_hat), latents.likelihoods
        else:
            with runtime.autocast_transforms(model):
                out = model(x, stage=1 if warming else 2, s=level)
            x_hat, likelihoods = out["x_hat"], out["likelihoods"]
        bpp = rate_bpp(likelihoods, x.shape[0] * x.shape[2] * x.shape[3])
        weights = None if gains is None else self.maps.pixel_weights(gains, level + 1.0)
        loss, mse = rd_loss(bpp, x_hat, x, cfg.lmbda if level is None else model.lmbda[level], weights)
        check_finite(loss, step + 1, "rate-distortion")
        loss.backward()
        aux = codec_step(runtime, model, self.net_params, self.optimizer, self.aux_optimizer, cfg.clip_max_norm)
        return {"loss": loss.item(), "bpp": bpp.item(), "mse": mse.item(), "aux": aux, "gain_map": float(gains is not None)}

    def export(self, final: dict[str, float]) -> tuple[Path | None, str | None, dict[str, Any]]:
        cfg, model, variable_rate = self.cfg, self.model, self.spec.variable_rate
        info = {
            "codec": cfg.codec, "quality": cfg.quality, "trained_for": "human perception: R + λ·255²·MSE",
            "lmbda": list(model.lmbda) if variable_rate else cfg.lmbda, "data": str(Path(cfg.data).resolve()),
            "steps": self.total, "final_losses": final, "config": self.model_config,
            "init": None if cfg.init is None else str(cfg.init), "machine_only": False,
            "init_pca": None if cfg.init_pca is None else str(cfg.init_pca),
            "gain_maps": cfg.gain_maps, "gain_map_strength": cfg.gain_map_strength,
            "gain_map_source": cfg.gain_map_source, "freeze": cfg.freeze,
        }
        model.eval()
        quality = 0 if variable_rate else cfg.quality  # 0: every level
        output, entry = publish(lambda path: write_codec(model, path, cfg.codec, quality, self.model_config),
                                ".safetensors", cfg.output, self.register, "codec", info)
        return output, entry.name if entry else None, {}
