"""The pre-editing module P (arXiv 2407.17060): x -> x_e, the image edited before coding for an LVLM.

    x ──► frozen CLIP blocks ──► patch tokens at layers l_1..l_n ──┐
    │                                                              ▼
    └──────────────────────────────────────────────► P(x, tokens) = x_e ──► g_a ─► entropy coder ─► .cnk

The paper's pre-editing module refines the image with semantic information from a visual transformer at several
scales, keeping what the LVLM needs and removing what it does not, so the codec spends fewer bits at the same rate
parameter. Its summary gives the structure (ViT-token guidance, several scales, an edit before g_a, trained jointly
with the codec on semantic tokens) but no layer sizes; these are ours, and deliberately light (32 channels, three
scales; about 0.4 M parameters for ViT-L/14's two guidance layers, most of them the guidance projections):

- guidance: the patch tokens of several blocks of the frozen CLIP tower C (:class:`ClipTokens`, Hugging Face
  numbering: layer i is the output of block i), each layer-normalised (ViT tokens carry a few huge channels) and
  reshaped to its ``g × g`` grid, concatenated over the layers. Early blocks say where edges and textures are, later
  ones what the objects are.
- multi-scale editing: a 3×3 stem, then scales 1, 1/2, 1/4 (stride-2 convolutions). At each scale the guidance,
  resized bilinearly to that scale and projected (1×1), modulates the image features (``h·(1 + γ_s) + β_s``) before
  a residual 3×3 refinement; the scales are merged top-down (upsample, add the finer scale, 3×3), and a last 3×3
  predicts a residual edit r: ``x_e = clamp(x + r, 0, 1)`` (the clamp straight-through in training). The residual's convolution starts at zero, so P starts
  as the identity and the joint loss alone decides what it removes (or sharpens) where.

P is trained jointly with the variable-rate codec (``comneck train vbr --pre-edit``) on R + λ_R·(γ·MSE + β·(L_sem +
ρ·L_rank)), L_sem the MSE between CLIP tokens of the decoded image and of the original x at several layers and L_rank
the gap between their log effective ranks (``train.vbr``). A trained P
is a safetensors file whose metadata (:class:`PreEditInfo`) names the codec weights it was trained with, the CLIP
whose tokens guide it and the guidance layers; ``comneck encode --pre-edit`` runs it before the codec.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from comneck_cli.errors import ComneckError, MismatchError, ModelFileError
from comneck_cli.modelfiles import ModelInfo, load_module, save_module

PREEDIT_FORMAT = "comneck-preedit"
PREEDIT_FORMAT_VERSION = "2"
# Format 1 held the former P, a convex blend of x with two smoothed copies; measured worse (README), not kept.
FORMER_VERSIONS = {"1": "a convex blend of the image with smoothed copies"}
PREEDIT_KIND = "preedit"  # its weights-registry kind


def default_layers(depth: int, fractions: Sequence[float]) -> tuple[int, ...]:
    """CLIP layers at fractions of a tower's depth (ViT-L/14's 24 blocks, (1/4, 1/2) -> (6, 12)), each >= 1."""
    return tuple(sorted({min(depth, max(1, round(depth * f))) for f in fractions}))


class ClipTokens(nn.Module):
    """The frozen CLIP tower's patch tokens at several layers, for a batch of images in [0, 1].

    The whole image is resized to the tower's input size without cropping, so every token grid covers every pixel,
    and normalised (:class:`~comneck_cli.clip.preprocess.ClipPreprocess`, the tower's own preprocessing config).
    Only blocks up to the deepest layer asked for run. Differentiable (the semantic-token loss backpropagates
    through it into the decoded image); call it under ``no_grad`` for guidance and targets.
    """

    def __init__(self, clip: nn.Module, layers: Sequence[int]):
        super().__init__()
        from comneck_cli.clip.preprocess import ClipPreprocess
        from comneck_cli.clip.tower import ClipHead

        visual = getattr(clip, "visual", clip)
        depth = len(visual.transformer.resblocks)
        self.layers = tuple(int(layer) for layer in layers)
        if not self.layers or any(not 1 <= layer <= depth for layer in self.layers):
            named = ",".join(map(str, self.layers)) or "(none)"
            raise ComneckError(f"CLIP token layers {named} must lie in 1..{depth} (layer i is the output of block i "
                               f"of the {depth}-block tower)")
        self.head = ClipHead(visual, max(self.layers))
        self.prep = ClipPreprocess(clip)
        patch = visual.patch_size
        self.grid = (self.prep.size[0] // patch[0], self.prep.size[1] // patch[1])
        self.width = int(visual.transformer.width)

    def forward(self, x: Tensor) -> list[Tensor]:
        """x (B, 3, H, W) in [0, 1] -> per layer its patch tokens (B, P, width), class token dropped."""
        kept: list[Tensor] = []
        self.head.blocks(self.head.embed(self.prep(x)), keep=kept)
        return [kept[layer - 1][:, 1:] for layer in self.layers]

    def grids(self, tokens: Sequence[Tensor]) -> list[Tensor]:
        """Patch tokens (B, P, width) -> grids (B, width, gh, gw)."""
        return [t.transpose(1, 2).reshape(t.shape[0], t.shape[2], *self.grid) for t in tokens]


class PreEditor(nn.Module):
    """P: (x, token grids) -> x_e = clamp(x + r, 0, 1), same size; see the module docstring.

    ``clip_width``: C's token width; ``layers``: the guiding layers (one grid each, in this order); ``channels``:
    feature width; ``scales``: image scales 1, 1/2, ... (each guided by the tokens)."""

    def __init__(self, clip_width: int, layers: Sequence[int], channels: int = 32, scales: int = 3):
        super().__init__()
        if scales < 1 or channels < 1 or not layers:
            raise ValueError(f"P needs a scale, a channel and a guidance layer (scales={scales}, "
                             f"channels={channels}, layers={list(layers)})")
        self.config = {"clip_width": int(clip_width), "layers": [int(layer) for layer in layers],
                       "channels": int(channels), "scales": int(scales)}
        conv = lambda n_in, n_out, **kw: nn.Conv2d(n_in, n_out, 3, padding=1, **kw)  # noqa: E731
        self.stem = conv(3, channels)
        self.down = nn.ModuleList(conv(channels, channels, stride=2) for _ in range(scales - 1))
        self.guides = nn.ModuleList(nn.Conv2d(clip_width * len(layers), 2 * channels, 1) for _ in range(scales))
        self.refine = nn.ModuleList(conv(channels, channels) for _ in range(scales))
        self.merge = nn.ModuleList(conv(channels, channels) for _ in range(scales - 1))
        self.out = conv(channels, 3)
        nn.init.zeros_(self.out.weight)  # r = 0: P starts as the identity
        nn.init.zeros_(self.out.bias)

    def forward(self, x: Tensor, grids: Sequence[Tensor]) -> Tensor:
        guide = torch.cat([F.layer_norm(g.to(x.dtype).movedim(1, -1), g.shape[1:2]).movedim(-1, 1) for g in grids],
                          dim=1)
        h = F.gelu(self.stem(x))
        levels = []
        for s, (project, refine) in enumerate(zip(self.guides, self.refine)):
            if s:
                h = F.gelu(self.down[s - 1](h))
            gamma, beta = project(F.interpolate(guide, size=h.shape[-2:], mode="bilinear",
                                                align_corners=False)).chunk(2, dim=1)
            h = h + F.gelu(refine(h * (1 + gamma) + beta))  # the tokens decide what each scale keeps
            levels.append(h)
        for s in reversed(range(len(levels) - 1)):  # top-down: coarse semantics into finer scales
            h = F.gelu(self.merge[s](levels[s] + F.interpolate(h, size=levels[s].shape[-2:], mode="bilinear",
                                                              align_corners=False)))
        edited = x + self.out(h)
        # Clamped to [0, 1] going forward, the identity going back: a hard clamp's zero gradient would trap pixels
        # pushed out of range (a P trained fast collapsed to a black image that way).
        return edited + (edited.clamp(0, 1) - edited).detach()


@dataclass(frozen=True)
class PreEditInfo(ModelInfo):
    """What a P file was trained for, as its safetensors string metadata: the codec and the first 8 hex digits of the
    sha256 of the codec weights it was trained with, the CLIP model and weights tag whose tokens guide it, and its
    own constructor config (which holds the guidance layers)."""

    format = PREEDIT_FORMAT
    format_version = PREEDIT_FORMAT_VERSION
    what = "pre-editing module"
    not_ours = ("{path} is not a comneck pre-editing module (no comneck-preedit metadata); pass a file written by "
                "`comneck train vbr --pre-edit`")

    codec: str
    codec_digest: str
    clip_model: str
    clip_tag: str
    config: dict[str, Any] = field(default_factory=dict)
    clip_seed: int | None = None  # clip_tag none: the seed its random tower was drawn from (clip.tower.random_clip)

    @classmethod
    def from_metadata(cls, meta: dict[str, str], path: Path | str) -> PreEditInfo:
        former = FORMER_VERSIONS.get(meta.get("format_version", "")) if meta.get("format") == cls.format else None
        if former:
            raise ModelFileError(f"pre-editing module {path} is of format version {meta['format_version']} "
                                 f"({former}), which this comneck no longer runs; train a new one with `pre_edit`",
                                 params=("pre_edit",))
        return super().from_metadata(meta, path)

    @classmethod
    def _decode(cls, meta: dict[str, str]) -> PreEditInfo:
        return cls(codec=meta["codec"], codec_digest=meta["codec_digest"], clip_model=meta["clip_model"],
                   clip_tag=meta["clip_tag"], config=json.loads(meta["config"]),
                   clip_seed=json.loads(meta.get("clip_seed", "null")))


def save_preedit(editor: PreEditor, path: Path | str, info: PreEditInfo) -> None:
    """Write P and ``info`` (its config replaced by P's own) as one safetensors file, atomically; no pickle."""
    save_module(editor, path, info)


def load_preedit(path: Path | str, device: torch.device | str = "cpu") -> tuple[PreEditor, PreEditInfo]:
    """Read a file written by :func:`save_preedit` -> (P in eval mode on ``device``, its :class:`PreEditInfo`)."""
    return load_module(path, PreEditInfo, lambda info: PreEditor(**info.config), device)


def preedit_registry_name(codec: str) -> str:
    """Where ``encode --pre-edit`` without a value looks: ``{codec}-preedit``."""
    return f"{codec}-preedit"


@dataclass
class PreEdit:
    """A loaded P with its guiding CLIP, ready to edit images for one codec (weights checked by digest)."""

    editor: PreEditor
    tokens: ClipTokens
    info: PreEditInfo
    source: Path
    device: torch.device

    @property
    def digest(self) -> str:
        """First 8 hex digits of P's file sha256: what a pre-edited record's metadata names."""
        from comneck_cli import weights as registry

        return registry.file_sha256(self.source)[:8]

    @torch.inference_mode()
    def __call__(self, image: np.ndarray) -> np.ndarray:
        """uint8 H×W×3 -> the edited uint8 H×W×3 image the codec then codes like any other."""
        from comneck_cli.io.images import from_tensor, to_tensor

        x = to_tensor(image, 1).to(self.device)
        edited = self.editor(x, self.tokens.grids(self.tokens(x)))
        return from_tensor(edited, image.shape[0], image.shape[1], 1)


def load_pre_edit(given: str | Path | None, codec: Any, *, clip_weights: Path | None = None,
                  device: torch.device | str = "cpu") -> PreEdit:
    """P from a file, a registry name, or (``given`` None) the registry's ``{codec}-preedit``, with its CLIP.

    P was trained jointly with one set of codec weights: another codec (``codec``, a loaded ``codecs.Codec``) is
    refused, as its latents would not be the ones P learnt to save bits on.
    """
    from comneck_cli import hub
    from comneck_cli.clip.tower import resolve_clip

    path = hub.resolve(given, PREEDIT_KIND, default=preedit_registry_name(codec.name), param="pre_edit",
                       hint="train one with `comneck train vbr --pre-edit`")
    editor, info = load_preedit(path, device)
    if (info.codec, info.codec_digest) != (codec.name, codec.digest.hex()):
        raise MismatchError(
            f"pre-editing module {path} was trained with {info.codec} weights {info.codec_digest}, not {codec.name} "
            f"weights {codec.digest.hex()} ({codec.source}); pass the codec it was trained with (`weights`)",
            params=("weights",))
    clip = resolve_clip(info.clip_model, info.clip_tag, clip_weights, device=device, seed=info.clip_seed,
                        owner=f"pre-editing module {path}").requires_grad_(False)
    return PreEdit(editor, ClipTokens(clip, info.config["layers"]).to(device), info, path, torch.device(device))
