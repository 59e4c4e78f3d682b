"""Canonical unsigned LEB128 varints, as used for every variable-size field of a ``.cnk`` record.

Canonical only: each value has exactly one encoding, so a record has exactly one byte form and a
flipped continuation bit cannot silently re-frame a record while still decoding the same numbers.
At most ``MAX_VARINT_BYTES`` bytes, so a reader never loops on (or allocates for) an endless varint.
"""

from __future__ import annotations

from collections.abc import Callable

from comneck_cli.formats.errors import CnkError

MAX_VARINT_BYTES = 5
MAX_VARINT = (1 << (7 * MAX_VARINT_BYTES)) - 1  # 2**35 - 1: the largest value 5 bytes can hold


def encode_varint(value: int) -> bytes:
    """``value`` (0..2**35-1) as canonical LEB128: 7 bits per byte, low group first, high bit = more."""
    if not 0 <= value <= MAX_VARINT:
        raise CnkError(f"cannot store {value} in a .cnk varint (must be 0..{MAX_VARINT})")
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def read_varint(next_byte: Callable[[], int], what: str = "varint") -> int:
    """Decode one varint, pulling bytes one at a time from ``next_byte`` (so a stream reader never over-reads).

    ``what`` names the field in error messages. Refuses encodings longer than ``MAX_VARINT_BYTES`` and
    overlong ones (a final byte of 0 after other bytes, which adds nothing but another byte form).
    """
    value = 0
    for index in range(MAX_VARINT_BYTES):
        byte = next_byte()
        value |= (byte & 0x7F) << (7 * index)
        if not byte & 0x80:
            if byte == 0 and index > 0:
                raise CnkError(f"corrupt .cnk record: the {what} is not canonically encoded (overlong varint)")
            return value
    raise CnkError(f"corrupt .cnk record: the {what} is longer than {MAX_VARINT_BYTES} bytes")


def decode_varint(data: bytes, offset: int = 0) -> tuple[int, int]:
    """Decode one varint from ``data`` at ``offset``; returns ``(value, offset just past it)``."""
    position = offset

    def next_byte() -> int:
        nonlocal position
        if position >= len(data):
            raise CnkError(f"truncated varint at offset {position}")
        position += 1
        return data[position - 1]

    return read_varint(next_byte), position
