"""Codec specs: the named codecs comneck can use, each with its family and its sizes from CompressAI's own tables.

The quality levels are ``defaults.CODEC_LEVELS`` (torch-free, so the CLI checks -q before loading anything). The
constructor arguments (``N``, ``M``) of a zoo codec are the zoo's table, ``compressai.zoo.image.cfgs``; a codec the
zoo lacks has its constructor's own defaults; a registered comneck file says its real size in its metadata
(:func:`comneck_cli.codecs.files.file_config`).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Callable

from torch import nn

from comneck_cli.codecs._compressai import import_compressai
from comneck_cli.codecs.families import (Autoregressive, Family, LatentCodecModel, MeanScaleHyperprior,
                                         ScaleHyperprior, VariableRate)
from comneck_cli.defaults import CODEC_LEVELS, quality_problem, rate_problem
from comneck_cli.errors import FormatError, UsageError
from comneck_cli.formats import CODEC_IDS


@dataclass(frozen=True)
class CodecSpec:
    """One named codec: its CompressAI architecture (``compressai.registry.MODELS[name]``), family, and whether
    CompressAI's zoo has pretrained weights (and a size table) for it."""

    name: str
    family: Family
    zoo: bool
    notes: str = ""

    @property
    def codec_id(self) -> int:
        return CODEC_IDS[self.name]

    @property
    def variable_rate(self) -> bool:
        return self.family.variable_rate

    @property
    def qualities(self) -> dict[int, dict[str, Any]]:
        """Constructor arguments (``N``, ``M``) per quality level, from CompressAI itself: the zoo's table
        (``compressai.zoo.image.cfgs``) for a zoo codec, else the constructor's own defaults at every level."""
        if not self.zoo:
            return {q: self.default_config() for q in CODEC_LEVELS[self.name]}
        import_compressai()
        from compressai.zoo.image import cfgs

        return {q: dict(zip(("N", "M"), cfgs[self.name][q])) for q in CODEC_LEVELS[self.name]}

    def default_config(self) -> dict[str, Any]:
        """The sizes the constructor builds when given none (its signature's ``N``/``M`` defaults)."""
        parameters = inspect.signature(self.constructor()).parameters
        return {name: parameters[name].default for name in ("N", "M") if name in parameters}

    def constructor(self) -> Callable[..., nn.Module]:
        import_compressai()
        from compressai.registry import MODELS

        # registers elic-comneck and lapped-pca-vbr, which CompressAI does not have
        from comneck_cli.codecs import elic_comneck, lapped  # noqa: F401

        return MODELS[self.name]

    def latent_channels(self, quality: int) -> int:
        return latent_channels(self.qualities[quality])


def latent_channels(config: dict[str, Any]) -> int:
    """The channels of y_hat for constructor arguments ``config``."""
    if "groups" in config:  # ELIC's M is the sum of its channel groups
        return int(sum(config["groups"]))
    return int(config.get("M", config["N"]))  # cheng2020's latents have N channels


CODECS: dict[str, CodecSpec] = {
    spec.name: spec
    for spec in (
        CodecSpec("bmshj2018-hyperprior", ScaleHyperprior(), zoo=True),
        CodecSpec("mbt2018-mean", MeanScaleHyperprior(), zoo=True),
        CodecSpec("mbt2018", Autoregressive(), zoo=True, notes="autoregressive: slow to decode"),
        CodecSpec("cheng2020-anchor", Autoregressive(), zoo=True, notes="autoregressive: slow to decode"),
        # The ComNeck paper trains ELIC itself, at CompressAI's default size.
        CodecSpec("elic2022-official", LatentCodecModel(), zoo=False,
                  notes="the ComNeck paper's codec; no zoo weights"),
        # One file for every level; -q q is rate q, --rate picks any point in between. The shipped file is smaller
        # than CompressAI's default size: its metadata says so (files.file_config).
        CodecSpec("mbt2018-mean-vbr", VariableRate(), zoo=False, notes="variable rate: one model, any rate in 1..8"),
        # The ComNeck authors' own ELIC (comneck_cli.codecs.elic_comneck), coded through its CompressAI-style latent
        # codec.
        CodecSpec("elic-comneck", LatentCodecModel(), zoo=False,
                  notes="the ComNeck authors' released codec (issue #18); no zoo weights"),
        # mbt2018-mean-vbr with a lapped linear path in g_a/g_s that starts at the photos' principal components
        # (comneck_cli.codecs.lapped, issue #34); train it with `init_pca`.
        CodecSpec("lapped-pca-vbr", VariableRate(), zoo=False,
                  notes="variable rate; linear path from photo PCA + residual branches (issue #34); no weights yet"),
    )
}


def get_spec(name: str) -> CodecSpec:
    try:
        return CODECS[name]
    except KeyError:
        raise UsageError(f"unknown codec {name!r}; choose one of: {', '.join(CODECS)}") from None


def check_quality(spec: CodecSpec, quality: int) -> None:
    problem = quality_problem(spec.name, quality)
    if problem is not None:
        raise problem


def registry_name(codec: str, quality: int | None) -> str:
    """The weights-registry name of a codec's quality level, e.g. ``mbt2018-mean-q3``.

    A variable-rate codec has one file for every level, registered under its bare name.
    """
    if quality is None or get_spec(codec).variable_rate:
        return codec
    return f"{codec}-q{quality}"


RATE_STEPS = 1000  # records store a variable-rate codec's R in thousandths of a level (SPEC.md, section 0x83)


def check_rate(spec: CodecSpec, rate: float) -> float:
    """Validate R for a variable-rate codec and snap it to the grid the record stores."""
    problem = rate_problem(spec.name, rate, None)
    if problem is not None:
        raise problem
    return round(rate * RATE_STEPS) / RATE_STEPS


def check_record_level(name: str, quality: int, stored_rate: int | None) -> None:
    """Refuse, as damage (:class:`FormatError`), a record's quality or stored rate (thousandths of a level) that codec
    ``name`` does not have: a decoder's error is about the record, not about encoder parameters it does not take."""
    levels = CODEC_LEVELS[name]
    rate = None if stored_rate is None else stored_rate / RATE_STEPS
    if quality in levels and (rate is None or levels[0] <= rate <= levels[-1]):
        return
    stored = f"quality {quality}" if quality not in levels else f"rate {rate:g}"
    raise FormatError(f"record holds {stored}, but codec {name} has levels {levels[0]}..{levels[-1]}; the file is "
                      "damaged or was written by another program")


def check_rate_options(spec: CodecSpec, rate: float | None, bpp_target: float | None) -> None:
    """What ``rate``/``bpp_target`` need before any model loads: at most one, a variable-rate codec, in range."""
    problem = rate_problem(spec.name, rate, bpp_target)
    if problem is not None:
        raise problem


def bpp_out_of_reach(spec: CodecSpec, stored_rate: int | None, bpp: float, target: float) -> str | None:
    """Why a record coded for ``target`` bits per pixel could not meet it, or None: at the codec's highest rate
    below the target (or its lowest above it), no rate reaches the target for that image and the record is the
    closest there is."""
    levels = CODEC_LEVELS[spec.name]
    if stored_rate == levels[-1] * RATE_STEPS and bpp < target:
        return f"{target:g} bpp is out of reach: {spec.name}'s highest rate ({levels[-1]}) gives {bpp:.3f} bpp"
    if stored_rate == levels[0] * RATE_STEPS and bpp > target:
        return f"{target:g} bpp is out of reach: {spec.name}'s lowest rate ({levels[0]}) gives {bpp:.3f} bpp"
    return None

