"""The stable table of codec ids stored in byte 4 of every ``.cnk`` record (see SPEC.md).

Ids are part of the file format: once released, an id is never reused or renumbered, only appended,
so files written today still name the right codec for every later reader.
"""

from __future__ import annotations

CODEC_IDS: dict[str, int] = {
    "bmshj2018-factorized": 1,
    "bmshj2018-factorized-relu": 2,
    "bmshj2018-hyperprior": 3,
    "mbt2018-mean": 4,
    "mbt2018": 5,
    "cheng2020-anchor": 6,
    "cheng2020-attn": 7,
    "cheng2020-anchor-checkerboard": 8,
    "elic2022-official": 9,
    "elic2022-chandelier": 10,
    "bmshj2018-hyperprior-vbr": 11,
    "mbt2018-mean-vbr": 12,
    "mbt2018-vbr": 13,
    "elic-comneck": 14,
    "lapped-pca-vbr": 15,
}

CODEC_NAMES: dict[int, str] = {codec_id: name for name, codec_id in CODEC_IDS.items()}


def codec_name(codec_id: int) -> str | None:
    """The codec name for ``codec_id``, or ``None`` for an id this version does not know.

    Unknown ids are not an error here: the container can carry a codec added after this reader was
    released, and only the layer that must actually run the codec can say it is unsupported.
    """
    return CODEC_NAMES.get(codec_id)
