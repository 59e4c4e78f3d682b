"""comneck's entropy decoder: CompressAI's rANS decoder with every read bounded (the C extension ``_rans``).

CompressAI's ``compressai.ans.RansDecoder`` reads the string with no length check and trusts its tables, so a
crafted record crashes the process (SIGSEGV) however its CRC checks out. :mod:`comneck_cli._rans` runs the same
arithmetic, bit for bit, but reads a word only if it lies inside the string, refuses a bypass escape longer than
the 8 nibbles CompressAI's encoder can write, and decodes only with tables it has validated (rows start at 0,
increase strictly, end at 1 << 16; an index outside the rows is refused). A string CompressAI wrote decodes to
the same symbols; any other string decodes to some symbols or raises :class:`RansError`, never reads outside
its buffer. :func:`bound_entropy_decoders` installs it in a loaded model, so every decode goes through it.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from ._rans import RansError, Stream, Tables, decode_with_indexes

__all__ = ["RansDecoder", "RansError", "Stream", "Tables", "bound_entropy_decoders", "decode", "tables_of"]


def _int32(values: Any) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(values, dtype=np.int32))


def tables_of(cdfs: Any, cdf_lengths: Any, offsets: Any) -> Tables:
    """Validated tables from CompressAI's lists or tensors; ValueError names the first bad row."""
    cdfs = np.asarray(cdfs, dtype=np.int64)
    if cdfs.ndim != 2 or np.abs(cdfs).max(initial=0) > np.iinfo(np.int32).max:
        raise ValueError(f"entropy CDFs must be a 2-D table of int32 values, not shape {cdfs.shape}")
    return Tables(_int32(cdfs), _int32(np.reshape(cdf_lengths, -1)), _int32(np.reshape(offsets, -1)))


def decode(source: bytes | Stream, indexes: Any, tables: Tables) -> np.ndarray:
    """A symbol (int32) per index, from a whole string or from where a :class:`Stream` stopped; or :class:`RansError`."""
    indexes = _int32(np.reshape(indexes, -1))
    if isinstance(source, Stream):
        return np.frombuffer(source.decode(indexes, tables), dtype=np.int32)
    return np.frombuffer(decode_with_indexes(source, indexes, tables), dtype=np.int32)


class RansDecoder:
    """Drop-in for ``compressai.ans.RansDecoder`` (what CompressAI's entropy models call) with bounded reads."""

    def __init__(self) -> None:
        self._stream: Stream | None = None

    def decode_with_indexes(self, string: bytes, indexes: Sequence[int], cdfs: Sequence[Sequence[int]],
                            cdf_lengths: Sequence[int], offsets: Sequence[int]) -> np.ndarray:
        return decode(string, indexes, tables_of(cdfs, cdf_lengths, offsets))

    def set_stream(self, string: bytes) -> None:
        self._stream = Stream(string)

    def decode_stream(self, indexes: Sequence[int], cdfs: Sequence[Sequence[int]], cdf_lengths: Sequence[int],
                      offsets: Sequence[int]) -> list[int]:
        if self._stream is None:
            raise RansError("decode_stream before set_stream")
        return decode(self._stream, indexes, tables_of(cdfs, cdf_lengths, offsets)).tolist()


def bound_entropy_decoders(model: Any) -> None:
    """Replace the rANS decoder of every CompressAI entropy model in ``model`` with :class:`RansDecoder`.

    CompressAI's ``EntropyModel`` and ``EntropyModelVbr`` decode through ``self.entropy_coder._decoder``; the
    encoders stay CompressAI's (they only read the tables, which :func:`comneck_cli.codecs.check_entropy_tables`
    has validated).
    """
    for module in model.modules():
        coder = getattr(module, "entropy_coder", None)
        if coder is not None and hasattr(coder, "_decoder"):
            coder._decoder = RansDecoder()
