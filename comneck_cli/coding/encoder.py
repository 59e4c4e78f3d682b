"""Images -> ``.cnk`` records: g_a, entropy coding at a rate or a bpp target, semantic gain maps and pre-editing
(:class:`ImageEncoder`, the encoder of ``comneck encode`` and ``comneck batch encode``)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from comneck_cli.formats import PAD_MULTIPLE, CnkError, ImportanceMap, Limits, Record

from comneck_cli.codecs import RATE_STEPS, Codec
from comneck_cli.errors import UsageError
from comneck_cli.io.images import check_size, to_tensor
from comneck_cli.coding.semantic import DEFAULT_STRENGTH, strength_steps


def encode(image: np.ndarray, codec: Codec, *, metadata: dict | None = None,
           importance: ImportanceMap | None = None, limits: Limits | None = None) -> Record:
    """uint8 H×W×3 -> one record: entropy-coded strings plus what a decoder needs to check them.

    With ``importance`` (``semantic.semantic_map``; variable-rate codecs) each latent position is quantised with
    its own gain and the map travels in the record (SPEC §7.1). An image larger than ``limits`` allow (default
    the environment's) is refused before g_a runs: its record would be refused by every reader.
    """
    if importance is not None:
        check_encodable([image], limits)
        return code_semantic(image, codec, codec.analyze(to_tensor(image, PAD_MULTIPLE)), importance, metadata)
    return encode_batch([image], codec, metadata=metadata, limits=limits)[0]


def check_encodable(images: Sequence[np.ndarray], limits: Limits | None = None) -> None:
    """Refuse any image whose record the ``.cnk`` reader would refuse under ``limits``: the writer's own bound."""
    for image in images:
        check_size(image.shape[0], image.shape[1], "image to encode", limits)


def encode_batch(images: Sequence[np.ndarray], codec: Codec, *, metadata: dict | None = None,
                 bpp_target: float | None = None, limits: Limits | None = None) -> list[Record]:
    """Encode several images, running g_a once per group of images that pad to the same size.

    The records are identical to what :func:`encode` writes image by image, up to the float rounding of a
    batched g_a (the strings stay decodable either way: the decoder only needs what is in the record).
    With ``bpp_target`` each image is coded at its own rate (:func:`encode_to_bpp`), one at a time. Sizes are
    checked against ``limits`` first, as in :func:`encode`.
    """
    check_encodable(images, limits)
    if bpp_target is not None:
        return [encode_to_bpp(image, codec, bpp_target, metadata=metadata, limits=limits) for image in images]
    records: list[Record | None] = [None] * len(images)
    for indices in _same_shape_groups([_padded_shape(im.shape[:2]) for im in images]):
        x = torch.cat([to_tensor(images[i], PAD_MULTIPLE) for i in indices])
        for i, (strings, _) in zip(indices, codec.compress_batch(x)):
            records[i] = record_from_strings(images[i], codec, strings, metadata)
    return records  # type: ignore[return-value]


@dataclass
class ImageEncoder:
    """Images -> records the way ``comneck encode`` and ``comneck batch encode`` code them.

    Each image is first edited by the pre-editing module P (``editor``, ``preedit.PreEdit``) or given a semantic
    importance map (``guide``, ``semantic.Guide``, with ``strength``), then coded at the codec's rate or, with
    ``bpp_target``, at the rate that meets it. Plain and pre-edited images share g_a passes (:func:`encode_batch`).
    Build one from command-line settings with :meth:`load`.
    """

    codec: Codec
    bpp_target: float | None = None
    guide: Any = None
    strength: float = DEFAULT_STRENGTH
    editor: Any = None
    limits: Limits | None = None  # default: the environment's

    def __repr__(self) -> str:
        # One line: the guide (a CLIP tower) and P are networks whose reprs run to hundreds of lines.
        parts = [repr(self.codec)]
        if self.bpp_target is not None:
            parts.append(f"bpp_target={self.bpp_target:g}")
        if self.guide is not None:
            parts.append(f"semantic=True, strength={self.strength:g}")
        if self.editor is not None:
            parts.append("pre_edit=True")
        return f"ImageEncoder({', '.join(parts)})"

    @classmethod
    def load(cls, codec: Codec, *, bpp_target: float | None = None, semantic: bool = False,
             semantic_strength: float | None = None, clip_model: str = "ViT-L-14", clip_tag: str | None = "openai",
             clip_weights: str | Path | None = None, pre_edit: str | None = None,
             device: torch.device | str = "cpu", limits: Limits | None = None) -> "ImageEncoder":
        """Check the options against each other and the codec, then load the CLIP guide or P they name.

        ``pre_edit`` is ``""`` for the registry's ``{codec}-preedit``, a name or a file; None codes unedited.
        """
        check_guidance(codec.spec, semantic, semantic_strength, pre_edit)
        if semantic:
            from comneck_cli.coding.semantic import load_guide

            strength = DEFAULT_STRENGTH if semantic_strength is None else semantic_strength
            guide = load_guide(clip_model, clip_tag, clip_weights, device=device)
            return cls(codec, bpp_target, guide=guide, strength=strength, limits=limits)
        if pre_edit is not None:
            from comneck_cli.models.preedit import load_pre_edit

            weights = Path(clip_weights) if clip_weights is not None else None
            return cls(codec, bpp_target, editor=load_pre_edit(pre_edit or None, codec, clip_weights=weights,
                                                               device=device), limits=limits)
        return cls(codec, bpp_target, limits=limits)

    def __call__(self, images: Sequence[np.ndarray]) -> list[Record]:
        check_encodable(images, self.limits)  # before P or the CLIP guide run on an image no reader would take
        if self.editor is not None:
            edited = [self.editor(image) for image in images]
            return encode_batch(edited, self.codec, metadata={"pre_edit": self.editor.digest},
                                bpp_target=self.bpp_target, limits=self.limits)
        if self.guide is not None:
            from comneck_cli.coding.semantic import semantic_map

            maps = [semantic_map(image, self.guide, self.strength) for image in images]
            if self.bpp_target is None:
                return [encode(image, self.codec, importance=m, limits=self.limits) for image, m in zip(images, maps)]
            return [encode_to_bpp(image, self.codec, self.bpp_target, importance=m, limits=self.limits)
                    for image, m in zip(images, maps)]
        return encode_batch(list(images), self.codec, bpp_target=self.bpp_target, limits=self.limits)

    def made(self, record: Record) -> bool:
        """Whether ``record`` was coded this way, guidance-wise (resuming a batch job): a map of this strength
        exactly when guided, P's digest exactly when pre-edited. Codec, rate and size are checked elsewhere."""
        if (record.importance_map is not None) != (self.guide is not None):
            return False
        if self.guide is not None:
            try:
                stored = ImportanceMap.unpack(record.importance_map, record.height, record.width).strength
            except CnkError:  # a damaged map is not this encoder's output
                return False
            if stored != strength_steps(self.strength):
                return False
        return (record.metadata or {}).get("pre_edit") == (self.editor.digest if self.editor is not None else None)


def check_guidance(spec, semantic: bool, semantic_strength: float | None, pre_edit: str | None) -> None:
    """``semantic``, ``semantic_strength`` and ``pre_edit`` against each other and the codec (``CodecSpec``)."""
    if semantic_strength is not None and not semantic:
        raise UsageError("`semantic_strength` needs `semantic`", params=["semantic_strength", "semantic"])
    if semantic and pre_edit is not None:
        raise UsageError("pass `semantic` or `pre_edit`, not both", params=["semantic", "pre_edit"])
    if semantic and not spec.variable_rate:
        raise _not_variable_rate(spec.name)


def _not_variable_rate(name: str) -> UsageError:
    return UsageError(f"`semantic` needs a variable-rate codec (e.g. mbt2018-mean-vbr), not {name}",
                      params=["semantic"])


def encode_to_bpp(image: np.ndarray, codec: Codec, target: float, *, tolerance: float = 0.05,
                  metadata: dict | None = None, importance: ImportanceMap | None = None,
                  limits: Limits | None = None) -> Record:
    """Encode at the rate R whose record (container included) lands on ``target`` bits per pixel.

    Bisects R over the variable-rate codec's range, re-coding the same g_a output (the transform runs once).
    Returns the first record within ``tolerance`` (relative) of the target, else the closest one found; a
    target outside what the codec reaches gives the end of the range, and the caller can read its bpp.
    With ``importance`` every trial is a semantic record (map section included in the bpp). Sizes are checked
    against ``limits`` first, as in :func:`encode`.
    """
    from comneck_cli.codecs import check_rate_options

    check_rate_options(codec.spec, None, target)
    check_encodable([image], limits)
    y = codec.analyze(to_tensor(image, PAD_MULTIPLE))
    lo, hi = float(min(codec.spec.qualities)), float(max(codec.spec.qualities))
    best = None
    for _ in range(24):  # 24 halvings of a 7-level range reach the 1/1000 grid the record stores
        at = codec.at_rate((lo + hi) / 2)
        record = (record_from_strings(image, at, at.code(y)[0], metadata) if importance is None
                  else code_semantic(image, at, y, importance, metadata))
        if best is None or abs(record.bits_per_pixel - target) < abs(best.bits_per_pixel - target):
            best = record
        if abs(record.bits_per_pixel - target) <= tolerance * target or hi - lo < 1 / RATE_STEPS:
            break
        lo, hi = (at.rate, hi) if record.bits_per_pixel < target else (lo, at.rate)
    if abs(best.bits_per_pixel - target) <= tolerance * target:
        return best
    for end in (min(codec.spec.qualities), max(codec.spec.qualities)):  # never a midpoint: the target may lie beyond
        at = codec.at_rate(end)
        record = (record_from_strings(image, at, at.code(y)[0], metadata) if importance is None
                  else code_semantic(image, at, y, importance, metadata))
        if abs(record.bits_per_pixel - target) <= abs(best.bits_per_pixel - target):
            best = record
    return best


def record_from_strings(image: np.ndarray, codec: Codec, strings: Sequence[bytes], metadata: dict | None = None) -> Record:
    """The record of ``image`` coded by ``codec`` (at its rate) into ``strings``: header fields from the codec."""
    height, width = image.shape[:2]
    return Record(codec_id=codec.spec.codec_id, quality=codec.quality, weights_digest=codec.digest, height=height,
                  width=width, strings=tuple(strings), metadata=metadata, machine_only=codec.machine_only,
                  rate=codec.stored_rate)


def code_semantic(image: np.ndarray, codec: Codec, y: torch.Tensor, importance: ImportanceMap,
                  metadata: dict | None = None) -> Record:
    """Entropy-code g_a's output ``y`` with the per-position gains of ``importance``; the map goes in the record."""
    from dataclasses import replace

    from comneck_cli.coding.semantic import gain_map

    if not codec.spec.variable_rate:
        raise _not_variable_rate(codec.name)
    strings, _ = codec.code(y, gain=gain_map(codec.model, codec.rate, importance, tuple(y.shape[-2:])))
    return replace(record_from_strings(image, codec, strings, metadata), importance_map=importance.pack())



def _padded_shape(size: tuple[int, int]) -> tuple[int, int]:
    return tuple(-(-s // PAD_MULTIPLE) * PAD_MULTIPLE for s in size)  # type: ignore[return-value]


def _same_shape_groups(shapes: Sequence[tuple]) -> list[list[int]]:
    groups: dict[tuple, list[int]] = {}
    for i, shape in enumerate(shapes):
        groups.setdefault(shape, []).append(i)
    return list(groups.values())

