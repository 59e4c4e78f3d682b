"""``.cnk`` records -> latents and images: the record checked against its codec, ``y_hat`` entropy-decoded (the
neck's input), ``g_s`` for people, and :class:`CodecCache`, which finds and loads each record's codec once."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from comneck_cli.formats import PAD_MULTIPLE, ImportanceMap, Record, codec_name

from comneck_cli import codecs, hub
from comneck_cli import weights as registry
from comneck_cli.codecs import RATE_STEPS, Codec
from comneck_cli.errors import ComneckError, MismatchError
from comneck_cli.io.images import from_tensor


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
        _refuse_retired(record)
        raise MismatchError(
            f"record was coded with codec weights {record.weights_digest.hex()}, but {codec.source} is "
            f"{codec.digest.hex()}; decode with the weights that encoded it (`weights` FILE)", params=["weights"]
        )


def _refuse_retired(record: Record) -> None:
    """A record of a default codec file that no longer ships (issue #34) gets the one line that restores it."""
    old = registry.retired_codec(record.weights_digest.hex())
    if old is not None:
        raise MismatchError(f"record was coded with codec weights {record.weights_digest.hex()}, {old.restore()}",
                            params=["weights"])


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
            self._loaded[key] = codecs.load_codec(name, quality, weights=weights, device=self.device)
        return self._loaded[key].at_rate(quality) if variable else self._loaded[key]

    def _weights_of(self, record: Record) -> Path | str | None:
        """The cache's ``weights`` when given, else the registered codec file whose sha256 begins with the record's
        weights digest (a ComNeck d2 release beside the default d1 one), else None: the default name."""
        if self.weights is not None:
            return self.weights
        if record.weights_digest not in self._registered:
            self._registered[record.weights_digest] = hub.find_digest(record.weights_digest.hex(), "codec")
        if self._registered[record.weights_digest] is None:
            _refuse_retired(record)  # before the default loads only to be refused
        return self._registered[record.weights_digest]

    def for_record(self, record: Record) -> Codec:
        name = codec_name(record.codec_id)
        if name is None:
            raise ComneckError(f"record uses codec id {record.codec_id}, which this comneck does not know; upgrade comneck")
        codecs.check_record_level(name, record.quality, record.rate)
        codec = self.get(name, record.quality, self._weights_of(record))
        if record.rate is None:
            return codec
        if not codec.spec.variable_rate:
            raise ComneckError(f"record of fixed-rate codec {name} carries a rate section; the file is damaged")
        return codec.at_rate(record.rate / RATE_STEPS)
