"""What a fresh install uses when nothing is named, and what the CLI checks before loading anything (torch-free,
so the CLI can show it in --help and refuse bad options at once)."""

from __future__ import annotations

import math

from comneck_cli.errors import UsageError

# Shipped in weights/ (issue #10; model card weights/mbt2018-mean-vbr.md): one variable-rate file covers every -q,
# so `comneck encode photo.png` works offline. The zoo codecs stay one --codec away.
DEFAULT_CODEC = "mbt2018-mean-vbr"

# Each codec's quality levels (-q; for a variable-rate codec also the range of --rate R). comneck_cli.codecs builds
# its CodecSpecs over this table; here it lets the CLI refuse -q 99 or --codec nope before torch is imported.
CODEC_LEVELS: dict[str, range] = {
    "bmshj2018-hyperprior": range(1, 9),
    "mbt2018-mean": range(1, 9),
    "mbt2018": range(1, 9),
    "cheng2020-anchor": range(1, 7),  # the zoo stops at 6
    "elic2022-official": range(1, 5),  # the ComNeck paper trains ELIC at λ = 0.004, 0.008, 0.016, 0.032
    "mbt2018-mean-vbr": range(1, 9),
    "elic-comneck": range(1, 5),  # the ComNeck authors' released d{1,2,3}_{1..4} files
    "lapped-pca-vbr": range(1, 9),
}
VARIABLE_RATE_CODECS = ("mbt2018-mean-vbr", "lapped-pca-vbr")  # one file for every rate: --rate and --bpp-target apply
FEATURE_SUFFIXES = (".pt", ".safetensors", ".npy")  # what `features -o FILE` writes (features.save_features)


def quality_problem(codec: str, quality: int) -> UsageError | None:
    """Why ``quality`` is not a level of ``codec`` (the error to raise), or None."""
    levels = CODEC_LEVELS[codec]
    if quality in levels:
        return None
    return UsageError(f"codec {codec} has quality levels {levels[0]}..{levels[-1]}, not {quality}")


def rate_problem(codec: str, rate: float | None, bpp_target: float | None) -> UsageError | None:
    """Why ``rate`` / ``bpp_target`` cannot apply to ``codec`` (the error to raise, naming the parameters), or
    None: at most one of them, a variable-rate codec, R within its levels, a finite positive bits-per-pixel target."""
    if rate is not None and bpp_target is not None:
        return UsageError("pass `rate` or `bpp_target`, not both", params=("rate", "bpp_target"))
    if rate is None and bpp_target is None:
        return None
    if codec not in VARIABLE_RATE_CODECS:
        given = "rate" if rate is not None else "bpp_target"
        return UsageError(f"codec {codec} has fixed quality levels; `{given}` needs a variable-rate codec "
                          f"({', '.join(VARIABLE_RATE_CODECS)})", params=(given,))
    levels = CODEC_LEVELS[codec]
    if rate is not None and not levels[0] <= rate <= levels[-1]:  # also refuses nan
        return UsageError(f"codec {codec} takes `rate` between {levels[0]} and {levels[-1]}, not {rate:g}",
                          params=("rate",))
    if bpp_target is not None and not (bpp_target > 0 and math.isfinite(bpp_target)):
        return UsageError(f"`bpp_target` must be a positive number of bits per pixel, not {bpp_target:g}",
                          params=("bpp_target",))
    return None
