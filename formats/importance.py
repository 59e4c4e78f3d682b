"""The importance-map section (critical tag 0x81): a coarse, quantised map of where the encoder spent bits.

A semantic-guided record (``comneck encode --semantic``) quantises each latent position with its own step: the
variable-rate codec's gain ``g(i, j)`` is derived from this map, so the decoder cannot rebuild ``y_hat``
without it. The payload is small (one level per block of latent positions, deflated) and, being part of the
record, counts in bpp. SPEC.md §7.1 is the byte-level description; the gain formula is there too (it lives in
``comneck_cli.coding.semantic.gain_map``, which needs the codec).

Stdlib only, like the rest of ``formats``.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

from comneck_cli.formats.container import latent_grids
from comneck_cli.formats.errors import CnkError

LAYOUT = 1  # the one payload layout this module reads and writes
HEADER_BYTES = 5  # layout, block, bits, strength (u16)
MAX_STRENGTH = 0xFFFF  # thousandths: S up to 65.535


@dataclass(frozen=True)
class ImportanceMap:
    """One record's map: ``levels`` (row-major, one byte per cell, each < 2**bits) over cells of ``block`` × ``block``
    latent positions, and the strength S (thousandths) with which it steers the quantisation step."""

    block: int
    bits: int
    strength: int
    rows: int
    cols: int
    levels: bytes

    def __post_init__(self) -> None:
        for name, low, high in (("block", 1, 255), ("bits", 1, 8), ("strength", 0, MAX_STRENGTH),
                                ("rows", 1, 1 << 24), ("cols", 1, 1 << 24)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
                raise CnkError(f"importance map {name} must be an integer in {low}..{high}, got {value!r}")
        levels = bytes(self.levels)
        if len(levels) != self.rows * self.cols:
            raise CnkError(f"importance map has {len(levels)} levels for a {self.rows}×{self.cols} grid")
        top = (1 << self.bits) - 1
        if levels and max(levels) > top:
            raise CnkError(f"importance map level {max(levels)} exceeds {top}, the largest {self.bits}-bit level")
        object.__setattr__(self, "levels", levels)

    @staticmethod
    def grid(height: int, width: int, block: int) -> tuple[int, int]:
        """(rows, cols) of the map of an H×W image: the y grid in cells of ``block`` positions, rounded up."""
        (h, w), _ = latent_grids(height, width)
        return -(-h // block), -(-w // block)

    def pack(self) -> bytes:
        """The section payload: the 5-byte header, then the levels deflated (zlib, level 9)."""
        header = bytes([LAYOUT, self.block, self.bits]) + self.strength.to_bytes(2, "big")
        return header + zlib.compress(self.levels, 9)

    @classmethod
    def unpack(cls, payload: bytes, height: int, width: int) -> ImportanceMap:
        """Parse a section payload for a record of an H×W image; any inconsistency is one ``CnkError``."""
        payload = bytes(payload)
        if len(payload) < HEADER_BYTES:
            raise CnkError(f"corrupt importance map: {len(payload)} bytes, shorter than its {HEADER_BYTES}-byte header")
        layout, block, bits = payload[0], payload[1], payload[2]
        if layout != LAYOUT:
            raise CnkError(f"importance map layout {layout} is unknown (this comneck reads layout {LAYOUT}); "
                           "upgrade comneck")
        if block < 1 or not 1 <= bits <= 8:
            raise CnkError(f"corrupt importance map: block {block} and bits {bits} must be ≥ 1 and 1..8")
        rows, cols = cls.grid(height, width, block)
        inflater = zlib.decompressobj()
        try:
            # max_length bounds what a hostile stream can make us allocate: one byte past the expected size.
            levels = inflater.decompress(payload[HEADER_BYTES:], rows * cols + 1)
        except zlib.error as exc:
            raise CnkError(f"corrupt importance map: its levels do not inflate ({exc})") from None
        if len(levels) != rows * cols or not inflater.eof or inflater.unused_data:
            raise CnkError(f"corrupt importance map: expected exactly {rows * cols} levels for a {rows}×{cols} "
                           f"grid in one deflate stream")
        return cls(block=block, bits=bits, strength=int.from_bytes(payload[3:5], "big"), rows=rows, cols=cols,
                   levels=levels)
