"""The ``.cnk`` container: one record per image, records back to back in a file or stream.

Byte layout in ``formats/SPEC.md``. This package is deliberately stdlib-only (no torch, no codec
code) so that tools which only inspect, split, or ship ``.cnk`` files start instantly.
"""

from __future__ import annotations

from comneck_cli.formats.codec_ids import CODEC_IDS, CODEC_NAMES, codec_name
from comneck_cli.formats.container import (
    DEFAULT_MAX_RECORD_BYTES,
    DEFAULT_MAX_PIXELS,
    DEFAULT_MAX_SIDE,
    MAGIC,
    PAD_MULTIPLE,
    VERSION,
    Limits,
    Record,
    iter_records,
    latent_grids,
    pack,
    read_file,
    read_record,
    unpack,
    write_record,
)
from comneck_cli.formats.errors import CnkError
from comneck_cli.formats.importance import ImportanceMap

__all__ = [
    "CODEC_IDS",
    "CODEC_NAMES",
    "DEFAULT_MAX_RECORD_BYTES",
    "DEFAULT_MAX_PIXELS",
    "DEFAULT_MAX_SIDE",
    "MAGIC",
    "PAD_MULTIPLE",
    "VERSION",
    "CnkError",
    "ImportanceMap",
    "Limits",
    "Record",
    "codec_name",
    "iter_records",
    "latent_grids",
    "pack",
    "read_file",
    "read_record",
    "unpack",
    "write_record",
]
