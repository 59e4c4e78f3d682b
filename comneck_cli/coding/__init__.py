"""The library API: encode an image into a ``.cnk`` record and decode it back, for people or machines.

The Click commands are thin wrappers over these functions::

    from comneck_cli import load_codec, read_image, encode, decode
    codec = load_codec("mbt2018-mean", 3)
    record = encode(read_image("photo.png"), codec)
    image = decode(record, codec)          # uint8 H×W×3
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence, TypeVar

import numpy as np
import torch

from comneck_cli.formats import PAD_MULTIPLE, CnkError, ImportanceMap, Limits, Record, codec_name

from comneck_cli import hub
from comneck_cli.codecs import RATE_STEPS, Codec, load_codec
from comneck_cli.errors import ComneckError, MismatchError, UsageError
from comneck_cli.io.images import check_size, from_tensor, to_tensor
from comneck_cli.coding.semantic import DEFAULT_STRENGTH, strength_steps

T = TypeVar("T")
R = TypeVar("R")


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when present; asking for CUDA without it is one clear error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ComneckError("`device` cuda was requested but no CUDA device is available; use `device` cpu",
                           params=["device"])
    try:
        return torch.device(name)
    except RuntimeError as exc:
        raise ComneckError(f"unknown device {name!r}; use auto, cpu or cuda") from exc


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


def record_gain(record: Record, codec: Codec) -> torch.Tensor:
    """The gain map a semantic record was coded with, rebuilt from its importance-map section (SPEC §7.1)."""
    from comneck_cli.formats import CnkError, latent_grids

    from comneck_cli.coding.semantic import gain_map

    if not codec.spec.variable_rate:
        raise ComneckError(f"record carries an importance map, but {codec.name} is not a variable-rate codec; "
                           "the file is damaged")
    try:
        importance = ImportanceMap.unpack(record.importance_map, record.height, record.width)
    except CnkError as exc:
        raise ComneckError(str(exc)) from None
    return gain_map(codec.model, codec.rate, importance, latent_grids(record.height, record.width)[0])


def _padded_shape(size: tuple[int, int]) -> tuple[int, int]:
    return tuple(-(-s // PAD_MULTIPLE) * PAD_MULTIPLE for s in size)  # type: ignore[return-value]


def _same_shape_groups(shapes: Sequence[tuple]) -> list[list[int]]:
    groups: dict[tuple, list[int]] = {}
    for i, shape in enumerate(shapes):
        groups.setdefault(shape, []).append(i)
    return list(groups.values())


def check_record(record: Record, codec: Codec) -> None:
    """Refuse a record that the loaded codec did not write (other codec, quality or weights)."""
    name = codec_name(record.codec_id) or f"unknown codec id {record.codec_id}"
    if codec.spec.variable_rate and record.codec_id == codec.spec.codec_id:
        if record.rate is None:
            raise ComneckError(f"record of variable-rate codec {name} has no rate section; the file is damaged")
        if record.rate != codec.stored_rate:
            raise ComneckError(f"record was coded at rate {record.rate / RATE_STEPS:g}, not {codec.rate:g}; "
                               "use codec.at_rate(record rate) or CodecCache.for_record")
    elif record.codec_id != codec.spec.codec_id or record.quality != codec.quality:
        raise ComneckError(
            f"record was coded with {name} quality {record.quality}, not {codec.name} quality {codec.quality}"
        )
    if record.weights_digest != codec.digest:
        raise MismatchError(
            f"record was coded with codec weights {record.weights_digest.hex()}, but {codec.source} is "
            f"{codec.digest.hex()}; decode with the weights that encoded it (`weights` FILE)", params=["weights"]
        )


def decode_latents(record: Record, codec: Codec) -> torch.Tensor:
    """Entropy-decode ``y_hat`` (1, M, h, w) on the CPU; ``g_s`` never runs."""
    check_record(record, codec)
    gain = None if record.importance_map is None else record_gain(record, codec)
    return codec.decompress_latents(list(record.strings), record.height, record.width, gain)


def decode(record: Record, codec: Codec) -> np.ndarray:
    """Reconstruct the image a person sees: y_hat -> g_s -> crop -> uint8 H×W×3.

    g_s runs one record at a time on purpose: a batched g_s (ELIC's attention blocks, cheng2020) rounds
    differently and would make the decoded pixels depend on the batch size.
    """
    return decode_with_latents(record, codec)[1]


def decode_with_latents(record: Record, codec: Codec) -> tuple[torch.Tensor, np.ndarray]:
    """(``y_hat``, the image :func:`decode` gives) from one entropy decode: CoTAM's adapter reads both."""
    if record.machine_only:
        raise ComneckError(
            "record was coded for machines only (scenario d3): it has no image to reconstruct; "
            "use `comneck features` instead"
        )
    y_hat = decode_latents(record, codec)
    return y_hat, from_tensor(codec.synthesize(y_hat), record.height, record.width, PAD_MULTIPLE)


def split_on_oom(run_batch: Callable[[list[T]], list[R]], items: list[T], describe: Callable[[T], str]) -> list[R]:
    """``run_batch(items)``; when CUDA runs out of memory, free the cache and retry each half.

    A single item that still does not fit raises one ComneckError naming it, so a batch job reports which
    input and which size failed instead of dying on the whole batch.
    """
    try:
        return run_batch(items)
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
        if len(items) == 1:
            raise ComneckError(
                f"out of GPU memory on {describe(items[0])} even alone; use `device` cpu or a smaller image",
                params=["device"]) from None
        half = len(items) // 2
        return split_on_oom(run_batch, items[:half], describe) + split_on_oom(run_batch, items[half:], describe)


class CodecCache:
    """Load each (codec, quality, weights) once per process: model loading and entropy tables dominate small jobs."""

    def __init__(self, device: torch.device | str = "cpu", weights: Path | str | None = None) -> None:
        self.device = torch.device(device)
        self.weights = weights
        self._loaded: dict[tuple[str, int, Path | str | None], Codec] = {}
        self._registered: dict[bytes, Path | None] = {}

    def get(self, name: str, quality: int, weights: Path | str | None = None) -> Codec:
        """The codec ``name`` at ``quality`` from ``weights`` (default: the cache's, else the registry's default)."""
        from comneck_cli.codecs import get_spec

        weights = self.weights if weights is None else weights
        variable = get_spec(name).variable_rate
        key = (name, 0 if variable else quality, weights)  # a variable-rate model serves every rate
        if key not in self._loaded:
            self._loaded[key] = load_codec(name, quality, weights=weights, device=self.device)
        return self._loaded[key].at_rate(quality) if variable else self._loaded[key]

    def _weights_of(self, record: Record) -> Path | str | None:
        """The cache's ``weights`` when given, else the registered codec file whose sha256 begins with the record's
        weights digest (a ComNeck d2 release beside the default d1 one), else None: the default name."""
        if self.weights is not None:
            return self.weights
        if record.weights_digest not in self._registered:
            self._registered[record.weights_digest] = hub.find_digest(record.weights_digest.hex(), "codec")
        return self._registered[record.weights_digest]

    def for_record(self, record: Record) -> Codec:
        name = codec_name(record.codec_id)
        if name is None:
            raise ComneckError(f"record uses codec id {record.codec_id}, which this comneck does not know; upgrade comneck")
        codec = self.get(name, record.quality, self._weights_of(record))
        if record.rate is None:
            return codec
        if not codec.spec.variable_rate:
            raise ComneckError(f"record of fixed-rate codec {name} carries a rate section; the file is damaged")
        return codec.at_rate(record.rate / RATE_STEPS)
