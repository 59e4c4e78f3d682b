"""The decoder adapter A (CoTAM): y_hat -> tokens ADDED to CLIP's layer-0 tokens of the decoded image.

    .cnk ──► y_hat ──► g_s ──► x_hat ──► C's embedding E ──► E(x_hat) ─┐
                 └──────────────────────► A ──► A(y_hat) ───────────(+)──► blocks 1..L of C ──► features

E is C's patch embedding, class token, positional embedding and ``ln_pre`` (``hidden_states[0]``, Hugging Face
numbering). A has the transform-neck's shape (:class:`TransformNeck`: ``Linear(M -> width)`` per latent position,
a class token, learned positions, ``ln_pre``, one CLIP residual attention block) at CLIP's token grid (ViT-L/14@336:
577 × 1024), and its output is added to E(x_hat) before block 1, so the MLLM reads
``C_{1..L}(E(x_hat) + A(y_hat))`` instead of ``C(x_hat)``: the latents restore what compression took from the
tokens CLIP builds on, people still see g_s's x_hat. This is the authors' design (jmliu206/CoTAM: ``adapters.py``
``LinearEncoder``; ``train_adapter.py`` ``run_batch`` adds ``clip_wrapper.token_features_from_image(x_hat)``, CLIP's
layer-0 tokens, to ``adapter(y_hat)`` and runs CLIP from its first block on the sum). ``comneck train adapter``
trains A with CoTAM's loss (:mod:`comneck_cli.train.adapter`).

A latent grid other than CLIP's (any image that is not a training crop) is first brought to the view CLIP's own
preprocessing takes of the image (:func:`latent_view`: padding removed, centre square, resized to the grid), so
A(y_hat)'s token i sits on the patch E(x_hat)'s token i comes from.

A trained adapter is a safetensors file whose metadata (:class:`AdapterInfo`) names the design, the codec and the
digest of the codec weights whose latents it reads, the CLIP it feeds, its loss and its config. It is registered as
kind ``adapter`` under ``{codec}-adapter`` (variable-rate codecs: one for every rate) or ``{codec}-q{quality}-adapter``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from comneck_cli.errors import ComneckError, MismatchError
from comneck_cli.modelfiles import ModelInfo, load_module, save_module
from comneck_cli.models.neck import TransformNeck

ADAPTER_FORMAT = "comneck-adapter"
ADAPTER_FORMAT_VERSION = "2"  # 1 was a pixel filter after g_s; its files cannot be read as token adapters
DESIGN = "cotam-layer0-tokens"
Y_STRIDE = 16  # pixels per latent position of the hyperprior family (formats.latent_grids)


class DecoderAdapter(TransformNeck):
    """A: ``y_hat (B, M, gh, gw)`` -> tokens ``(B, 1 + gh·gw, width)``, added to C's layer-0 tokens E(x_hat).

    The parts are :class:`TransformNeck`'s, at C's token grid ``grid`` and width, with C's head count."""

    def forward(self, y_hat: Tensor, embedded: Tensor) -> Tensor:
        """E(x_hat) + A(y_hat): the layer-0 tokens ``(B, 1 + P, width)`` that enter C's first block."""
        if tuple(y_hat.shape[-2:]) != self.grid:
            raise ComneckError(f"the adapter reads a {self.grid[0]}x{self.grid[1]} latent grid, not "
                               f"{y_hat.shape[-2]}x{y_hat.shape[-1]}; bring y_hat to it with latent_view")
        return embedded + super().forward(y_hat)

    @classmethod
    def for_clip(cls, clip: nn.Module, latent_channels: int) -> DecoderAdapter:
        """A sized for ``clip``'s visual tower: its width, heads and token grid."""
        visual = clip.visual
        grid = visual.grid_size if hasattr(visual, "grid_size") else None
        if grid is None:
            raise ComneckError("the CLIP visual tower has no token grid; use an open_clip ViT such as ViT-L-14")
        attn = visual.transformer.resblocks[0].attn
        return cls(latent_channels=latent_channels, width=visual.transformer.width, heads=attn.num_heads,
                   grid=tuple(grid))


