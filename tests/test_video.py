"""Video: a video file (PyAV) or a folder of frames -> one .cnk stream, a record per frame; decode/features read it."""

from __future__ import annotations

import sys

import numpy as np
import pytest
from click.testing import CliRunner

from comneck_cli.cli import main
from comneck_cli.io.images import read_image
from comneck_cli.io.video import frames
from comneck_cli.formats import ImportanceMap, read_file

from .conftest import TINY_CLIP


def moving_square(count: int = 5, height: int = 64, width: int = 96) -> list[np.ndarray]:
    """Frames with a bright square sliding right over a gradient: each frame differs where it matters."""
    base = np.linspace(0, 120, width, dtype=np.uint8)[None, :, None].repeat(height, 0).repeat(3, 2)
    out = []
    for i in range(count):
        frame = base.copy()
        frame[16:48, 8 + 16 * i : 40 + 16 * i] = (250, 200, 40)
        out.append(frame)
    return out


@pytest.fixture(scope="module")
def video_file(tmp_path_factory):
    """A lossless (FFV1) Matroska file written with PyAV itself, so its decoded frames are known exactly."""
    av = pytest.importorskip("av")
    path = tmp_path_factory.mktemp("video") / "clip.mkv"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("ffv1", rate=5)
        stream.width, stream.height, stream.pix_fmt = 96, 64, "bgr0"
        for frame in moving_square():
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    return path


def test_video_file_frames_are_read_in_order(video_file):
    got = list(frames(video_file))
    assert len(got) == 5
    assert all(np.array_equal(a, b) for a, b in zip(got, moving_square()))


def test_frame_folder_needs_no_pyav(tmp_path, monkeypatch):
    from PIL import Image

    for i, frame in enumerate(moving_square(3)):
        Image.fromarray(frame).save(tmp_path / f"f_{i:03d}.png")
    monkeypatch.setitem(sys.modules, "av", None)  # as if PyAV were not installed
    assert all(np.array_equal(a, b) for a, b in zip(frames(tmp_path), moving_square(3)))
    with pytest.raises(Exception, match=r"comneck\[video\]"):
        list(frames(tmp_path / "missing.mp4"))


def test_encode_video_semantic_stream_decode_and_features(video_file, vbr_codec_file, tiny_clip_file, tmp_path):
    runner = CliRunner()
    clip = ["--clip-tag", "none", "--clip-weights", str(tiny_clip_file)]
    out = runner.invoke(main, ["encode", str(video_file), "--codec", "mbt2018-mean-vbr", "--weights",
                               str(vbr_codec_file), "--semantic", "--clip", TINY_CLIP, *clip, "-o",
                               str(tmp_path / "v.cnk"), "--quiet"])
    assert out.exit_code == 0, out.output
    records = read_file(tmp_path / "v.cnk")
    assert len(records) == 5 and all((r.height, r.width) == (64, 96) for r in records)
    maps = [ImportanceMap.unpack(r.importance_map, 64, 96).levels for r in records]
    assert len(set(maps)) > 1  # guidance is computed frame by frame

    out = runner.invoke(main, ["decode", str(tmp_path / "v.cnk"), "--weights", str(vbr_codec_file),
                               "-o", str(tmp_path / "frames") + "/", "--quiet"])
    assert out.exit_code == 0, out.output
    decoded = sorted((tmp_path / "frames").iterdir())
    assert [p.name for p in decoded] == [f"v_{i:04d}.png" for i in range(1, 6)]
    assert read_image(decoded[0]).shape == (64, 96, 3)

    out = runner.invoke(main, ["features", str(tmp_path / "v.cnk"), "--via", "reconstruction", "--weights",
                               str(vbr_codec_file), "--clip", TINY_CLIP, *clip, "-o", str(tmp_path / "f.pt"),
                               "--quiet"])
    assert out.exit_code == 0, out.output
    import torch

    assert torch.load(tmp_path / "f.pt", weights_only=True)["features"].shape[0] == 5


def test_bad_video_inputs_fail_in_one_line(tmp_path, vbr_codec_file):
    (tmp_path / "empty").mkdir()
    (tmp_path / "broken.mp4").write_bytes(b"not a video at all")
    for source, message in ((tmp_path / "empty", "without image frames"), (tmp_path / "broken.mp4", "broken.mp4")):
        out = CliRunner().invoke(main, ["encode", str(source), "--codec", "mbt2018-mean-vbr", "--weights",
                                        str(vbr_codec_file), "-o", str(tmp_path / "x.cnk"), "--quiet"])
        assert out.exit_code == 1 and message in out.output and "Traceback" not in out.output
        assert not (tmp_path / "x.cnk").exists()
