"""The transform-neck T: quantized latents ``y_hat`` -> tokens that enter C' (block k+1 of the CLIP tower).

Paper §3.3: "a linear projection, a self-attention mechanism, a feed-forward layer, and two layer norms".
The neck is built from the same parts as a CLIP ViT's embedding and blocks, so its output has exactly the
token interface C' expects (``(B, 1 + P, width)``, class token first, batch-first) and ``C'(T(y_hat))`` can
be trained to match ``C(x)`` (the distillation loss of §3.4).

A trained neck is stored as a safetensors file (never pickle) whose string metadata records what it was made
for (:class:`NeckInfo`): the codec, quality and codec weights whose ``y_hat`` it reads, the CLIP model and
weights whose C' it feeds, the split k, the training scenario, and its own constructor config.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from comneck_cli.clip.tower import tag_name
from comneck_cli.errors import MismatchError
from comneck_cli.modelfiles import ModelInfo, load_module, save_module

EVERY_RATE = 0  # NeckInfo.quality of a neck trained over a variable-rate codec's whole range: it serves every rate
NECK_FORMAT = "comneck-neck"
NECK_FORMAT_VERSION = "1"
SCENARIOS = ("d1", "d2", "d3")
RECIPES = ("release", "paper")  # how a neck was trained: the ComNeck authors' code (their released files), or the paper


class TransformNeck(nn.Module):
    """T: ``y_hat (B, latent_channels, h, w)`` -> tokens ``(B, 1 + h*w, width)`` entering C'.

    Each choice and why:

    - ``proj``: one ``Linear(latent_channels -> width)`` applied to every latent position of the flattened
      ``y_hat`` grid. It plays the role of C's patch embedding ``conv1``: a ``16 x 16`` ELIC latent grid of a
      256 x 256 image becomes 256 tokens, the same count as ViT-L/14's 16 x 16 patches at 224.
    - ``class_embedding``: a learned class token, prepended as C does, because C' pools (and LLaVA drops)
      token 0 and its attention expects one there.
    - ``positional_embedding``: learned, ``(1 + gh*gw) x width`` like C's. For a latent grid other than
      ``grid`` the patch positions are bicubically interpolated (class position kept), with a warning.
    - ``ln_pre``: the first layer norm, as C applies before its blocks.
    - ``block``: ONE CLIP-style residual attention block, open_clip's own ``ResidualAttentionBlock`` (``ln_1``,
      ``heads``-head self-attention, ``ln_2``, MLP ``width -> mlp_ratio*width -> width`` with QuickGELU, the
      activation of OpenAI's CLIP weights), batch-first. Its output stands in for C's ``hidden_states[k]``.
    - No ``ln_post``: the tokens go on into C' blocks, not to the projection.

    With ELIC (320 channels) and ViT-L/14 (1024 wide, 16 heads, 16 x 16 grid) T has 13,191,168 parameters,
    the authors' neck.
    """

    def __init__(
        self,
        latent_channels: int = 320,
        width: int = 1024,
        heads: int = 16,
        grid: tuple[int, int] = (16, 16),
        mlp_ratio: float = 4.0,
    ):
        super().__init__()
        from open_clip.transformer import LayerNorm, QuickGELU, ResidualAttentionBlock

        if width % heads:
            raise ValueError(f"width {width} is not divisible by heads {heads}")
        self.config = {
            "latent_channels": int(latent_channels),
            "width": int(width),
            "heads": int(heads),
            "grid": [int(grid[0]), int(grid[1])],
            "mlp_ratio": float(mlp_ratio),
        }
        self.grid = (int(grid[0]), int(grid[1]))
        scale = width**-0.5  # open_clip's init for the class and positional embeddings
        self.proj = nn.Linear(latent_channels, width)
        self.class_embedding = nn.Parameter(scale * torch.randn(width))
        self.positional_embedding = nn.Parameter(scale * torch.randn(1 + self.grid[0] * self.grid[1], width))
        self.ln_pre = LayerNorm(width)
        self.block = ResidualAttentionBlock(
            width, heads, mlp_ratio, act_layer=QuickGELU, norm_layer=LayerNorm, batch_first=True
        )
        self._warned_grids: set[tuple[int, int]] = set()

    def positions(self, h: int, w: int) -> Tensor:
        """Positional embedding for an ``h x w`` latent grid: the learned one, or its bicubic resize."""
        if (h, w) == self.grid:
            return self.positional_embedding
        if (h, w) not in self._warned_grids:
            self._warned_grids.add((h, w))
            warnings.warn(
                f"latent grid {h}x{w} differs from the neck's {self.grid[0]}x{self.grid[1]} positional grid; "
                "interpolating its positional embedding bicubically (features may be less accurate)",
                stacklevel=3,
            )
        cls_pos, patch_pos = self.positional_embedding[:1], self.positional_embedding[1:]
        patch_pos = patch_pos.reshape(1, *self.grid, -1).permute(0, 3, 1, 2)
        patch_pos = F.interpolate(patch_pos, size=(h, w), mode="bicubic", align_corners=False)
        patch_pos = patch_pos.permute(0, 2, 3, 1).reshape(h * w, -1)
        return torch.cat([cls_pos, patch_pos], dim=0)

    def forward(self, y_hat: Tensor) -> Tensor:
        """``y_hat (B, C, h, w)`` -> tokens ``(B, 1 + h*w, width)``."""
        b, c, h, w = y_hat.shape
        if c != self.proj.in_features:
            raise MismatchError(
                f"the neck reads {self.proj.in_features}-channel latents but got {c} channels; "
                "use a neck trained for this codec"
            )
        x = self.proj(y_hat.flatten(2).transpose(1, 2))  # (B, h*w, width)
        cls = self.class_embedding.to(x.dtype).view(1, 1, -1).expand(b, -1, -1)
        x = torch.cat([cls, x], dim=1) + self.positions(h, w).to(x.dtype)
        return self.block(self.ln_pre(x))


@dataclass(frozen=True)
class NeckInfo(ModelInfo):
    """What a neck was made for, stored as the neck file's safetensors string metadata.

    ``codec_digest`` is the first 4 bytes (8 hex digits) of the sha256 of the codec weights whose ``y_hat``
    the neck was trained on, as records carry it; ``k`` is the split (the neck's tokens enter block k+1);
    ``scenario`` is the paper's d1 (codec frozen), d2 (codec retrained for humans and machines) or d3
    (codec retrained for machines only); ``config`` is :class:`TransformNeck`'s constructor arguments.
    ``quality`` is :data:`EVERY_RATE` (0) for a neck of a variable-rate codec trained on rates drawn over its whole
    range: it serves records of any rate.
    """

    format = NECK_FORMAT
    format_version = NECK_FORMAT_VERSION
    what = "neck"
    not_ours = "{path} is not a comneck neck file (it has no comneck-neck metadata); pass a neck file"
    fix = "re-export the neck"

    codec: str
    quality: int
    codec_digest: str
    clip_model: str
    clip_tag: str
    k: int
    scenario: str
    config: dict[str, Any] = field(default_factory=dict)
    targets: str = ""  # what the distillation matched, e.g. "pooled:1,layer-2/patch:1" (empty in older files)
    clip_seed: int | None = None  # clip_tag "none": the seed its random tower was drawn from (clip.tower.random_clip)
    recipe: str = ""  # RECIPES; empty in older files, which were trained as the paper writes C' (one ln_post)

    @property
    def ln_post_twice(self) -> bool:
        """Whether C' must apply ``ln_post`` twice: the authors' code does, so necks of the release recipe (theirs,
        and those trained here to reproduce them) were trained against that C' (``clip.tower.ClipTail``)."""
        return self.recipe == "release"

    @property
    def rates(self) -> str:
        """The codec and rates it serves, as messages say them: ``mbt2018-mean quality 3``, or for a neck of a
        variable-rate codec ``mbt2018-mean-vbr (every rate)``, never quality 0."""
        return f"{self.codec} (every rate)" if self.quality == EVERY_RATE else f"{self.codec} quality {self.quality}"

    def __post_init__(self):
        object.__setattr__(self, "clip_tag", tag_name(self.clip_tag))  # older files wrote random weights as "None"
        digest = _hex_digest(self.codec_digest)
        if digest is None:
            raise ValueError(f"codec_digest must be 8 hex digits (4 bytes), not {self.codec_digest!r}")
        object.__setattr__(self, "codec_digest", digest)
        if self.scenario not in SCENARIOS:
            raise ValueError(f"scenario must be one of {', '.join(SCENARIOS)}, not {self.scenario!r}")
        if self.recipe not in ("", *RECIPES):
            raise ValueError(f"recipe must be one of {', '.join(RECIPES)}, not {self.recipe!r}")

    @classmethod
    def _decode(cls, meta: dict[str, str]) -> NeckInfo:
        return cls(
            codec=meta["codec"],
            quality=int(meta["quality"]),
            codec_digest=meta["codec_digest"],
            clip_model=meta["clip_model"],
            clip_tag=meta["clip_tag"],
            k=int(meta["k"]),
            scenario=meta["scenario"],
            config=json.loads(meta["config"]),
            targets=meta.get("targets", ""),
            clip_seed=json.loads(meta.get("clip_seed", "null")),
            recipe=meta.get("recipe", ""),
        )

    def check_matches(
        self,
        codec: str,
        quality: int,
        digest_hex: str | bytes,
        clip_model: str,
        clip_tag: str | None,
        k: int,
        *,
        neck: Path | str = "this neck",
    ) -> None:
        """Raise :class:`MismatchError` naming the first field where the neck differs from what it is used with.

        ``codec``/``quality``/``digest_hex`` describe the record's codec, ``clip_model``/``clip_tag``/``k`` the
        CLIP tower and split the features are computed with; ``neck`` names the neck in the message.
        """
        fix = "use a matching neck or `neck`"
        every_rate = self.quality == EVERY_RATE and codec == self.codec
        if not every_rate and (codec, int(quality)) != (self.codec, self.quality):
            raise MismatchError(
                f"neck {neck} was trained for codec {self.rates} but the record was coded "
                f"with {codec} quality {quality}; {fix}", params=("neck",)
            )
        digest = _hex_digest(digest_hex)
        if digest != self.codec_digest:
            shown = digest or repr(digest_hex)
            raise MismatchError(
                f"neck {neck} was trained on latents of {self.rates} weights "
                f"{self.codec_digest} but the record was coded with weights {shown}; {fix}", params=("neck",)
            )
        if (clip_model, tag_name(clip_tag)) != (self.clip_model, self.clip_tag):
            raise MismatchError(
                f"neck {neck} was trained for CLIP {self.clip_model}/{self.clip_tag} but features are asked of "
                f"{clip_model}/{clip_tag}; {fix}", params=("neck",)
            )
        if int(k) != self.k:
            raise MismatchError(
                f"neck {neck} feeds CLIP block {self.k + 1} (split k={self.k}) but the split is k={k}; {fix}",
                params=("neck",)
            )


def _hex_digest(value: str | bytes) -> str | None:
    text = value.hex() if isinstance(value, (bytes, bytearray)) else str(value).lower()
    if len(text) != 8 or any(ch not in "0123456789abcdef" for ch in text):
        return None
    return text


def save_neck(neck: TransformNeck, path: Path | str, info: NeckInfo) -> None:
    """Write ``neck`` and ``info`` as one safetensors file (tensors + string metadata, no pickle).

    ``info.config`` is replaced by the neck's own constructor config, so the file always rebuilds the neck
    it holds. Written to a temporary file in the target folder, then moved into place.
    """
    save_module(neck, path, info)


def load_neck(path: Path | str, device: torch.device | str = "cpu") -> tuple[TransformNeck, NeckInfo]:
    """Read a neck file written by :func:`save_neck` -> (neck in eval mode on ``device``, its :class:`NeckInfo`)."""
    # JSON gave the grid as a list; the neck compares it with latent grids as a tuple
    return load_module(path, NeckInfo,
                       lambda info: TransformNeck(**{**info.config, "grid": tuple(info.config["grid"])}), device)
