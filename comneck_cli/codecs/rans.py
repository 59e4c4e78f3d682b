"""comneck's entropy decoder: CompressAI's rANS decoder with every read bounded (the C extension ``_rans``).

CompressAI's ``compressai.ans.RansDecoder`` reads the string with no length check and trusts its tables, so a
crafted record crashes the process (SIGSEGV) however its CRC checks out. :mod:`comneck_cli.codecs._rans` runs the same
arithmetic, bit for bit, but reads a word only if it lies inside the string, refuses a bypass escape longer than
the 8 nibbles CompressAI's encoder can write, and decodes only with tables it has validated (rows start at 0,
increase strictly, end at 1 << 16; an index outside the rows is refused). A string CompressAI wrote decodes to
the same symbols; any other string decodes to some symbols or raises :class:`RansError`, never reads outside
its buffer. :func:`bound_entropy_decoders` installs it in a loaded model, so every decode goes through it.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from comneck_cli.codecs._rans import RansError, Stream, Tables, decode_with_indexes

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
    """Drop-in for ``compressai.ans.RansDecoder`` (what CompressAI's entropy models call) with bounded reads.

    CompressAI passes its tables as fresh Python lists on every call; turning a scale table's CDFs (64 rows of
    up to a few thousand entries) into validated arrays costs milliseconds per string. With ``owner`` (the entropy
    model whose ``_quantized_cdf``, ``_cdf_length`` and ``_offset`` those lists are), the validated tables are kept
    until a buffer changes, and reused when the passed lists have the owner's lengths, offsets, first and last row.
    """

    def __init__(self, owner: Any = None) -> None:
        self._stream: Stream | None = None
        self._owner = owner
        self._cache: tuple[tuple, list, list, list, list, Tables] | None = None

    def _tables(self, cdfs: Sequence[Sequence[int]], cdf_lengths: Sequence[int], offsets: Sequence[int]) -> Tables:
        owner = self._owner
        if owner is None or not len(cdfs):
            return tables_of(cdfs, cdf_lengths, offsets)
        buffers = (owner._quantized_cdf, owner._cdf_length, owner._offset)
        key = tuple((b.data_ptr(), b._version, tuple(b.shape)) for b in buffers)
        if self._cache is None or self._cache[0] != key:
            cdf = buffers[0].tolist()
            lengths, offs = buffers[1].reshape(-1).tolist(), buffers[2].reshape(-1).tolist()
            self._cache = (key, lengths, offs, cdf[0], cdf[-1], tables_of(cdf, lengths, offs))
        _, lengths, offs, first, last, tables = self._cache
        if (list(cdf_lengths) == lengths and list(offsets) == offs and len(cdfs) == len(lengths)
                and list(cdfs[0]) == first and list(cdfs[-1]) == last):
            return tables
        return tables_of(cdfs, cdf_lengths, offsets)  # tables other than the owner's: validate these

    def decode_with_indexes(self, string: bytes, indexes: Sequence[int], cdfs: Sequence[Sequence[int]],
                            cdf_lengths: Sequence[int], offsets: Sequence[int]) -> np.ndarray:
        return decode(string, indexes, self._tables(cdfs, cdf_lengths, offsets))

    def set_stream(self, string: bytes) -> None:
        self._stream = Stream(string)

    def decode_stream(self, indexes: Sequence[int], cdfs: Sequence[Sequence[int]], cdf_lengths: Sequence[int],
                      offsets: Sequence[int]) -> list[int]:
        if self._stream is None:
            raise RansError("decode_stream before set_stream")
        return decode(self._stream, indexes, self._tables(cdfs, cdf_lengths, offsets)).tolist()


def bound_entropy_decoders(model: Any) -> None:
    """Replace the rANS decoder of every CompressAI entropy model in ``model`` with :class:`RansDecoder`.

    CompressAI's ``EntropyModel`` and ``EntropyModelVbr`` decode through ``self.entropy_coder._decoder``; the
    encoders stay CompressAI's (they only read the tables, which :func:`comneck_cli.codecs.check_entropy_tables`
    has validated).
    """
    for module in model.modules():
        coder = getattr(module, "entropy_coder", None)
        if coder is not None and hasattr(coder, "_decoder"):
            coder._decoder = RansDecoder(module if hasattr(module, "_quantized_cdf") else None)
