"""The *Post-processing* baseline (paper §4.1): x_hat = g_s(y_hat) -> U-Net -> the full CLIP tower.

A U-Net (Ronneberger et al., the paper's [52]) adapts the codec's reconstruction for the MLLM; it is trained
with the neck's surrogate loss (``comneck train postprocess``). :class:`UNet` is the standard architecture:
``depth`` times (double 3×3 conv + BN + ReLU, then 2×2 max-pool), a double conv at the bottom, then ``depth``
times (2×2 transposed conv, concatenate the skip, double conv) and a 1×1 output conv; channels start at
``base`` and double at every level. With ``base=64, depth=4`` (the original sizes) and 3 channels in and out it
has 31,037,763 parameters: the paper's Table 3 lists 31.04 M for its post-processing network.
``eval.methods.unet_cost`` (``eval.complexity.count``) measures 735.10 kMAC/px (at 256 × 256, the same at any
size: the U-Net is fully convolutional), which a hand count of the convolutions reproduces exactly; the paper lists
835.72.

The output is residual by default: ``clamp(x + UNet(x), 0, 1)``, so an untrained U-Net starts near the
identity. Inputs are padded (replicate) to a multiple of ``2**depth`` and cropped back.

A trained U-Net is a safetensors file (no pickle) whose string metadata (:class:`PostprocessInfo`) says which
codec, quality and codec weights' reconstructions it was trained on, for which CLIP, and its config.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from comneck_cli.modelfiles import ModelInfo, load_module, save_module

POSTPROCESS_FORMAT = "comneck-postprocess"
POSTPROCESS_FORMAT_VERSION = "1"


class _DoubleConv(nn.Sequential):
    def __init__(self, cin: int, cout: int):
        super().__init__(
            nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
            nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
        )


class UNet(nn.Module):
    """Image (B, 3, H, W) in [0, 1] -> image (B, 3, H, W) in [0, 1]; see the module docstring."""

    def __init__(self, channels: int = 3, base: int = 64, depth: int = 4, residual: bool = True):
        super().__init__()
        if depth < 1 or base < 1:
            raise ValueError(f"U-Net depth {depth} and base {base} must be positive")
        self.config = {"channels": int(channels), "base": int(base), "depth": int(depth), "residual": bool(residual)}
        widths = [base * 2**i for i in range(depth + 1)]
        self.inc = _DoubleConv(channels, widths[0])
        self.down = nn.ModuleList(_DoubleConv(widths[i], widths[i + 1]) for i in range(depth))
        levels = list(reversed(range(depth)))
        self.up = nn.ModuleList(nn.ConvTranspose2d(widths[i + 1], widths[i], 2, stride=2) for i in levels)
        self.up_conv = nn.ModuleList(_DoubleConv(2 * widths[i], widths[i]) for i in levels)
        self.outc = nn.Conv2d(widths[0], channels, 1)
        self.multiple = 2**depth
        self.residual = residual

    def forward(self, x: Tensor) -> Tensor:
        height, width = x.shape[-2:]
        pad_h, pad_w = -height % self.multiple, -width % self.multiple
        h = F.pad(x, (0, pad_w, 0, pad_h), mode="replicate") if pad_h or pad_w else x
        skips = [self.inc(h)]
        for block in self.down:
            skips.append(block(F.max_pool2d(skips[-1], 2)))
        h = skips.pop()
        for up, conv in zip(self.up, self.up_conv):
            h = conv(torch.cat([skips.pop(), up(h)], dim=1))
        out = self.outc(h)[..., :height, :width]
        return (x + out if self.residual else out).clamp(0, 1)


@dataclass(frozen=True)
class PostprocessInfo(ModelInfo):
    """What a U-Net file was trained for: the codec (name, quality, first 8 hex digits of its weights' sha256)
    whose reconstructions it reads, and the CLIP model and weights tag its output feeds."""

    format = POSTPROCESS_FORMAT
    format_version = POSTPROCESS_FORMAT_VERSION
    what = "U-Net"
    not_ours = ("{path} is not a comneck post-processing U-Net file; pass one written by "
                "`comneck train postprocess`")

    codec: str
    quality: int
    codec_digest: str
    clip_model: str
    clip_tag: str
    config: dict[str, Any] = field(default_factory=dict)
    clip_seed: int | None = None  # clip_tag none: the seed its random tower was drawn from (clip.tower.random_clip)

    @classmethod
    def _decode(cls, meta: dict[str, str]) -> PostprocessInfo:
        return cls(codec=meta["codec"], quality=int(meta["quality"]), codec_digest=meta["codec_digest"].lower(),
                   clip_model=meta["clip_model"], clip_tag=meta["clip_tag"], config=json.loads(meta["config"]),
                   clip_seed=json.loads(meta.get("clip_seed", "null")))


def postprocess_registry_name(codec: str, quality: int) -> str:
    """Where ``eval`` looks for a U-Net when ``--postprocess`` names none: ``{codec}-q{quality}-postprocess``."""
    return f"{codec}-q{quality}-postprocess"


def save_postprocess(unet: UNet, path: Path | str, info: PostprocessInfo) -> None:
    """Write ``unet`` with ``info`` (its config replaced by the U-Net's own) as one safetensors file, atomically."""
    save_module(unet, path, info)


def load_postprocess(path: Path | str, device: torch.device | str = "cpu") -> tuple[UNet, PostprocessInfo]:
    """Read a file written by :func:`save_postprocess` -> (U-Net in eval mode on ``device``, its info)."""
    return load_module(path, PostprocessInfo, lambda info: UNet(**info.config), device)
