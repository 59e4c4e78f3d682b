"""CLIP features for MLLMs, three ways (paper Fig. 2 and §4.1):

- ``neck`` (the product): ``.cnk`` -> entropy-decode ``y_hat`` -> transform-neck T -> C' -> features.
  The image is never decoded: ``g_s`` does not run.
- ``reconstruction`` (the paper's *Reconstruction* baseline): ``.cnk`` -> ``g_s`` -> x_hat -> full C -> features.
- ``uncompressed`` (the upper bound): image -> full C -> features, i.e. C(x).

Feature selection follows Hugging Face's hidden-state numbering (see :func:`comneck_cli.clip.select_features`);
the default, layer -2 patch tokens, is what LLaVA and Shikra feed their projector.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import Tensor, nn

from comneck_cli import weights as registry
from comneck_cli.formats import CnkError, Limits, Record, latent_grids

from comneck_cli.coding import check_record
from comneck_cli.clip.tower import ClipHead, ClipTail, load_clip, weights_entry_name
from comneck_cli.codecs import Codec
from comneck_cli.errors import ComneckError
from comneck_cli.models.neck import NeckInfo, TransformNeck, load_neck
from comneck_cli.clip.presets import expand_to_square, mean_colour

VIAS = ("neck", "reconstruction", "uncompressed")


def neck_registry_name(codec: str, quality: int) -> str:
    """Where ``features`` looks for a neck when none is named: ``{codec}-q{quality}-neck``, or ``{codec}-neck`` for a
    variable-rate codec, whose one neck serves every rate."""
    from comneck_cli.codecs import CODECS

    spec = CODECS.get(codec)
    return f"{codec}-neck" if spec is not None and spec.variable_rate else f"{codec}-q{quality}-neck"


def resolve_neck(neck: str | Path | None, record: Record | None = None) -> Path:
    """``--neck FILE`` or ``--neck NAME`` (registry), else the registry's neck for the record's codec."""
    if neck is not None:
        path = Path(neck)
        if path.suffix == ".safetensors" or path.exists():
            if not path.is_file():
                raise ComneckError(f"neck file {path} does not exist")
            return path
        name = str(neck)
    elif record is not None and record.codec_name is not None:
        name = neck_registry_name(record.codec_name, record.quality)
    else:
        raise ComneckError("no neck given; pass --neck NAME|FILE")
    try:
        return registry.resolve(name)
    except registry.WeightsError as exc:
        raise ComneckError(
            f"{exc}; train a neck with `comneck train neck` or pass --neck FILE" if neck is None else str(exc)
        ) from exc


def resolve_clip(model_name: str, tag: str | None, weights_file: Path | None = None, device="cpu") -> nn.Module:
    """CLIP from ``weights_file``, else the registry entry ``clip-<model>-<tag>``, else open_clip's cache/hub."""
    if weights_file is None:
        name = weights_entry_name(model_name, tag)
        if registry.lookup(name) is not None:
            try:
                weights_file = registry.resolve(name)
            except registry.WeightsError as exc:
                raise ComneckError(str(exc)) from exc
    return load_clip(model_name, tag, weights_file=weights_file, device=device)


