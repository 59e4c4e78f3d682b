"""Issue #32, item 5: what decides the shape of a record's features, and a shape clash found from the record headers
before any compute, naming the files in input order."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from comneck_cli import coding as api
from comneck_cli.cli import main
from comneck_cli.features import FeatureRunner
from comneck_cli.formats import pack


@pytest.fixture
def records(photos, codec_files):
    """Records of a 64×64 crop (4×4 latent grid, the tiny neck's own) and a 64×128 one (4×8)."""
    codec = api.load_codec("mbt2018-mean", 1, weights=codec_files["mbt2018-mean"])
    pixels = np.asarray(Image.open(photos["astronaut"]).convert("RGB"))
    return [api.encode(np.ascontiguousarray(pixels[100:164, 200 : 200 + width]), codec) for width in (64, 128)]


@pytest.mark.parametrize("select", ["patch", "cls", "all", "pooled", "projected"])
def test_the_predicted_shape_is_the_computed_one(select, records, neck_file, tiny_clip_file, codec_files):
    """On the neck path the token count is the record's latent grid; on the others CLIP's own grid."""
    neck = FeatureRunner(via="neck", neck=neck_file, clip_weights=tiny_clip_file, select=select,
                         weights=codec_files["mbt2018-mean"])
    tower = FeatureRunner(via="uncompressed", neck=neck_file, clip_weights=tiny_clip_file, select=select)
    image = np.zeros((64, 128, 3), np.uint8)
    for runner, payloads in ((neck, records), (tower, [image])):
        for payload in payloads:
            resolved = runner.resolve(payload)
            predicted = runner.feature_shape(resolved, payload)
            (computed,), _ = runner.compute([runner.prepare(payload, resolved)])
            assert tuple(computed.shape) == predicted
    expected = {"patch": (32, 64), "cls": (64,), "all": (33, 64), "pooled": (32,), "projected": (33, 32)}
    assert neck.feature_shape(neck.resolve(records[1]), records[1]) == expected[select]  # 4×8 latent positions


def test_a_shape_clash_is_refused_before_any_compute_naming_the_files(records, tmp_path, neck_file, tiny_clip_file,
                                                                        codec_files, monkeypatch):
    small, wide = tmp_path / "small.cnk", tmp_path / "wide.cnk"
    small.write_bytes(pack(records[0]))
    wide.write_bytes(pack(records[1]))

    def no_compute(*args, **kwargs):
        raise AssertionError("features were computed before the shape clash was found")

    monkeypatch.setattr(FeatureRunner, "prepare", no_compute)
    common = ["--neck", neck_file, "--clip-weights", tiny_clip_file, "--weights", codec_files["mbt2018-mean"]]
    r = CliRunner().invoke(main, [str(a) for a in ["features", wide, small, wide, "-o", tmp_path / "f.pt", *common]])
    assert r.exit_code == 1 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr == (f"comneck: error: inputs give features of different shapes ({wide} (32, 64), {small} "
                        "(16, 64)): the neck's token count follows each record's image size; write them to a folder "
                        "(--output DIR/), or encode images of one size\n")
    assert not (tmp_path / "f.pt").exists()
    monkeypatch.undo()
    r = CliRunner().invoke(main, [str(a) for a in ["features", wide, small, "-o", f"{tmp_path / 'dir'}/", *common]])
    assert r.exit_code == 0, r.stderr
    assert torch.load(tmp_path / "dir" / "wide.pt", weights_only=True)["features"].shape == (1, 32, 64)
