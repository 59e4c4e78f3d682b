"""comneck's entropy decoder: CompressAI's rANS decoder with every read bounded (the C extension ``_rans``).

CompressAI's ``compressai.ans.RansDecoder`` reads the string with no length check and trusts its tables, so a
crafted record crashes the process (SIGSEGV) however its CRC checks out. :mod:`comneck_cli.codecs._rans` runs the same
arithmetic, bit for bit, but reads a word only if it lies inside the string, refuses a bypass escape longer than
the 8 nibbles CompressAI's encoder can write, and decodes only with tables it has validated (rows start at 0,
increase strictly, end at 1 << 16; an index outside the rows is refused). A string CompressAI wrote decodes to
the same symbols; any other string decodes to some symbols or raises :class:`RansError`, never reads outside
its buffer. :func:`bound_entropy_decoders` installs it in a loaded model, so every decode goes through it.

It also takes two costs off the one thread that computes the entropy parameters (``codecs.one_thread``), with
bit-identical results: a GaussianConditional's decoder reads its indexes and writes its symbols as int32 buffers
instead of Python lists (at 512², 327 680 of each: the lists cost about 40 ms, the decoding 1 ms), and its scale
indexes come from a binary search instead of CompressAI's 63 whole-tensor comparisons (:func:`scale_indexes`).
"""

from __future__ import annotations

from types import MethodType
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from comneck_cli.codecs._rans import RansError, Stream, Tables, decode_with_indexes

if TYPE_CHECKING:
    import torch

__all__ = ["RansDecoder", "RansError", "Stream", "Tables", "bound_entropy_decoders", "bound_entropy_encoders", "decode",
           "scale_indexes", "tables_of"]

# The largest symbol magnitude the encoder is given. CompressAI's encoder doubles an escaped value in int32, and NaN or
# an overflowing latent becomes INT_MIN when cast: its escape loop then shifts a negative number forever (a hang, not
# an error). Real latents stay within a few thousand.
MAX_SYMBOL = 1 << 28


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

    def owner_tables(self) -> tuple[Tables, list, list, list, list]:
        """The owner's validated tables, and its lengths, offsets, first and last CDF rows as lists."""
        owner = self._owner
        buffers = (owner._quantized_cdf, owner._cdf_length, owner._offset)
        key = tuple((b.data_ptr(), b._version, tuple(b.shape)) for b in buffers)
        if self._cache is None or self._cache[0] != key:
            cdf = buffers[0].tolist()
            lengths, offs = buffers[1].reshape(-1).tolist(), buffers[2].reshape(-1).tolist()
            self._cache = (key, lengths, offs, cdf[0], cdf[-1], tables_of(cdf, lengths, offs))
        _, lengths, offs, first, last, tables = self._cache
        return tables, lengths, offs, first, last

    def _tables(self, cdfs: Sequence[Sequence[int]], cdf_lengths: Sequence[int], offsets: Sequence[int]) -> Tables:
        if self._owner is None or not len(cdfs):
            return tables_of(cdfs, cdf_lengths, offsets)
        tables, lengths, offs, first, last = self.owner_tables()
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


def scale_indexes(gaussian: Any, scales: torch.Tensor) -> torch.Tensor:
    """CompressAI's ``GaussianConditional.build_indexes``, bit for bit, by binary search.

    CompressAI counts the scale-table entries t_i (i < L - 1) at or above each lower-bounded scale σ and returns
    (L - 1) minus that count: 63 comparisons of the whole tensor (50 ms for a 512² image's 327 680 scales on one
    thread). With t strictly increasing (``check_entropy_tables`` refuses other tables) that is the number of
    entries below σ, ``searchsorted(t[:-1], σ)`` (left side); a NaN σ, below no entry and above none, gets L - 1 in
    both.
    """
    import torch

    scales = gaussian.lower_bound_scale(scales)
    table = gaussian.scale_table[:-1].to(scales.dtype).contiguous()
    indexes = torch.searchsorted(table, scales.contiguous(), side="left", out_int32=True)
    return torch.where(torch.isnan(scales), len(gaussian.scale_table) - 1, indexes).int()


