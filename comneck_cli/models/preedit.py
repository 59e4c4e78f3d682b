"""The pre-editing module P (arXiv 2407.17060): x -> x_e, the image edited before coding for an LVLM.

    x ──► frozen CLIP blocks ──► patch tokens at layers l_1..l_n ──┐
    │                                                              ▼
    └──────────────────────────────────────────────► P(x, tokens) = x_e ──► g_a ─► entropy coder ─► .cnk

The paper's pre-editing module refines the image with semantic information from a visual transformer at several
scales, keeping what the LVLM needs and removing what it does not, so the codec spends fewer bits at the same rate
parameter. P here is deliberately light (a few 3×3 convolutions at full resolution, 32 channels by default):

- guidance: the patch tokens of several blocks of the frozen CLIP tower C (:class:`ClipTokens`, Hugging Face
  numbering: layer i is the output of block i), each reshaped to its ``g × g`` grid, projected by a 1×1 conv and
  upsampled (bilinear) to the image. Early blocks say where edges and textures are, later ones what the objects are.
- the edit: ``x_e = w_0 ⊙ x + Σ_k w_k ⊙ s_k(x)``, a per-pixel convex blend of x and smoothed copies ``s_k(x)``
  (averages over ``k × k`` cells, upsampled back bilinearly; ``smooth`` = (4, 16) by default: texture, then
  shading), the weights ``w`` a softmax predicted from the image features fused with the guidance. Detail is what
  costs bits; the weights decide where dropping it costs the LVLM nothing. P can only remove (it cannot paint new
  texture, which would cost bits), its output stays in [0, 1], and it starts as (nearly) the identity: the identity's
  logit starts at 4 (w_0 ≈ 0.96).

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

from comneck_cli.errors import ComneckError, MismatchError
from comneck_cli.modelfiles import ModelInfo, load_module, save_module

PREEDIT_FORMAT = "comneck-preedit"
PREEDIT_FORMAT_VERSION = "1"
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
    """P: (x, token grids) -> x_e, same size, in [0, 1]; see the module docstring."""

    def __init__(self, clip_width: int, layers: Sequence[int], channels: int = 32, smooth: Sequence[int] = (4, 16)):
        super().__init__()
        self.config = {"clip_width": int(clip_width), "layers": [int(layer) for layer in layers],
                       "channels": int(channels), "smooth": [int(k) for k in smooth]}
        self.smooth = tuple(int(k) for k in smooth)
        self.image = nn.Conv2d(3, channels, 3, padding=1)
        self.guides = nn.ModuleList(nn.Conv2d(clip_width, channels, 1) for _ in layers)
        self.body = nn.Sequential(nn.Conv2d(2 * channels, channels, 3, padding=1), nn.GELU(),
                                  nn.Conv2d(channels, channels, 3, padding=1), nn.GELU())
        self.out = nn.Conv2d(channels, 1 + len(self.smooth), 3, padding=1)  # logits of x, s_k(x)...
        nn.init.zeros_(self.out.weight)
        with torch.no_grad():
            self.out.bias.copy_(torch.tensor([4.0] + [0.0] * len(self.smooth)))

    def forward(self, x: Tensor, grids: Sequence[Tensor]) -> Tensor:
        height, width = x.shape[-2:]
        guide = sum(F.interpolate(conv(g.to(x.dtype)), size=(height, width), mode="bilinear", align_corners=False)
                    for conv, g in zip(self.guides, grids))
        features = self.body(torch.cat([F.gelu(self.image(x)), guide], dim=1))
        candidates = [x] + [F.interpolate(F.avg_pool2d(x, k, ceil_mode=True), size=(height, width), mode="bilinear",
                                          align_corners=False) for k in self.smooth]
        weights = torch.softmax(self.out(features), dim=1)
        return sum(weights[:, i : i + 1] * c for i, c in enumerate(candidates))  # convex: stays in [0, 1]


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

    @classmethod
    def _decode(cls, meta: dict[str, str]) -> PreEditInfo:
        return cls(codec=meta["codec"], codec_digest=meta["codec_digest"], clip_model=meta["clip_model"],
                   clip_tag=meta["clip_tag"], config=json.loads(meta["config"]))


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
    clip = resolve_clip(info.clip_model, None if info.clip_tag == "None" else info.clip_tag, clip_weights,
                        device=device).requires_grad_(False)
    return PreEdit(editor, ClipTokens(clip, info.config["layers"]).to(device), info, path, torch.device(device))