@dataclass
class FeatureExtractor:
    """The loaded pieces for one (neck, CLIP) pair, reused over many inputs.

    ``tail`` is C' (blocks k+1..L); ``head`` is C (patch embedding + first k blocks), used only by the
    reference paths that start from pixels.
    """

    clip: nn.Module
    k: int
    device: torch.device
    neck: TransformNeck | None = None
    info: NeckInfo | None = None
    neck_path: Path | None = None
    pad_to_square: bool = False  # LLaVA-1.5's expand2square before CLIP's own preprocessing
    clip_model: str | None = None  # the tower's open_clip name and weights tag, for the features' metadata;
    clip_tag: str | None = None  # a neck's info says them where there is one
    limits: Limits | None = None  # max_tokens bounds the latent grids the neck and C' take (default: environment's)
    _preprocess: object = field(default=None, repr=False)

    @property
    def tail(self) -> ClipTail:
        if not hasattr(self, "_tail"):
            self._tail = ClipTail(self.clip.visual, self.k)
        return self._tail

    @property
    def head(self) -> ClipHead:
        if not hasattr(self, "_head"):
            self._head = ClipHead(self.clip.visual, self.k)
        return self._head

    @classmethod
    def for_neck(cls, neck_path: Path, *, clip_weights: Path | None = None, device="cpu") -> "FeatureExtractor":
        neck, info = load_neck(neck_path, device=device)
        clip = resolve_clip(info.clip_model, info.clip_tag, clip_weights, device=device)
        return cls(clip=clip, k=info.k, device=torch.device(device), neck=neck, info=info, neck_path=neck_path)

    @classmethod
    def for_clip(cls, model_name: str, tag: str | None, *, clip_weights: Path | None = None, k: int = 0,
                 device="cpu") -> "FeatureExtractor":
        clip = resolve_clip(model_name, tag, clip_weights, device=device)
        return cls(clip=clip, k=k, device=torch.device(device), clip_model=model_name, clip_tag=tag)

    def preprocess(self, image: np.ndarray) -> Tensor:
        """open_clip's own eval transform (resize shortest side, centre crop, normalise) for one uint8 image."""
        from open_clip.model import get_model_preprocess_cfg
        from open_clip.transform import PreprocessCfg, image_transform_v2
        from PIL import Image

        cfg = PreprocessCfg(**get_model_preprocess_cfg(self.clip))
        if self._preprocess is None:
            self._preprocess = image_transform_v2(cfg, is_train=False)
        if self.pad_to_square:
            image = expand_to_square(image, mean_colour(cfg.mean))
        return self._preprocess(Image.fromarray(image, "RGB"))

    @torch.inference_mode()
    def from_latents(self, y_hats: Sequence[Tensor], layer: int, select: str) -> Tensor:
        """C'(T(y_hat)) for latents of one grid size, batched: (B, ...) features."""
        if self.neck is None:
            raise ComneckError("no neck loaded; pass --neck")
        for y_hat in y_hats:
            self.check_tokens(*y_hat.shape[-2:], "latents")
        return self._tail_features(self.neck(torch.cat(list(y_hats)).to(self.device)), layer, select)

    @torch.inference_mode()
    def from_images(self, images: Sequence[np.ndarray], layer: int, select: str) -> Tensor:
        """C(x) through the full tower, batched."""
        x = torch.stack([self.preprocess(im) for im in images]).to(self.device)
        return self._tail_features(self.head(x), layer, select)

    def _tail_features(self, tokens: Tensor, layer: int, select: str) -> Tensor:
        # Only what the selection needs: LLaVA's layer -2 never runs the last block.
        out = self.tail(tokens, layer=None if select in ("pooled", "projected") else layer,
                        embedding=select == "pooled", projected=select == "projected")
        return out.select(layer, select).float().cpu()

    def check_tokens(self, rows: int, cols: int, subject: str) -> None:
        """Refuse a latent grid with more positions than ``limits.max_tokens``: the neck and C' attend over all of
        them at once, so their memory grows with its square (README, "Reliability")."""
        try:
            (self.limits or Limits.from_env()).check_tokens(rows, cols, subject)
        except CnkError as exc:
            raise ComneckError(str(exc)) from None

    def check(self, record: Record, codec: Codec) -> None:
        """Refuse, before anything is decoded, a record the neck was not trained for (codec, quality, or codec
        weights) or whose latent grid is over the token limit."""
        self.check_tokens(*latent_grids(record.height, record.width)[0], "record")
        if self.info is None:
            return
        self.info.check_matches(
            record.codec_name or f"id {record.codec_id}", record.quality, record.weights_digest,
            self.info.clip_model, self.info.clip_tag, self.info.k, neck=self.neck_path or "this neck",
        )
        check_record(record, codec)


def metadata(extractor: FeatureExtractor, via: str, layer: int, select: str, source: str) -> dict[str, str]:
    """What a features file records about how it was made (strings, so safetensors can carry it)."""
    visual = extractor.clip.visual
    meta = {
        "format": "comneck-features",
        "via": via,
        "layer": str(layer),
        "select": select,
        "source": source,
        "clip_image_size": str(getattr(visual, "image_size", "")),
        "pad_to_square": str(extractor.pad_to_square),
    }
    if extractor.clip_model is not None:
        meta.update(clip_model=extractor.clip_model, clip_tag=str(extractor.clip_tag))
    if extractor.info is not None:
        meta.update(
            clip_model=extractor.info.clip_model, clip_tag=str(extractor.info.clip_tag), k=str(extractor.info.k),
            neck_codec=extractor.info.codec, neck_quality=str(extractor.info.quality),
            neck_scenario=extractor.info.scenario,
        )
    return meta


def save_features(tensor: Tensor, path: Path | None, meta: dict[str, str], *, force: bool = False) -> bytes | None:
    """Serialise by extension: ``.pt`` (dict with tensor + metadata), ``.safetensors``, ``.npy``; atomic write."""
    import io

    from comneck_cli.io.outputs import write_atomic

    suffix = path.suffix.lower() if path is not None else ".pt"
    tensor = tensor.contiguous()
    if suffix == ".pt":
        buffer = io.BytesIO()
        torch.save({"features": tensor, "metadata": dict(meta)}, buffer)
        data = buffer.getvalue()
    elif suffix == ".safetensors":
        from safetensors.torch import save

        data = save({"features": tensor}, metadata=dict(meta))
    elif suffix == ".npy":
        buffer = io.BytesIO()
        np.save(buffer, tensor.numpy())
        data = buffer.getvalue()
    else:
        raise ComneckError(f"cannot write features to {path}: use a .pt, .safetensors or .npy file, or a folder")
    if path is None:
        return data
    write_atomic(path, data, force=force)
    return None
