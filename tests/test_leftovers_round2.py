"""Leftovers of issues #32 and #33: every trainer records a random CLIP as `none` plus the seed it was drawn from, and
the file's user draws the same tower again (#32 item 2); `train -q 0` words its refusal as `encode` does (#32 item 11);
`info` lists the good records of a stream with a damaged one and reports that one (#33 item 7)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .conftest import TINY_CLIP
from .test_hostile_round2 import errors, run


# --------------------------------------------------------------------------- #32 item 2: random CLIP, rebuilt
@pytest.fixture(scope="module")
def random_clip_adapter(tmp_path_factory, image_folder, codec_files, tiny_clip_file):
    """An adapter trained one step against a random tiny CLIP (`clip_tag` none, no weights file), and that very
    tower saved as a weights file, caught as the trainer built it."""
    from comneck_cli.train import adapter as training

    folder = tmp_path_factory.mktemp("random-clip-adapter")
    towers = []
    load = training.load_training_clip

    def caught(cfg, device):
        towers.append(load(cfg, device))
        return towers[-1]

    training.load_training_clip = caught
    try:
        training.train_adapter(training.AdapterTrainConfig(
            codec="mbt2018-mean", quality=1, weights=codec_files["mbt2018-mean"], clip_model=TINY_CLIP,
            clip_tag="none", warmup_epochs=0.0, batch_size=2, crop=64, data=image_folder, steps=1, register=None,
            output=folder / "a.safetensors", quiet=True, device="cpu", run_dir=folder / "run"))
    finally:
        training.load_training_clip = load
    save_file({k: v.contiguous() for k, v in towers[0].state_dict().items()}, str(folder / "tower.safetensors"))
    return folder / "a.safetensors", folder / "tower.safetensors"


@pytest.fixture
def record(tmp_path, photos, codec_files) -> Path:
    from comneck_cli import coding as api
    from comneck_cli.formats import pack
    from comneck_cli.io.images import read_image

    codec = api.load_codec("mbt2018-mean", 1, weights=codec_files["mbt2018-mean"])
    crop = np.ascontiguousarray(read_image(photos["astronaut"])[100:164, 150:214])
    (tmp_path / "x.cnk").write_bytes(pack(api.encode(crop, codec)))
    return tmp_path / "x.cnk"


def test_an_adapter_trained_on_random_clip_gets_the_same_tower_back(random_clip_adapter, record, codec_files,
                                                                   tmp_path):
    adapter, tower = random_clip_adapter
    from comneck_cli.models.adapter import load_adapter

    info = load_adapter(adapter)[1]
    assert (info.clip_tag, info.clip_seed) == ("none", 0)  # not "None", and the run's seed
    common = ("features", record, "--via", "adapter", "--adapter", adapter, "--clip", TINY_CLIP, "--clip-tag", "none",
              "--weights", codec_files["mbt2018-mean"])
    assert run(*common, "-o", tmp_path / "seeded.pt").exit_code == 0
    assert run(*common, "--clip-weights", tower, "-o", tmp_path / "trained.pt").exit_code == 0
    seeded, trained = (torch.load(tmp_path / f"{n}.pt", weights_only=True)["features"] for n in ("seeded", "trained"))
    torch.testing.assert_close(seeded, trained)


def test_a_random_clip_file_without_its_seed_says_how_to_supply_the_tower(random_clip_adapter, record,
                                                                           codec_files, tmp_path):
    """A file from before the seed was recorded: no new draw would be its tower, so one line asks for its file."""
    from safetensors.torch import load_file

    adapter, _ = random_clip_adapter
    with safe_open(str(adapter), framework="pt") as f:
        meta = {k: v for k, v in f.metadata().items() if k != "clip_seed"}
    old = tmp_path / "old.safetensors"
    save_file(load_file(str(adapter)), str(old), metadata=meta)
    result = run("features", record, "--via", "adapter", "--adapter", old, "--clip", TINY_CLIP, "--clip-tag", "none",
                 "--weights", codec_files["mbt2018-mean"], "-o", tmp_path / "f.pt")
    assert result.exit_code == 1 and errors(result) == [
        f"comneck: error: {record}: adapter {old} was trained against CLIP {TINY_CLIP} with random weights "
        f"(--clip-tag none) that it does not record; pass that tower's weights file as --clip-weights, or register "
        f"it once with `comneck weights import clip-{TINY_CLIP.lower()}-none FILE --kind clip`"]
    assert not (tmp_path / "f.pt").exists()


def test_train_vbr_draws_its_random_clip_from_the_seed_it_records(image_folder, tiny_clip_file, tmp_path,
                                                                  monkeypatch):
    """`train vbr` builds its codec before its CLIP: the random tower must still be the one its seed draws, or the
    seed P's file records would rebuild another."""
    from comneck_cli.clip.tower import random_clip
    from comneck_cli.train import vbr
    from comneck_cli.train.loop import Runtime
    from comneck_cli.train.neck import clip_record

    towers = []
    load = vbr.load_training_clip
    monkeypatch.setattr(vbr, "load_training_clip", lambda cfg, device: towers.append(load(cfg, device)) or towers[-1])
    cfg = vbr.VbrTrainConfig(data=image_folder, steps=1, crop=64, batch_size=2, pre_edit=True, seed=5,
                             config={"N": 16, "M": 24}, gain_maps=0.0, clip_model=TINY_CLIP, clip_tag="none",
                             quiet=True, device="cpu", register=None, pre_edit_register=None,
                             output=tmp_path / "vbr.safetensors", run_dir=tmp_path / "run")
    vbr.VbrRun(cfg, Runtime(torch.device("cpu")), vbr._resolve(cfg))
    assert clip_record(cfg) == {"clip_model": TINY_CLIP, "clip_tag": "none", "clip_seed": 5}
    drawn = random_clip(TINY_CLIP, 5).state_dict()
    assert all(torch.equal(v, drawn[k]) for k, v in towers[0].state_dict().items())


