"""Widening a trained codec's latent (issue #19): `train codec --init FILE --config '{"M": larger}'`."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from compressai.models.vbr import MeanScaleHyperpriorVbr

from comneck_cli.cli import main
from comneck_cli.errors import ComneckError
from comneck_cli.train.widen import widen_latent


@pytest.fixture
def narrow(vbr_codec_file):
    """The trained tiny vbr codec (N = 16, M = 24) of the conftest, as a float32 model."""
    from comneck_cli.codecs import load_codec

    return load_codec("mbt2018-mean-vbr", 1, weights=vbr_codec_file).model.float().eval()


def test_widening_keeps_x_hat_z_and_the_old_channels_means_and_scales(narrow, photos):
    """Same x -> same g_s(g_a(x)) and the same coded x_hat at every level; z and the old channels' (sigma, mu)
    unchanged; the new channels carry signal out of g_a (else nothing could learn to use them)."""
    from comneck_cli.io.images import read_image

    x = torch.from_numpy(read_image(photos["coffee"])[:128, :128].copy()).permute(2, 0, 1)[None].float() / 255
    wide = widen_latent(narrow, {"N": 16, "M": 24}, 40).eval()
    assert isinstance(wide, MeanScaleHyperpriorVbr) and wide.g_a[-1].weight.shape[0] == 40
    with torch.no_grad():
        y_narrow, y_wide = narrow.g_a(x), wide.g_a(x)
        assert torch.equal(y_wide[:, :24], y_narrow) and y_wide[:, 24:].abs().mean() > 0
        assert torch.allclose(wide.g_s(y_wide), narrow.g_s(y_narrow), atol=1e-6)
        z = narrow.h_a(y_narrow)
        assert torch.allclose(wide.h_a(y_wide), z, atol=1e-6)
        scales, means = narrow.h_s(z).chunk(2, 1)
        wide_scales, wide_means = wide.h_s(z).chunk(2, 1)
        assert torch.allclose(wide_scales[:, :24], scales, atol=1e-6) and torch.allclose(wide_means[:, :24], means,
                                                                                           atol=1e-6)
        assert torch.equal(wide_means[:, 24:], torch.zeros_like(wide_means[:, 24:]))
        for level in (0, narrow.levels - 1):
            assert torch.allclose(wide(x, stage=2, s=level)["x_hat"], narrow(x, stage=2, s=level)["x_hat"],
                                  atol=1e-5)
    again = widen_latent(narrow, {"N": 16, "M": 24}, 40)
    assert all(torch.equal(a, b) for a, b in zip(wide.state_dict().values(), again.state_dict().values()))


def test_only_a_larger_width_of_a_mean_scale_hyperprior_widens(narrow):
    from compressai.models import ScaleHyperprior

    with pytest.raises(ComneckError, match="does not widen the codec's M = 24"):
        widen_latent(narrow, {"N": 16, "M": 24}, 24)
    with pytest.raises(ComneckError, match="not have the mean-scale hyperprior widths"):
        widen_latent(ScaleHyperprior(N=8, M=12), {"N": 8, "M": 12}, 16)


@pytest.mark.slow
def test_train_codec_widens_from_init_and_refuses_other_changes(vbr_codec_file, photos, tmp_path):
    """--init FILE --config '{"M": 40}' trains the widened codec and writes M = 40; changing N is refused."""
    from comneck_cli.codecs import load_codec
    from comneck_cli.train.codec import constructor_config

    data = tmp_path / "data"
    data.mkdir()
    (data / "coffee.png").write_bytes(open(photos["coffee"], "rb").read())
    out = tmp_path / "wide.safetensors"
    common = ["train", "codec", "--codec", "mbt2018-mean-vbr", "--init", str(vbr_codec_file), "--data", str(data),
              "--steps", "2", "--crop", "64", "--batch-size", "2", "--no-register", "--quiet"]
    result = CliRunner().invoke(main, [*common, "--config", json.dumps({"M": 40}), "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert constructor_config(load_codec("mbt2018-mean-vbr", 1, weights=out)) == {"N": 16, "M": 40}
    refused = CliRunner().invoke(main, [*common, "--config", json.dumps({"N": 32}), "-o", str(tmp_path / "n.st")])
    assert refused.exit_code != 0
    assert "contradicts the architecture of --init" in refused.output and "give only a larger M" in refused.output
