"""`comneck train neck` on the ComNeck authors' codec (``elic-comneck``, their ELIC_LLM): d1, d2 and d3 each run
a step on a randomly initialised codec in the released architecture (N reduced, M = 320 as released)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from .test_train import one_thread  # noqa: F401 (autouse fixture)
from .test_train_neck import neck_config, tiny_clip_config  # noqa: F401 (autouse fixture)

CODEC = "elic-comneck"


@pytest.fixture(scope="module")
def elic_file(tmp_path_factory) -> Path:
    from comneck_cli.codecs import save_codec
    from comneck_cli.codecs.elic_comneck import ElicComneck

    torch.manual_seed(0)
    model = ElicComneck(N=8).eval()
    path = tmp_path_factory.mktemp("elic") / "elic-comneck-q1.safetensors"
    save_codec(model, path, CODEC, 1, {"N": 8, "M": 320})
    return path


def test_latent_path_is_the_models_forward(elic_file):
    """Training's y_hat and likelihoods are the authors' ``forward`` (what the released necks were trained on)."""
    from comneck_cli.codecs import load_codec
    from comneck_cli.train.latents import latent_path

    codec = load_codec(CODEC, 1, weights=elic_file)
    x = torch.rand(2, 3, 64, 64)
    latents = latent_path(codec.model, codec.spec.family, x)
    reference = codec.model(x)
    assert torch.equal(latents.y_hat, reference["y_hat"])
    assert latents.likelihoods.keys() == reference["likelihoods"].keys()
    assert all(torch.equal(latents.likelihoods[k], reference["likelihoods"][k]) for k in latents.likelihoods)


@pytest.mark.slow
@pytest.mark.parametrize("scenario", ["d1", "d2", "d3"])
def test_each_scenario_trains_on_the_authors_codec(elic_file, image_folder, tmp_path, scenario):
    from comneck_cli.codecs import load_codec
    from comneck_cli.models.neck import load_neck
    from comneck_cli.train import train_neck

    cfg = neck_config(scenario, elic_file, image_folder, tmp_path, steps=(1, 1, 1), codec=CODEC, quality=1,
                      batch_size=2)
    result = train_neck(cfg)
    assert all(np.isfinite(v) for v in result.final.values())
    if scenario != "d1":
        assert cfg.lmbda == 0.004  # the paper's λ for its first ELIC, not CompressAI's zoo table (0.0018)
    neck, info = load_neck(result.output)
    assert info.codec == CODEC and neck.config["latent_channels"] == 320
    if scenario != "d1":  # the retrained codec is exported and the neck names it
        codec = load_codec(CODEC, 1, weights=result.extra["codec_output"])
        assert codec.digest.hex()[: len(info.codec_digest)] == info.codec_digest
