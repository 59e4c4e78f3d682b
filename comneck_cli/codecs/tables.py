"""Checks of a codec's entropy tables before any coder uses them (16-bit rANS: CompressAI's encoder and comneck's
decoder)."""

from __future__ import annotations

from pathlib import Path
from statistics import NormalDist

import torch
from torch import nn

from comneck_cli.codecs import rans
from comneck_cli.codecs._compressai import import_compressai
from comneck_cli.errors import ModelFileError


# CompressAI codes at 16-bit precision: a table holds at most 2**16 symbols, each of frequency at least 1.
MAX_TABLE_SYMBOLS = 1 << 16


def _entropy_table_problem(module: nn.Module) -> str | None:
    """What is wrong with one entropy model's tables and what ``update()`` builds them from, or None."""
    quantiles = getattr(module, "quantiles", None)  # EntropyBottleneck: (channels, 1, 3) lower, median, upper
    if quantiles is not None:
        q = quantiles.detach().double()
        if not torch.isfinite(q).all():
            return "its quantiles are not finite"
        if (q[:, 0, 2] - q[:, 0, 0]).max() >= MAX_TABLE_SYMBOLS:
            return "its quantiles span more symbols than a 16-bit table holds"
    scale_table = getattr(module, "scale_table", None)  # GaussianConditional
    if scale_table is not None:
        scales = scale_table.detach().double()
        if scales.numel() == 0 or not torch.isfinite(scales).all() or (scales <= 0).any() or (scales.diff() <= 0).any():
            return "its scale table is not positive, finite and increasing"
        # update() gives the widest Gaussian 2·ceil(scale·multiplier) + 1 symbols; the multiplier is CompressAI's
        # scipy.stats.norm.ppf, computed by the stdlib so that loading a codec does not import scipy.stats
        if 2 * float(scales.max()) * -NormalDist().inv_cdf(module.tail_mass / 2) + 3 >= MAX_TABLE_SYMBOLS:
            return "its scale table needs more symbols than a 16-bit table holds"
    cdfs, lengths, offsets = module._quantized_cdf, module._cdf_length, module._offset
    if cdfs.numel() == 0:
        return None  # no tables in the file: load_codec builds them with update() from the checked inputs
    if any(t.dtype != torch.int32 for t in (cdfs, lengths, offsets)):
        return "its tables are not int32"
    # EntropyBottleneck: a row per channel; GaussianConditional: a row per scale-table entry (build_indexes)
    rows = quantiles.shape[0] if quantiles is not None else scale_table.numel() if scale_table is not None else None
    if cdfs.dim() != 2 or cdfs.shape[0] != (rows or cdfs.shape[0]):
        return f"it has CDF rows of shape {tuple(cdfs.shape)} for {rows} distributions"
    try:
        rans.tables_of(cdfs, lengths, offsets)
    except ValueError as exc:
        return str(exc)
    return None


def check_entropy_tables(model: nn.Module, path: Path) -> None:
    """Refuse damaged entropy tables before CompressAI's coder or comneck's decoder use them.

    CompressAI's encoder trusts the tables: a zero frequency (zeroed or non-increasing CDFs) divides by zero in
    its C++ ``Rans64EncPut`` (SIGFPE) and an index past the rows reads outside them. comneck's decoder checks
    the same rules again (:mod:`comneck_cli.codecs.rans`); here they become one error naming the file.
    """
    for name, module in model.named_modules():
        if hasattr(module, "_quantized_cdf"):
            problem = _entropy_table_problem(module)
            if problem is not None:
                raise ModelFileError(f"codec weights {path}: the entropy tables are damaged ({name}: {problem}); "
                                     "re-export the codec or fetch the file again")



def tables_present(model: nn.Module) -> bool:
    """Whether every entropy model of ``model`` holds its tables (a comneck file stores them; a zoo file does not)."""
    import_compressai()
    from compressai.entropy_models import EntropyModel

    return all(m._quantized_cdf.numel() > 0 for m in model.modules() if isinstance(m, EntropyModel))
