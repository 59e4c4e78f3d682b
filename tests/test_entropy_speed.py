"""The one-thread entropy path's shortcuts (issue #23, item 15) give CompressAI's results bit for bit."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from comneck_cli import coding as api
from comneck_cli.codecs import rans
from comneck_cli.formats import PAD_MULTIPLE
from comneck_cli.io.images import read_image, to_tensor

GAUSSIAN_CODECS = ("bmshj2018-hyperprior", "mbt2018-mean", "cheng2020-anchor", "elic2022-official",
                   "mbt2018-mean-vbr")


def _compressai():
    from compressai.entropy_models import EntropyModel, GaussianConditional

    return EntropyModel, GaussianConditional


def _gaussians(codec):
    return [m for m in codec.model.modules() if hasattr(m, "scale_table") and hasattr(m, "entropy_coder")]


@pytest.fixture(params=GAUSSIAN_CODECS)
def codec(request, codec_files):
    vbr = request.param == "mbt2018-mean-vbr"
    path = request.getfixturevalue("vbr_codec_file") if vbr else codec_files[request.param]
    return api.load_codec(request.param, 1, weights=path)


def test_scale_indexes_are_compressais_at_every_edge(codec):
    _, GaussianConditional = _compressai()
    for gc in _gaussians(codec):
        table = gc.scale_table
        scales = torch.cat([table, torch.nextafter(table, table + 1), torch.nextafter(table, table - 1),
                            torch.tensor([float("nan"), float("inf"), -float("inf"), 0.0, -1.0, 1e30]),
                            torch.rand(5000, generator=torch.Generator().manual_seed(0)) * 2 * table[-1]])
        for x in (scales.reshape(1, 1, -1, 1), scales.double().reshape(1, -1, 1, 1)):
            ours = gc.build_indexes(x)
            assert gc.build_indexes.__func__ is rans.scale_indexes  # the loaded codec uses the search
            assert ours.dtype == torch.int32 and torch.equal(ours, GaussianConditional.build_indexes(gc, x))


def test_gaussian_decoding_skips_python_lists_and_matches_compressai(codec, photos, monkeypatch):
    """A loaded codec's GaussianConditional decodes from int32 buffers (its list-taking decoder is never called)
    and recovers the encoder's y_hat; on the same strings CompressAI's list path gives the same tensors."""
    EntropyModel, _ = _compressai()
    image = read_image(photos["chelsea"])
    record = api.encode(image, codec)
    encoded = codec.compress(to_tensor(image, PAD_MULTIPLE))[1]

    def no_lists(*args, **kwargs):
        raise AssertionError("a GaussianConditional decoded through Python lists")

    for gc in _gaussians(codec):
        monkeypatch.setattr(gc.entropy_coder._decoder, "decode_with_indexes", no_lists)
    assert torch.equal(api.decode_latents(record, codec), encoded)

    monkeypatch.undo()
    gc = _gaussians(codec)[0]
    rng = np.random.default_rng(0)
    indexes = torch.from_numpy(rng.integers(0, len(gc.scale_table), (2, 3, 4, 5))).int()
    symbols = torch.from_numpy(rng.integers(-4, 5, (2, 3, 4, 5))).float()
    means = torch.from_numpy(rng.normal(size=(2, 3, 4, 5))).float()
    with torch.inference_mode():
        strings = EntropyModel.compress(gc, symbols, indexes)
        for kwargs in ({}, {"means": means}, {"means": means[..., :1, :1]}, {"dtype": torch.float64}):
            ours = gc.decompress(strings, indexes, **kwargs)
            theirs = EntropyModel.decompress(gc, strings, indexes, **kwargs)
            assert ours.dtype == theirs.dtype and torch.equal(ours, theirs)
        with pytest.raises(ValueError):
            gc.decompress(strings[:1], indexes)
        with pytest.raises(ValueError):
            gc.decompress(strings, indexes, means=means[:, :1])