def latent_view(y_hat: Tensor, height: int, width: int, grid: tuple[int, int]) -> Tensor:
    """The part of ``y_hat`` (1, M, h, w) of an image H×W (padded centred to a multiple of 64) that CLIP's
    preprocessing sees, on the adapter's ``grid``: padding cropped, the centre square (open_clip resizes the short
    side and centre-crops), resized bilinearly (antialiased when shrinking). A training crop is returned as is."""
    from comneck_cli.formats import PAD_MULTIPLE
    from comneck_cli.io.images import pad_amounts

    left, _, top, _ = pad_amounts(height, width, PAD_MULTIPLE)
    rows = (round(top / Y_STRIDE), round((top + height) / Y_STRIDE))
    cols = (round(left / Y_STRIDE), round((left + width) / Y_STRIDE))
    view = y_hat[..., rows[0] : max(rows[1], rows[0] + 1), cols[0] : max(cols[1], cols[0] + 1)]
    h, w = view.shape[-2:]
    side = min(h, w)
    view = view[..., (h - side) // 2 : (h - side) // 2 + side, (w - side) // 2 : (w - side) // 2 + side]
    if tuple(view.shape[-2:]) == tuple(grid):
        return view
    return F.interpolate(view, size=tuple(grid), mode="bilinear", align_corners=False, antialias=side > grid[0])


@dataclass(frozen=True)
class AdapterInfo(ModelInfo):
    """What an adapter was trained for: its ``design`` (:data:`DESIGN`), the codec (name, first 8 hex digits of its
    weights' sha256) whose latents it reads, the CLIP it feeds, the loss (HF index of the shallow hidden state, the
    weights of the shallow and final-embedding terms, warm-up epochs on the shallow term), the semantic strength of
    the records it saw (0: plain records) and its config."""

    format = ADAPTER_FORMAT
    format_version = ADAPTER_FORMAT_VERSION
    what = "adapter"
    file_what = "decoder adapter"
    not_ours = "{path} is not a comneck decoder adapter; pass one written by `comneck train adapter`"

    codec: str
    codec_digest: str
    clip_model: str
    clip_tag: str
    shallow_layer: int
    loss_weights: tuple[float, float]
    warmup_epochs: float
    design: str = DESIGN
    semantic_strength: float = 0.0
    config: dict[str, Any] = field(default_factory=dict)
    clip_seed: int | None = None  # clip_tag none: the seed its random tower was drawn from (clip.tower.random_clip)

    @classmethod
    def _json(cls, name: str) -> bool:
        return True  # adapter files store every field as JSON

    @classmethod
    def _decode(cls, meta: dict[str, str]) -> AdapterInfo:
        values = {f.name: json.loads(meta[f.name]) for f in fields(cls) if f.name != "clip_seed"}
        values["clip_seed"] = json.loads(meta.get("clip_seed", "null"))  # files from before issue #32 have none
        values["loss_weights"] = tuple(float(v) for v in values["loss_weights"])
        if values["design"] != DESIGN:
            raise ValueError(f"design {values['design']!r} is not {DESIGN!r}")
        return cls(**values)

    def check_codec(self, codec, path: Path | str) -> None:
        """Refuse latents of another codec or other codec weights than the adapter was trained on."""
        if (self.codec, self.codec_digest) != (codec.name, codec.digest.hex()):
            raise MismatchError(f"adapter {path} was trained on latents of {self.codec} weights {self.codec_digest}, "
                               f"not {codec.name} weights {codec.digest.hex()}; pass the adapter trained for these "
                               "weights (`adapter`)", params=("adapter",))

    def check_clip(self, clip_model: str, clip_tag: str | None, path: Path | str) -> None:
        """Refuse a CLIP other than the one whose layer-0 tokens the adapter was trained to correct."""
        if (self.clip_model, _tag(self.clip_tag)) != (clip_model, _tag(clip_tag)):
            raise MismatchError(f"adapter {path} was trained for CLIP {self.clip_model}/{self.clip_tag}, not "
                               f"{clip_model}/{clip_tag}; pass the matching adapter or CLIP (`adapter`, `clip`)",
                               params=("adapter", "clip"))


def _tag(tag: str | None) -> str:
    return "none" if tag is None or str(tag).lower() == "none" else str(tag)  # random weights, however spelled


def adapter_registry_name(codec: str, quality: int | None = None) -> str:
    """``{codec}-adapter`` for variable-rate codecs (one model, every rate), else ``{codec}-q{quality}-adapter``."""
    from comneck_cli.codecs import registry_name

    return f"{registry_name(codec, quality)}-adapter"


def save_adapter(adapter: DecoderAdapter, path: Path | str, info: AdapterInfo) -> None:
    """Write ``adapter`` with ``info`` (its config replaced by the adapter's own) as one safetensors file, atomically."""
    save_module(adapter, path, info)


def load_adapter(path: Path | str, device: torch.device | str = "cpu") -> tuple[DecoderAdapter, AdapterInfo]:
    """Read a file written by :func:`save_adapter` -> (adapter in eval mode on ``device``, its info)."""
    return load_module(path, AdapterInfo,
                       lambda info: DecoderAdapter(**{**info.config, "grid": tuple(info.config["grid"])}), device)


def resolve_adapter(given: str | Path | None, codec) -> Path:
    """An adapter file or registry name, else the registry entry :func:`adapter_registry_name` of the codec."""
    from comneck_cli import hub

    return hub.resolve(given, "adapter", default=adapter_registry_name(codec.name, codec.quality),
                       hint="train one with `comneck train adapter`")


@torch.inference_mode()
def adapted_tokens(adapter: DecoderAdapter, embed: nn.Module, y_hat: Tensor, clip_input: Tensor, height: int,
                   width: int) -> Tensor:
    """E(x_hat) + A(y_hat) for one decoded image: ``clip_input`` (1, 3, S, S) is x_hat as CLIP's preprocessing
    gives it, ``embed`` C's embedding E (:meth:`ClipHead.embed`), ``y_hat`` the record's latents of the H×W image.
    The result enters C's first block (``ClipTail`` at k = 0)."""
    device = clip_input.device
    view = latent_view(y_hat.to(device), height, width, adapter.grid)
    return adapter(view, embed(clip_input))
