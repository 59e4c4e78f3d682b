"""The decoder adapter (CoTAM): a light network after ``g_s`` that repairs the reconstruction for MLLMs.

    .cnk ──► y_hat ──► g_s ──► x_hat ──► A ──► x̃ = clamp(x_hat + A(x_hat), 0, 1) ──► CLIP / the MLLM

Compression distortion hurts an MLLM at several levels at once (edges and textures in CLIP's shallow blocks,
semantics in its deep ones), so A is trained (``comneck train adapter``) with a multi-level loss, pixel MSE plus
the MSE of a shallow and of a deep CLIP hidden state between C(x̃) and C(x). A is small on purpose: a 3×3 conv
in, ``blocks`` residual blocks (3×3 conv, ReLU, 3×3 conv, skip), a 3×3 conv out whose weights start at zero, so an
untrained adapter is the identity; width 64 and 4 blocks give 298,947 parameters (the post-processing U-Net has
31 M). ``comneck decode --for mllm`` applies it.

A trained adapter is a safetensors file whose metadata (:class:`AdapterInfo`) names the codec and the digest of
the codec weights whose reconstructions it repairs, the CLIP and layers it was trained against, and its config.
It is registered as kind ``adapter`` under ``{codec}-adapter`` (variable-rate codecs: one for every rate) or
``{codec}-q{quality}-adapter``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from comneck_cli.errors import ComneckError
from comneck_cli.modelfiles import ModelInfo, load_module, save_module

ADAPTER_FORMAT = "comneck-adapter"
ADAPTER_FORMAT_VERSION = "1"


class _ResBlock(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(width, width, 3, padding=1), nn.ReLU(inplace=True),
                                  nn.Conv2d(width, width, 3, padding=1))

    def forward(self, x: Tensor) -> Tensor:
        return x + self.body(x)


class DecoderAdapter(nn.Module):
    """x_hat (B, 3, H, W) in [0, 1] -> x̃ = clamp(x_hat + A(x_hat), 0, 1); any size (fully convolutional)."""

    def __init__(self, width: int = 64, blocks: int = 4):
        super().__init__()
        if width < 1 or blocks < 0:
            raise ValueError(f"adapter width {width} must be positive and blocks {blocks} not negative")
        self.config = {"width": int(width), "blocks": int(blocks)}
        self.head = nn.Conv2d(3, width, 3, padding=1)
        self.body = nn.Sequential(*(_ResBlock(width) for _ in range(blocks)))
        self.tail = nn.Conv2d(width, 3, 3, padding=1)
        nn.init.zeros_(self.tail.weight)  # start as the identity: training only ever departs from g_s's output
        nn.init.zeros_(self.tail.bias)

    def forward(self, x: Tensor) -> Tensor:
        return (x + self.tail(self.body(self.head(x)))).clamp(0, 1)


@dataclass(frozen=True)
class AdapterInfo(ModelInfo):
    """What an adapter was trained for: the codec (name, first 8 hex digits of its weights' sha256) whose
    reconstructions it repairs, the CLIP and the hidden states (HF numbering) of its multi-level loss, the loss
    weights (pixel, shallow, deep), the semantic strength of the records it saw (0: plain records), its config."""

    format = ADAPTER_FORMAT
    format_version = ADAPTER_FORMAT_VERSION
    what = "adapter"
    file_what = "decoder adapter"
    not_ours = "{path} is not a comneck decoder adapter; pass one written by `comneck train adapter`"

    codec: str
    codec_digest: str
    clip_model: str
    clip_tag: str
    layers: tuple[int, int]
    loss_weights: tuple[float, float, float]
    semantic_strength: float = 0.0
    config: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def _json(cls, name: str) -> bool:
        return True  # adapter files have stored every field as JSON since format 1

    @classmethod
    def _decode(cls, meta: dict[str, str]) -> AdapterInfo:
        values = {f.name: json.loads(meta[f.name]) for f in fields(cls)}
        values["layers"] = tuple(int(v) for v in values["layers"])
        values["loss_weights"] = tuple(float(v) for v in values["loss_weights"])
        return cls(**values)

    def check_codec(self, codec, path: Path | str) -> None:
        """Refuse reconstructions of another codec or other codec weights than the adapter was trained on."""
        if (self.codec, self.codec_digest) != (codec.name, codec.digest.hex()):
            raise ComneckError(f"adapter {path} was trained on reconstructions of {self.codec} weights "
                               f"{self.codec_digest}, not {codec.name} weights {codec.digest.hex()}; pass the "
                               "adapter trained for these weights (--adapter FILE)")


def adapter_registry_name(codec: str, quality: int | None = None) -> str:
    """``{codec}-adapter`` for variable-rate codecs (one model, every rate), else ``{codec}-q{quality}-adapter``."""
    from comneck_cli.codecs import registry_name

    return f"{registry_name(codec, quality)}-adapter"


def save_adapter(adapter: DecoderAdapter, path: Path | str, info: AdapterInfo) -> None:
    """Write ``adapter`` with ``info`` (its config replaced by the adapter's own) as one safetensors file, atomically."""
    save_module(adapter, path, info)


def load_adapter(path: Path | str, device: torch.device | str = "cpu") -> tuple[DecoderAdapter, AdapterInfo]:
    """Read a file written by :func:`save_adapter` -> (adapter in eval mode on ``device``, its info)."""
    return load_module(path, AdapterInfo, lambda info: DecoderAdapter(**info.config), device)


def resolve_adapter(given: str | Path | None, codec) -> Path:
    """``--adapter FILE|NAME``, else the registry entry :func:`adapter_registry_name` of the record's codec."""
    from comneck_cli import weights as registry

    if given is not None and Path(given).is_file():
        return Path(given)
    name = str(given) if given is not None else adapter_registry_name(codec.name, codec.quality)
    if registry.lookup(name) is None:
        raise ComneckError(f"no decoder adapter {name!r}: pass --adapter FILE or train one with "
                           "`comneck train adapter`" if given is None else
                           f"adapter {given} is neither a file nor a registered name (`comneck weights list`)")
    try:
        return registry.resolve(name)
    except registry.WeightsError as exc:
        raise ComneckError(str(exc)) from exc


@torch.inference_mode()
def adapt(adapter: DecoderAdapter, image: np.ndarray) -> np.ndarray:
    """uint8 H×W×3 reconstruction -> the adapter's uint8 H×W×3 image for MLLMs."""
    from comneck_cli.io.images import from_tensor, to_tensor

    device = next(adapter.parameters()).device
    height, width = image.shape[:2]
    return from_tensor(adapter(to_tensor(image, 1).to(device)), height, width, 1)