@pytest.mark.parametrize("kind", ["postprocess", "preedit"])
def test_every_model_file_reads_back_its_random_clips_seed(kind):
    from comneck_cli.models.preedit import PreEditInfo
    from comneck_cli.models.unet import PostprocessInfo

    cls = {"postprocess": PostprocessInfo, "preedit": PreEditInfo}[kind]
    extra = {"quality": 1} if kind == "postprocess" else {}
    info = cls(codec="mbt2018-mean", codec_digest="0123abcd", clip_model=TINY_CLIP, clip_tag="none", clip_seed=7,
               **extra)
    meta = info.to_metadata()
    assert meta["clip_seed"] == "7" and cls.from_metadata(meta, "f").clip_seed == 7
    older = {k: v for k, v in meta.items() if k != "clip_seed"}
    assert cls.from_metadata(older, "f").clip_seed is None


# --------------------------------------------------------------------------- #32 item 11: -q wording
@pytest.mark.parametrize("command", ["codec", "neck", "postprocess", "adapter"])
@pytest.mark.parametrize("quality", ["0", "9"])
def test_train_quality_out_of_range_is_worded_as_encode_words_it(command, quality, tmp_path):
    result = run("train", command, "--codec", "mbt2018-mean", "-q", quality, "--data", tmp_path)
    assert result.exit_code == 2
    assert f"codec mbt2018-mean has quality levels 1..8, not {quality}" in result.stderr
    assert "range" not in result.stderr


# --------------------------------------------------------------------------- #33 item 7: info goes on
def test_info_lists_the_good_records_and_reports_the_damaged_one(record, tmp_path):
    good = record.read_bytes()
    bad = bytearray(good)
    bad[-6] ^= 0xFF  # inside the payload: the framing holds, the CRC does not
    stream = tmp_path / "s.cnk"
    stream.write_bytes(good + bytes(bad) + good)
    result = run("info", stream, "--json")
    assert result.exit_code == 1 and errors(result) == [
        f"comneck: error: {stream}: record 2 (at byte {len(good)}): corrupt .cnk record (CRC mismatch): the file was "
        "damaged in transfer or storage"]
    rows = json.loads(result.stdout)
    assert [(r["file"], r["record"]) for r in rows] == [(str(stream), 1), (str(stream), 3)]
    piped = run("info", "-", "--json", input=stream.read_bytes())
    assert piped.exit_code == 1 and [r["record"] for r in json.loads(piped.stdout)] == [1, 3]
    only_bad = tmp_path / "bad.cnk"
    only_bad.write_bytes(bytes(bad))
    result = run("info", only_bad, "--json")
    assert result.exit_code == 1 and len(errors(result)) == 1 and "record 1 (at byte 0)" in errors(result)[0]
    assert json.loads(result.stdout) == []