def decompress_gaussian(gaussian: Any, strings: list[bytes], indexes: torch.Tensor, dtype: Any = None,
                        means: torch.Tensor | None = None) -> torch.Tensor:
    """CompressAI's ``EntropyModel.decompress`` for a GaussianConditional, with the indexes and symbols as int32
    buffers (no Python lists) and the tables validated once: the same checks, symbols and outputs."""
    import torch

    if not isinstance(strings, (tuple, list)) or len(strings) != indexes.size(0) or indexes.dim() < 2:
        raise ValueError("Invalid strings or indexes parameters")
    if means is not None and means.shape != indexes.shape and (
            means.shape[:2] != indexes.shape[:2] or any(size != 1 for size in means.shape[2:])):
        raise ValueError("Invalid means or indexes parameters")
    tables = gaussian.entropy_coder._decoder.owner_tables()[0]
    symbols = torch.stack([
        torch.tensor(decode(string, rows.reshape(-1).int().numpy(), tables)).reshape(rows.shape)
        for string, rows in zip(strings, indexes)])
    return gaussian.dequantize(symbols, means, torch.float if dtype is None else dtype)


def bound_entropy_decoders(model: Any) -> None:
    """Replace the rANS decoder of every CompressAI entropy model in ``model`` with :class:`RansDecoder`, and give
    each GaussianConditional :func:`scale_indexes` and :func:`decompress_gaussian` (same results, less time).

    CompressAI's ``EntropyModel`` and ``EntropyModelVbr`` decode through ``self.entropy_coder._decoder``; the
    encoders stay CompressAI's (they only read the tables, which :func:`comneck_cli.codecs.check_entropy_tables`
    has validated).
    """
    for module in model.modules():
        coder = getattr(module, "entropy_coder", None)
        if coder is not None and hasattr(coder, "_decoder"):
            coder._decoder = RansDecoder(module if hasattr(module, "_quantized_cdf") else None)
            if hasattr(module, "scale_table") and hasattr(module, "build_indexes"):  # a GaussianConditional
                module.build_indexes = MethodType(scale_indexes, module)
                module.decompress = MethodType(decompress_gaussian, module)


def _refuse_uncodable() -> None:
    from comneck_cli.errors import ModelFileError

    raise ModelFileError(f"cannot entropy-code this input: the codec's latents are not finite or beyond what the coder "
                         f"holds (|symbol| >= 2^{MAX_SYMBOL.bit_length() - 1}); the codec weights are damaged or unfit")


def _bounded_quantize(quantize: Any) -> Any:
    def bounded(inputs: torch.Tensor, mode: str, *args: Any, **kwargs: Any) -> torch.Tensor:
        outputs = quantize(inputs, mode, *args, **kwargs)
        if mode == "symbols" and bool(((outputs >= MAX_SYMBOL) | (outputs <= -MAX_SYMBOL)).any()):
            _refuse_uncodable()
        return outputs

    bounded.comneck_bounded = True
    return bounded


def bound_entropy_encoders(model: Any) -> None:
    """Check every symbol CompressAI's encoders are given (:data:`MAX_SYMBOL`), so that coding always ends. Every
    encoder's symbols come from an entropy model's ``quantize(..., "symbols")`` (``quantize_variable`` for CompressAI's
    variable-rate models given ``qs``; the autoregressive models quantize for the ``BufferedRansEncoder`` they make
    themselves the same way), so the check runs once, on the tensor, before any symbol list is built."""
    for module in model.modules():
        if getattr(module, "entropy_coder", None) is None:
            continue
        for name in ("quantize", "quantize_variable"):
            method = getattr(module, name, None)
            if method is not None and not getattr(method, "comneck_bounded", False):
                setattr(module, name, _bounded_quantize(method))
