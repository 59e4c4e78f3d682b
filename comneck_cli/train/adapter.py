"""``comneck train adapter``: CoTAM's decoder adapter A on a frozen codec and a frozen CLIP, with CoTAM's loss.

    x -> frozen codec (at a random rate R in ``rates``; semantic records with ``semantic_strength``) -> y_hat, x_hat
    student:  S = C_{1..L}(E(x_hat) + A(y_hat))          teacher:  C(x)
    L = w_s · mean_t,c( m_t · (S_s[t, c] − C_s(x)[t, c])² ) + [after the warm-up] w_f · MSE(S_emb, C_emb(x))

E is C's embedding (layer-0 tokens, after ``ln_pre``), C_s the shallow hidden state ``shallow_layer`` (Hugging Face
numbering; default 0, the layer-0 tokens themselves), C_emb the projected image embedding (``encode_image``). m is the
importance weight of token t: the semantic importance map of x (:meth:`Guide.importance`, CLIP block 2's class-token
attention: the map semantic coding allocates bits with) brought bilinearly to CLIP's token grid and divided by its
maximum, the class token weighted 1. For ``warmup_epochs`` epochs only the shallow term trains A; then both.

What this follows in the authors' code (jmliu206/CoTAM): ``losses.py`` ``MultiLevelClipLoss``: ``clip_layer1_distill``
is ``(F.mse_loss(student.all_layer_tokens[0], teacher.all_layer_tokens[0], reduction="none") * weights).mean() *
layer1`` with ``layer1 = 0.1`` and ``weights = masks.token_mask(mask, ...)`` (the coding mask bilinearly resized to
the token grid, divided by its maximum, a class-token weight of 1 prepended), ``clip_feature_distill`` is
``F.mse_loss(student.image_features, teacher.image_features)``; ``select_loss_names(mode="low_then_low_high",
warmup_epochs=5)`` gives the shallow term alone for ``epoch < warmup_epochs``, then both; the config
(``configs/cotam_elic_clip_adapter.yaml``) trains at lr 5e-4, batch 8, 384-px images for ViT-L/14@336. Random quality masks,
as CoTAM's ``train_adapter.run_batch`` (``mask = mask_provider(images)`` once per batch, the codec run at it, the same
mask the loss's token weights): a share ``gain_maps`` of the steps (default every step; half with
``semantic_strength``, whose semantic records, weighted by the CLIP map, fill the rest) draws one mask for the
whole batch (:func:`gainmaps.quality_mask`, CoTAM's uniform / patch / gradient modes over 10 levels) and a strength S
~ U[0, ``gain_map_strength``]; every image is coded at the gain map a ``--semantic`` record carries for that mask
(``semantic.quantise`` and ``gain_map``: g = g_R·2^(S·(m − m̄)) around the step's rate R, so the mask's uniform
level is R), and the quantised mask is the token weights. Where comneck differs, and why: the mask lives on the
record map's cells (2×2 latent positions) instead of single positions, since records carry no finer map; a uniform
mask weighs every token 1 (CoTAM's ``token_mask`` weighs level 0 patches 0); their common
factor ``total = 11.52`` is left out (with Adam a constant factor on the whole loss changes nothing but ε's weight);
and their published ``train_loop`` passes ``epoch=0`` to every batch, so it never leaves the warm-up; here the
schedule is applied. ``all_layer_tokens[0]`` is the layer-0 tokens if their ``CLIP_modify`` (not in the repository)
keeps ComNeck's ``Transformer.forward`` (``out = [x]``, the block input, first): hence ``shallow_layer = 0``.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from comneck_cli.clip.preprocess import ClipPreprocess
from comneck_cli.errors import UsageError
from comneck_cli.train import checkpoint as ckpt
from comneck_cli.train import gainmaps
from comneck_cli.train.config import RunConfig, resolve_run, setting
from comneck_cli.train.export import publish
from comneck_cli.train.latents import rate_for_step
from comneck_cli.train.loop import Runtime, check_finite, crop_batches, default_run_dir, run_length
from comneck_cli.train.neck import clip_record, load_frozen_codec, load_training_clip
from comneck_cli.train.trainer import Progress, Run, TrainResult, train


_MASK_STREAM = 0x3C7  # keeps the masks' draws apart from the rate's (same seed and step)


@dataclass(kw_only=True)
class AdapterTrainConfig(RunConfig):
    """What ``train_adapter`` does; None means the setting's default.

    ``rates``: (low, high) range R is drawn from per step for a variable-rate codec (a fixed-rate codec codes at
    ``quality``). ``shallow_layer``: the hidden state of the importance-weighted term (HF numbering). ``loss_weights``:
    (shallow, final embedding). ``warmup_epochs``: epochs (fractions allowed) trained on the shallow term alone.
    ``semantic_strength`` > 0 trains on semantic records guided by the same CLIP. ``gain_maps``: the share of steps
    coded at a random CoTAM quality mask (default 1, or 0.5 with ``semantic_strength``; 0 for fixed-rate codecs),
    ``gain_map_strength`` its largest S. ``crop`` defaults to 16 × CLIP's token grid, so y_hat's grid is CLIP's
    (ViT-L/14: 256). ``clip_tag`` ``"none"`` builds a random CLIP (tests).
    """

    codec: str | None = setting()
    quality: int | None = setting()
    weights: Path | None = setting()
    clip_model: str | None = setting("ViT-L-14")
    clip_tag: str | None = setting("openai")
    clip_weights: Path | None = setting()
    rates: tuple[float, float] | None = setting((1.0, 8.0))
    shallow_layer: int | None = setting(0)
    loss_weights: tuple[float, float] | None = setting((0.1, 1.0))
    warmup_epochs: float | None = setting(5.0)
    semantic_strength: float | None = setting(0.0)
    gain_maps: float | None = setting()  # resolved in _resolve: it depends on the codec and semantic_strength
    gain_map_strength: float | None = setting(gainmaps.DEFAULT_MAX_STRENGTH)
    crop: int | None = setting()  # default_crop(clip_model), filled before the run resolves
    steps: int | None = setting(trajectory=False)
    epochs: int | None = setting(trajectory=False)
    lr: float | None = setting(5e-4)
    register: str | None = "{name}"

    lmbda: ClassVar[float] = 0.0  # no rate term; ``resolve_run`` fills λ only where it is None


def default_crop(clip_model: str) -> int:
    """16 pixels per CLIP token: the crop whose latent grid is CLIP's token grid (ViT-L-14: 256, -336: 384)."""
    import open_clip

    config = open_clip.get_model_config(clip_model.replace("/", "-"))
    if config is None:
        raise UsageError(f"unknown CLIP model {clip_model!r}; use an open_clip model name such as ViT-L-14",
                         params=("clip_model",))
    vision = config["vision_cfg"]
    return 16 * (int(vision["image_size"]) // int(vision["patch_size"]))


def _resolve(cfg: AdapterTrainConfig) -> tuple[dict[str, Any] | None, bool]:
    from comneck_cli.codecs import check_quality, check_rate, get_spec

    variable = cfg.codec is not None and get_spec(cfg.codec).variable_rate
    if variable and cfg.quality is None:
        cfg.quality = min(get_spec(cfg.codec).qualities)  # the rate is drawn per step; quality only names the load
    if cfg.resume is None and cfg.crop is None:
        cfg.crop = default_crop(cfg.clip_model or "ViT-L-14")
    state = resolve_run(cfg, "adapter", "train adapter")
    variable = get_spec(cfg.codec).variable_rate  # a resumed run names its codec only now
    if cfg.gain_maps is None:  # CoTAM: a random mask every batch; semantic records need steps of their own
        resumed_without = state is not None and "gain_maps" not in state["config"]  # a run from before the masks
        cfg.gain_maps = 0.0 if resumed_without or not variable else 0.5 if cfg.semantic_strength else 1.0
    check_quality(get_spec(cfg.codec), cfg.quality)
    for name, count in (("rates", 2), ("loss_weights", 2)):
        value = tuple(getattr(cfg, name))
        if len(value) != count:
            raise UsageError(f"`{name}` takes {count} comma-separated numbers, got {len(value)}", params=(name,))
        setattr(cfg, name, value)
    if min(cfg.loss_weights) < 0 or not cfg.loss_weights[0] > 0:
        raise UsageError(f"`loss_weights` {cfg.loss_weights} must be non-negative with a positive shallow weight "
                         "(the warm-up trains on the shallow term alone)", params=("loss_weights",))
    if not cfg.warmup_epochs >= 0:
        raise UsageError(f"`warmup_epochs` {cfg.warmup_epochs} must be 0 or more", params=("warmup_epochs",))
    if variable:
        cfg.rates = tuple(check_rate(get_spec(cfg.codec), r) for r in sorted(cfg.rates))
    if cfg.semantic_strength and not variable:
        raise UsageError(f"`semantic_strength` needs a variable-rate codec, not {cfg.codec}",
                         params=("semantic_strength",))
    gainmaps.check_settings(cfg.gain_maps, cfg.gain_map_strength, "random", variable, True)
    return state, variable


def train_adapter(cfg: AdapterTrainConfig, on_progress: Progress | None = None) -> TrainResult:
    """Train (or resume) the decoder adapter of a codec; export and register it. ``on_progress(done, total)``."""
    state, variable = _resolve(cfg)
    return train(cfg, lambda runtime: AdapterRun(cfg, runtime, state, variable), on_progress)


@torch.no_grad()
def reconstruct(codec, x: Tensor, rate: float | None, guide, strength: float = 0.0,
                mask: tuple[np.ndarray, float] | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """(x_hat, y_hat, importance) of x coded at ``rate``, on x's device: x_hat as ``decode`` writes it (8-bit),
    y_hat as the decoder recovers it, and the guide's importance map of each image on the y grid (B, h, w), which
    also steers the bits when ``strength`` > 0 (semantic records). With ``mask`` (a quality mask on the y grid in
    [0, 1] and its strength S) every image is coded at that mask's gain map instead, and the importance returned is
    the mask as the record quantises it. Each image is entropy-coded on its own, as ``encode`` codes it, so A learns
    from the decoder's real latents and reconstructions."""
    from comneck_cli.coding.semantic import gain_map, levels_on_grid, quantise

    at = codec if rate is None else codec.at_rate(rate)
    y = at.analyze(x)
    y_hats, maps = [], []
    for i in range(y.shape[0]):
        image = x[i].mul(255).round().byte().permute(1, 2, 0).cpu().numpy()
        gain = None
        if mask is not None:
            imap = quantise(mask[0], *image.shape[:2], mask[1])
            gain = gain_map(at.model, at.rate, imap, tuple(y.shape[-2:]))
            importance = levels_on_grid(imap, tuple(y.shape[-2:]))
        else:
            importance = guide.importance(image)
        if strength and mask is None:
            imap = quantise(importance, *image.shape[:2], strength)
            gain = gain_map(at.model, at.rate, imap, tuple(y.shape[-2:]))
        y_hats.append(at.code(y[i : i + 1], gain=gain)[1])
        maps.append(torch.from_numpy(importance).float())
    y_hat = torch.cat(y_hats)
    x_hat = at.synthesize(y_hat).float().mul(255).round().div(255)
    # clone: normal tensors, outside inference mode
    return x_hat.clone().to(x.device), y_hat.clone().to(x.device), torch.stack(maps).to(x.device)


def token_weights(importance: Tensor, grid: tuple[int, int]) -> Tensor:
    """Importance (B, h, w) on the latent grid -> weights m (B, 1 + gh·gw) of CLIP's tokens, as CoTAM's
    ``masks.token_mask``: bilinear to the token grid, each image's divided by its maximum, the class token 1. A map
    with no maximum (flat attention) weighs every token 1."""
    m = F.interpolate(importance[:, None].float(), size=tuple(grid), mode="bilinear", align_corners=False).flatten(1)
    top = m.amax(dim=1, keepdim=True)
    m = torch.where(top > 0, m / top.clamp_min(torch.finfo(m.dtype).tiny), torch.ones_like(m))
    return torch.cat([torch.ones_like(m[:, :1]), m], dim=1)


class CotamLoss(torch.nn.Module):
    """CoTAM's loss around a frozen CLIP C split at k = 0: E (the embedding) and C_{1..L} with its pooling."""

    def __init__(self, clip: torch.nn.Module, shallow_layer: int, weights: tuple[float, float]):
        super().__init__()
        from comneck_cli.clip.tower import resolve_layer, split_clip

        self.head, self.tail = split_clip(clip, 0)
        self.prep = ClipPreprocess(clip)  # C's resize + normalisation, as the neck's teacher
        self.shallow = resolve_layer(shallow_layer, len(self.tail.blocks.resblocks) + 1, None)
        self.weights = tuple(weights)

    def embed(self, images: Tensor) -> Tensor:
        """E(images in [0, 1]): the layer-0 tokens."""
        return self.head.embed(self.prep(images))

    def levels(self, tokens: Tensor) -> tuple[Tensor, Tensor]:
        """(C_s, C_emb) of layer-0 tokens."""
        out = self.tail(tokens, layer=self.shallow, embedding=True)
        return out.hidden_states[self.shallow], out.embedding

    @torch.no_grad()
    def teacher(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self.levels(self.embed(x))

    def forward(self, adapter, y_hat: Tensor, x_hat: Tensor, m: Tensor, teacher: tuple[Tensor, Tensor],
                final: bool) -> dict[str, Tensor]:
        """{"shallow", "final", "loss"}: the importance-weighted shallow MSE, the final-embedding MSE and
        w_s·shallow (+ w_f·final when ``final``, i.e. after the warm-up)."""
        shallow, embedding = self.levels(adapter(y_hat, self.embed(x_hat)))
        terms = {"shallow": (F.mse_loss(shallow, teacher[0], reduction="none") * m[..., None]).mean(),
                 "final": F.mse_loss(embedding, teacher[1])}
        terms["loss"] = self.weights[0] * terms["shallow"] + (self.weights[1] * terms["final"] if final else 0.0)
        return terms


class AdapterRun(Run):
    """A on a frozen codec and a frozen CLIP, CoTAM's loss, one Adam stage; the warm-up is the first
    ``round(warmup_epochs · steps per epoch)`` steps."""

    kind = "adapter"

    def __init__(self, cfg: AdapterTrainConfig, runtime: Runtime, state: dict[str, Any] | None, variable: bool):
        from comneck_cli.coding.semantic import Guide
        from comneck_cli.models.adapter import DecoderAdapter, adapter_registry_name

        self.cfg, self.runtime, self.state, self.variable = cfg, runtime, state, variable
        device = runtime.device
        name = adapter_registry_name(cfg.codec, cfg.quality)
        self.register = None if cfg.register is None else cfg.register.format(name=name, codec=cfg.codec,
                                                                                 quality=cfg.quality)
        self.run_dir = Path(cfg.run_dir) if cfg.run_dir else default_run_dir(cfg.output, self.register or name)
        self.batches = crop_batches(cfg, runtime)
        self.total = run_length(cfg, state, self.batches.per_epoch)
        self.warmup = round(cfg.warmup_epochs * self.batches.per_epoch)

        # Entropy coding stays on the CPU (codecs' device policy); only g_a and g_s move.
        codec, model = load_frozen_codec(cfg.codec, cfg.quality, cfg.weights, state, torch.device("cpu"), "weights")
        model.g_a.to(device)
        model.g_s.to(device)
        self.codec = replace(codec, device=device)

        ckpt.seed_everything(cfg.seed)
        clip = load_training_clip(cfg, device).requires_grad_(False)
        self.loss = CotamLoss(clip, cfg.shallow_layer, cfg.loss_weights).to(device)
        self.guide = Guide(clip)
        self.adapter = DecoderAdapter.for_clip(clip, codec.latent_channels).to(device).train()
        runtime.broadcast(self.adapter)
        self.optimizer = torch.optim.Adam(self.adapter.parameters(), lr=cfg.lr)

    def saved(self) -> dict[str, Any]:
        return {"adapter": self.adapter, "optimizer": self.optimizer}

    def plain(self) -> dict[str, Any]:
        return {"start_digest": self.codec.digest.hex()}

    def describe(self, step: int) -> dict[str, Any]:
        return {"warmup": step < self.warmup, "lr": self.cfg.lr}

    def quality_mask(self, step: int, height: int, width: int) -> tuple[str, np.ndarray, float] | None:
        """The step's random quality mask, one for the whole batch as CoTAM draws it: (mode, mask on the y grid in
        [0, 1], strength S), or None for a step without one. A function of (seed, step): a resume draws the same."""
        from comneck_cli.coding.semantic import MAP_BLOCK, Y_STRIDE
        from comneck_cli.formats import ImportanceMap

        draw = random.Random((self.cfg.seed * 1_000_003 + step) * _MASK_STREAM)
        if not self.cfg.gain_maps or draw.random() >= self.cfg.gain_maps:
            return None
        cells = ImportanceMap.grid(height, width, MAP_BLOCK)
        mode, mask = gainmaps.quality_mask(torch.Generator().manual_seed(draw.getrandbits(62)), cells)
        on_y = mask.repeat(MAP_BLOCK, axis=0).repeat(MAP_BLOCK, axis=1)[: height // Y_STRIDE, : width // Y_STRIDE]
        return mode, on_y, draw.uniform(0, self.cfg.gain_map_strength)

    def step(self, step: int, x: Tensor, labels: Tensor) -> dict[str, float]:
        from comneck_cli.models.adapter import latent_view

        cfg, adapter = self.cfg, self.adapter
        rate = rate_for_step(cfg.seed, step, *cfg.rates) if self.variable else None
        drawn = self.quality_mask(step, x.shape[-2], x.shape[-1]) if self.variable else None
        mask = None if drawn is None else drawn[1:]
        x_hat, y_hat, importance = reconstruct(self.codec, x, rate, self.guide, cfg.semantic_strength, mask)
        y_hat = latent_view(y_hat, x.shape[-2], x.shape[-1], adapter.grid)
        with torch.no_grad(), self.runtime.autocast():
            teacher = self.loss.teacher(x)
        self.optimizer.zero_grad(set_to_none=True)
        with self.runtime.autocast():
            terms = self.loss(adapter, y_hat, x_hat, token_weights(importance, adapter.grid), teacher,
                              step >= self.warmup)
        check_finite(terms["loss"], step + 1, "adapter")
        terms["loss"].backward()
        self.runtime.average_gradients(adapter.parameters())
        self.optimizer.step()
        # gain_map: 1 for a step coded at a random quality mask; mask_mode: its index in gainmaps.MASK_MODES (-1
        # without); mask_spread: the spread of its quantised levels (0 for a uniform mask).
        return {**{key: terms[key].item() for key in ("loss", "shallow", "final")},
                "gain_map": float(drawn is not None),
                "mask_mode": -1.0 if drawn is None else float(gainmaps.MASK_MODES.index(drawn[0])),
                "mask_spread": 0.0 if drawn is None else float(importance.max() - importance.min())}

    def export(self, final: dict[str, float]) -> tuple[Path | None, str | None, dict[str, Any]]:
        from comneck_cli.models.adapter import DESIGN, AdapterInfo, save_adapter

        cfg, adapter, codec = self.cfg, self.adapter, self.codec
        tower = clip_record(cfg)
        info = AdapterInfo(codec=cfg.codec, codec_digest=codec.digest.hex(), **tower,
                           shallow_layer=int(cfg.shallow_layer), loss_weights=tuple(cfg.loss_weights),
                           warmup_epochs=float(cfg.warmup_epochs), semantic_strength=float(cfg.semantic_strength),
                           config=dict(adapter.config))
        registry_info = {"codec": cfg.codec, "codec_digest": info.codec_digest, "codec_weights": str(codec.source),
                         **tower, "design": DESIGN,
                         "shallow_layer": info.shallow_layer, "loss_weights": list(cfg.loss_weights),
                         "warmup_epochs": info.warmup_epochs, "rates": list(cfg.rates),
                         "semantic_strength": cfg.semantic_strength, "gain_maps": cfg.gain_maps,
                         "gain_map_strength": cfg.gain_map_strength, "config": dict(adapter.config),
                         "trained_for": "decoder adapter: E(x_hat) + A(y_hat) -> CLIP blocks 1..L (CoTAM)",
                         "data": str(Path(cfg.data).resolve()), "steps": self.total, "final_losses": final}
        output, entry = publish(lambda path: save_adapter(adapter.eval(), path, info), ".safetensors", cfg.output,
                                self.register, "adapter", registry_info)
        return output, entry.name if entry else None, {"codec_digest": info.codec_digest, "warmup_steps": self.warmup}
