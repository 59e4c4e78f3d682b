"""``comneck train vbr [--pre-edit]``: the variable-rate codec, and optionally the pre-editing module P, trained for
LVLMs on semantic tokens (arXiv 2407.17060).

    x ──► P ──► x_e ──► g_a ─► q at gain g_R ─► g_s ──► x̂ ──► CLIP tokens at layers l_1..l_n
    └──────────────────────────────────────────────────────────► CLIP tokens at the same layers (targets)

Loss, the paper's rate + distortion + token distortion: R + λ_R·(γ·MSE(x̂, x) + β·(L_sem + ρ·L_rank)), with

- R in bits per pixel of g_R·y and z_hat (noisy proxy) on the variable-rate path ``latents.variable_rate_path``;
- MSE(x̂, x) on [0, 1] pixels, the distortion;
- the token distortion on the frozen CLIP tower's patch tokens (``preedit.ClipTokens``, class token dropped) of the
  decoded image against those of the *original* image at layers l_1..l_n: L_sem = mean over layers of
  MSE(C_l(x̂), C_l(x)), the token-level MSE, and L_rank (``losses.rank_loss``) = mean over layers and images of
  |H(C_l(x̂)) - H(C_l(x))|, H the entropy of the normalised eigenvalues of the centred tokens' Gram matrix (the log
  effective rank), the paper's rank term on the token matrix's eigenvalues, which keeps the tokens discriminative;
- a rate R drawn per step uniformly over the codec's range (``latents.rate_for_step``: a function of the seed and
  step, so a resumed run draws the same), its gain ``codecs.rate_gain`` and its λ_R interpolated in log space
  between the codec's level λs (CompressAI's zoo table), exactly as the gain is: one model learns every rate;
- γ (default 255², CompressAI's pixel scale), β (default 255²/60, ComNeck's γ:β = 60:1 for d2) and ρ (default 1):
  weights of our choosing, in the paper's structure (its summary publishes no values). γ = 0 trains for the LVLM
  alone; β = 0 is plain rate-distortion; ρ = 0 drops the rank term.

With ``pre_edit`` P trains with the codec (its own learning rate); P's guidance tokens and the targets come from
one no-grad pass of the CLIP over x. Without it only the codec trains. The codec is Adam on every parameter but the
bottleneck quantiles (gradient norm clipped), the quantiles their own Adam on the aux loss, as ``train codec``.

Outputs: the codec (``output`` and/or the registry under ``register``, by default the codec's bare name, where
``encode`` finds it) and P (``pre_edit_output``, by default ``STEM.preedit.safetensors`` beside ``output``, and the
registry as ``{codec}-preedit``, kind ``preedit``), P's file naming the exported codec's digest.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from comneck_cli.codecs import get_spec, rate_gain
from comneck_cli.errors import ComneckError
from comneck_cli.train import checkpoint as ckpt
from comneck_cli.train import gainmaps
from comneck_cli.train.codec import build_codec, split_parameters
from comneck_cli.train.config import ClipRunConfig, defaults, resolve_run, setting
from comneck_cli.train.export import publish, write_codec
from comneck_cli.train.latents import rate_bpp, rate_for_step, variable_rate_path
from comneck_cli.train.loop import Runtime, check_finite, codec_step, crop_batches, default_run_dir, run_length
from comneck_cli.train.losses import BETA, GAMMA, joint_loss, rank_loss, token_entropy, weighted_mse
from comneck_cli.train.neck import clip_record, load_training_clip
from comneck_cli.train.trainer import Progress, Run, TrainResult, train

GUIDE_FRACTIONS = (0.25, 0.5)  # P's guidance: blocks at 1/4 and 1/2 of the tower (ViT-L/14: 6, 12)
TOKEN_FRACTIONS = (0.25, 0.5, 0.75, 23 / 24)  # L_sem: ViT-L/14's blocks 6, 12, 18 and 23 (what LLaVA reads)


@dataclass(kw_only=True)
class VbrTrainConfig(ClipRunConfig):
    """What ``train_vbr`` does; None means the setting's default.

    ``init``: a codec file to start from (else fresh weights from ``config``); ``pre_edit``: train P too.
    ``guide_layers``/``token_layers``: CLIP layers (Hugging Face numbering, 1..depth) guiding P and compared by
    L_sem (default: fractions of the tower's depth, ``GUIDE_FRACTIONS``/``TOKEN_FRACTIONS``). ``beta``/``gamma``:
    weights of the token distortion and of the pixel MSE; ``rank_weight``: ρ, of L_rank within the token term.
    ``gain_maps``/``gain_map_strength``/``gain_map_source``: the share of steps coded at a spatially varying gain
    (``gainmaps``: random smooth maps and/or the training CLIP's importance maps), and their largest strength.
    ``register``: the codec's registry name (``{codec}`` filled in);
    ``pre_edit_output``/``pre_edit_register``: where P goes.
    """

    codec: str | None = setting("mbt2018-mean-vbr")
    config: dict[str, Any] | None = setting()
    init: Path | None = setting()
    pre_edit: bool | None = setting(False)
    steps: int | None = setting(trajectory=False)
    epochs: int | None = setting(trajectory=False)
    lr: float | None = setting(1e-4)
    pre_edit_lr: float | None = setting(1e-4)
    aux_lr: float | None = setting(1e-3)
    clip_max_norm: float | None = setting(1.0)
    beta: float | None = setting(BETA)
    gamma: float | None = setting(GAMMA)
    rank_weight: float | None = setting(1.0)
    gain_maps: float | None = setting(gainmaps.DEFAULT_FRACTION)
    gain_map_strength: float | None = setting(gainmaps.DEFAULT_MAX_STRENGTH)
    gain_map_source: str | None = setting("both")
    guide_layers: tuple[int, ...] | None = setting()
    token_layers: tuple[int, ...] | None = setting()
    pre_edit_channels: int | None = setting(32)
    register: str | None = "{codec}"
    pre_edit_output: Path | None = None
    pre_edit_register: str | None = "{codec}-preedit"

    quality: ClassVar[None] = None  # one model for every rate: no level to choose
    lmbda: ClassVar[None] = None  # λ follows the rate drawn at each step


def rate_lambda(model: nn.Module, rate: float) -> float:
    """λ_R of rate R: the codec's level λs interpolated in log space at R's position, as ``rate_gain`` does gains."""
    table = [math.log(v) for v in model.lmbda]
    position = min(max(float(rate) - 1.0, 0.0), len(table) - 1.0)
    low = int(position)
    high = min(low + 1, len(table) - 1)
    return math.exp(table[low] + (table[high] - table[low]) * (position - low))


def semantic_token_loss(decoded: Sequence[Tensor], original: Sequence[Tensor]) -> Tensor:
    """L_sem: the mean over layers of MSE(tokens of x̂, tokens of x), float32."""
    return sum(F.mse_loss(a.float(), b.float()) for a, b in zip(decoded, original)) / len(decoded)


def _resolve(cfg: VbrTrainConfig) -> dict[str, Any] | None:
    if cfg.codec is None and cfg.resume is None:
        cfg.codec = defaults(cfg)["codec"]
    if cfg.codec is not None and not get_spec(cfg.codec).variable_rate:  # before resolve_run asks for a quality
        raise ComneckError(f"train vbr trains a variable-rate codec, and {cfg.codec} has fixed quality levels; use "
                           "`codec` mbt2018-mean-vbr (or `comneck train codec` for this one)", params=("codec",))
    state = resolve_run(cfg, "vbr", "train vbr")
    if state is not None and "rank_weight" not in state["config"]:
        cfg.rank_weight = 0.0  # a run from before the rank term resumes without it
    if state is not None and "gain_maps" not in state["config"]:
        cfg.gain_maps = 0.0  # likewise gain maps
    gainmaps.check_settings(cfg.gain_maps, cfg.gain_map_strength, cfg.gain_map_source, True, True)
    if cfg.beta < 0 or cfg.gamma < 0 or cfg.rank_weight < 0 or cfg.beta + cfg.gamma == 0:
        raise ComneckError(f"`beta` {cfg.beta:g}, `gamma` {cfg.gamma:g} and `rank_weight` {cfg.rank_weight:g} must "
                           "not be negative, and `beta` or `gamma` must be positive, or the codec would learn to "
                           "send nothing", params=("beta", "gamma", "rank_weight"))
    for name in ("guide_layers", "token_layers"):
        if getattr(cfg, name) is not None:
            setattr(cfg, name, tuple(int(v) for v in getattr(cfg, name)))
    return state


def train_vbr(cfg: VbrTrainConfig, on_progress: Progress | None = None) -> TrainResult:
    """Train (or resume) the variable-rate codec, and P with ``pre_edit``, on semantic tokens; export and register.

    ``on_progress(done, total)`` follows the steps.
    """
    state = _resolve(cfg)
    return train(cfg, lambda runtime: VbrRun(cfg, runtime, state), on_progress)


class VbrRun(Run):
    """R + λ_R(γ·MSE + β(L_sem + ρ·L_rank)) on the variable-rate codec (and P), one rate R per step."""

    kind = "vbr"

    def __init__(self, cfg: VbrTrainConfig, runtime: Runtime, state: dict[str, Any] | None):
        from comneck_cli.models.preedit import ClipTokens, PreEditor, default_layers

        self.cfg, self.runtime, self.state = cfg, runtime, state
        device = runtime.device
        self.spec = spec = get_spec(cfg.codec)
        self.register = None if cfg.register is None else cfg.register.format(codec=cfg.codec)
        self.run_dir = (Path(cfg.run_dir) if cfg.run_dir
                        else default_run_dir(cfg.output, f"{self.register or cfg.codec}-vbr"))
        self.batches = crop_batches(cfg, runtime)
        self.total = run_length(cfg, state, self.batches.per_epoch)

        ckpt.seed_everything(cfg.seed)
        self.model, self.model_config = build_codec(spec, None, cfg.config, cfg.init)
        self.model.to(device).train()
        clip = load_training_clip(cfg, device)
        depth = len(clip.visual.transformer.resblocks)
        cfg.guide_layers = cfg.guide_layers or default_layers(depth, GUIDE_FRACTIONS)
        cfg.token_layers = cfg.token_layers or default_layers(depth, TOKEN_FRACTIONS)
        # One no-grad pass over x serves both P's guidance and L_sem's targets.
        layers = tuple(sorted(set(cfg.token_layers) | (set(cfg.guide_layers) if cfg.pre_edit else set())))
        self.tokens = ClipTokens(clip, layers).to(device)
        self.guide_at = [layers.index(layer) for layer in cfg.guide_layers]
        self.target_at = [layers.index(layer) for layer in cfg.token_layers]
        self.decoded_tokens = ClipTokens(clip, cfg.token_layers).to(device)
        self.editor = None
        if cfg.pre_edit:
            self.editor = PreEditor(self.tokens.width, cfg.guide_layers, cfg.pre_edit_channels).to(device).train()
        runtime.broadcast(self.model)
        if self.editor is not None:
            runtime.broadcast(self.editor)

        self.net_params, aux_params = split_parameters(self.model)
        groups = [{"params": self.net_params, "lr": cfg.lr}]
        if self.editor is not None:
            groups.append({"params": list(self.editor.parameters()), "lr": cfg.pre_edit_lr})
        self.optimizer = torch.optim.Adam(groups)
        self.aux_optimizer = torch.optim.Adam(aux_params, lr=cfg.aux_lr)
        self.rates = float(min(spec.qualities)), float(max(spec.qualities))
        guide = None
        if cfg.gain_maps and cfg.gain_map_source != "random":
            from comneck_cli.coding.semantic import Guide

            guide = Guide(clip)
        self.maps = gainmaps.GainMaps(self.model, cfg.seed, fraction=cfg.gain_maps,
                                      max_strength=cfg.gain_map_strength, source=cfg.gain_map_source, guide=guide)

    def saved(self) -> dict[str, Any]:
        saved = {"model": self.model, "optimizer": self.optimizer, "aux_optimizer": self.aux_optimizer}
        if self.editor is not None:
            saved["editor"] = self.editor
        return saved

    def plain(self) -> dict[str, Any]:
        return {"model_config": self.model_config}

    def describe(self, step: int) -> dict[str, Any]:
        return {"stage": "vbr"}

    def step(self, step: int, x: Tensor, labels: Tensor) -> dict[str, float]:
        cfg, model, runtime, editor = self.cfg, self.model, self.runtime, self.editor
        rate = rate_for_step(cfg.seed, step, *self.rates)
        self.optimizer.zero_grad(set_to_none=True)
        self.aux_optimizer.zero_grad(set_to_none=True)
        with torch.no_grad(), runtime.autocast():
            seen = self.tokens(x)
        targets = [seen[i] for i in self.target_at]
        with runtime.autocast():
            coded = x if editor is None else editor(x, self.tokens.grids([seen[i] for i in self.guide_at]))
            gains = self.maps(step, coded, rate)  # after P: the encoder reads its map from what it codes
            latents = variable_rate_path(model, coded, rate_gain(model, rate) if gains is None else gains)
            x_hat = model.g_s(latents.y_hat)
            decoded = self.decoded_tokens(x_hat)
            sem = semantic_token_loss(decoded, targets)
        rank = rank_loss(decoded, targets)  # float32 outside autocast: eigvalsh has no bf16 kernel
        bpp = rate_bpp(latents.likelihoods, x.shape[0] * x.shape[2] * x.shape[3])
        mse = F.mse_loss(x_hat.float(), x)
        distortion = mse if gains is None else weighted_mse(x_hat, x, self.maps.pixel_weights(gains, rate))
        loss = joint_loss(bpp, distortion, sem + cfg.rank_weight * rank, rate_lambda(model, rate), cfg.gamma,
                          cfg.beta)
        check_finite(loss, step + 1, "semantic rate")
        loss.backward()
        if editor is not None:  # P's parameters are in the codec's optimizer, unclipped
            runtime.average_gradients(editor.parameters())
        aux = codec_step(runtime, model, self.net_params, self.optimizer, self.aux_optimizer, cfg.clip_max_norm)

        # Every term is logged whatever its weight, so a run with a term off shows what it would have been;
        # erank / erank_x: effective rank exp(H) of the deepest compared layer's tokens of x̂ and of x.
        values = {"loss": loss.item(), "bpp": bpp.item(), "mse": mse.item(), "sem": sem.item(),
                  "rank": rank.item(), "rate": rate, "aux": aux, "gain_map": float(gains is not None),
                  "erank": token_entropy(decoded[-1].detach()).exp().mean().item(),
                  "erank_x": token_entropy(targets[-1]).exp().mean().item()}
        if editor is not None:
            values["edit"] = (coded.detach() - x).abs().mean().item()  # how much P changed the image
        return values

    def export(self, final: dict[str, float]) -> tuple[Path | None, str | None, dict[str, Any]]:
        output, entry, pre_edit_file, pre_edit_entry = _export(self.cfg, self.model, self.model_config, self.editor,
                                                               self.register, self.total, final)
        return output, entry.name if entry else None, {
            "pre_edit_output": pre_edit_file, "pre_edit_registered": pre_edit_entry.name if pre_edit_entry else None}


def _export(cfg: VbrTrainConfig, model: nn.Module, model_config: dict[str, Any], editor: nn.Module | None,
            register: str | None, total: int, final: dict[str, float]):
    """The codec first (P's file records the digest of the codec it was trained with), then P."""
    from comneck_cli import weights as registry

    from comneck_cli.models.preedit import PREEDIT_KIND, PreEditInfo, save_preedit

    model.eval()
    tower = clip_record(cfg)
    common = {"codec": cfg.codec, "data": str(Path(cfg.data).resolve()), "steps": total, "final_losses": final,
              "beta": cfg.beta, "gamma": cfg.gamma, "rank_weight": cfg.rank_weight, "gain_maps": cfg.gain_maps,
              "gain_map_strength": cfg.gain_map_strength, "gain_map_source": cfg.gain_map_source,
              "token_layers": list(cfg.token_layers), **tower}
    info = {**common, "quality": 0, "trained_for": "LVLMs: R + λ_R(γ·MSE + β(L_sem + ρ·L_rank)) over every rate",
            "lmbda": list(model.lmbda), "config": model_config, "init": None if cfg.init is None else str(cfg.init),
            "machine_only": False, "pre_edit": editor is not None}
    output, entry = publish(lambda path: write_codec(model, path, cfg.codec, 0, model_config), ".safetensors",
                            cfg.output, register, "codec", info)
    if editor is None:
        return output, entry, None, None
    digest = (entry.sha256 if entry else registry.file_sha256(output))[:8]
    pre_edit_info = PreEditInfo(codec=cfg.codec, codec_digest=digest, **tower, config=dict(editor.config))
    target = cfg.pre_edit_output
    if target is None and cfg.output is not None:
        target = Path(cfg.output).with_name(f"{Path(cfg.output).stem}.preedit.safetensors")
    name = None if cfg.pre_edit_register is None else cfg.pre_edit_register.format(codec=cfg.codec)
    p_file, p_entry = publish(lambda path: save_preedit(editor.eval(), path, pre_edit_info),
                              ".safetensors", target, name, PREEDIT_KIND,
                              {**common, "codec_digest": digest, "guide_layers": list(cfg.guide_layers),
                               "codec_weights": entry.name if entry else str(output)})
    return output, entry, p_file, p_entry
