"""Importing the ComNeck authors' released files (issue #18): registry entries, names, metadata, wrong files,
d3 records refused by decode, the raw file as ``--weights``, and ``features`` choosing each record's neck.

Checkpoints are written in exactly the released layout (tests/test_comneck_release.py's ``_save_release``) from
stride-0 views (``_layout``): full-size tensors in a few kilobytes on disk.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from comneck_cli import weights as registry
from comneck_cli.errors import ComneckError, ModelFileError, RegistryError, UsageError
from tests.test_comneck_release import _layout, _save_release


@pytest.fixture(scope="module")
def layout():
    return _layout()


def _release(folder, name, layout, *, module=False, seed=None):
    """A released file named ``name``; ``seed`` varies one weight, so files of the same layout differ."""
    codec, neck = layout
    if seed is not None:
        codec = {**codec, "h_s.4.bias": torch.full((640,), float(seed))}
    return _save_release(folder / name, codec, neck, module=module)


def _import(*paths, **kwargs):
    from comneck_cli.models.release import import_releases

    return import_releases(list(paths), **kwargs)


def _user_entries() -> set[str]:
    return {name for name, entry in registry.entries().items() if entry.origin == "user"}


def _record(codec: str, quality: int, digest: str):
    from comneck_cli.formats import CODEC_IDS, Record

    return Record(codec_id=CODEC_IDS[codec], quality=quality, weights_digest=bytes.fromhex(digest), height=64,
                  width=64, strings=(b"",) * 11)


@pytest.mark.slow  # converts two full-size codecs (135 MB each)
def test_import_registers_codec_and_neck_with_their_metadata(layout, tmp_path):
    from comneck_cli.codecs import weights_info
    from comneck_cli.models.neck import load_neck

    d1 = _release(tmp_path, "d1_2.pth.tar", layout, module=True)
    d3 = _release(tmp_path, "d3_2.pth.tar", layout, seed=3)
    imported = _import(d1, d3)
    assert [(i.scenario, i.quality, i.codec.name, i.neck.name) for i in imported] == [
        ("d1", 2, "elic-comneck-q2", "elic-comneck-q2-neck"),
        ("d3", 2, "elic-comneck-q2-d3", "elic-comneck-q2-d3-neck")]
    entries = registry.entries()
    base, machine = entries["elic-comneck-q2"], entries["elic-comneck-q2-d3"]
    assert base.kind == machine.kind == "codec"
    assert base.info["release_sha256"] == registry.file_sha256(d1) and base.info["scenario"] == "d1"
    assert "machine_only" not in base.info and machine.info["machine_only"] is True
    assert weights_info(machine.path()).get("machine_only") == "true"
    assert weights_info(base.path()).get("machine_only") is None
    assert json.loads(weights_info(base.path())["config"]) == {"N": 192, "M": 320}
    for codec_entry, scenario in ((base, "d1"), (machine, "d3")):
        neck_entry = entries[f"{codec_entry.name}-neck"]
        neck, info = load_neck(neck_entry.path())
        assert (info.codec, info.quality, info.scenario, info.k, info.clip_model, info.clip_tag, info.targets) == (
            "elic-comneck", 2, scenario, 2, "ViT-L-14", "openai", "pooled:1")
        assert info.codec_digest == codec_entry.sha256[:8] == neck_entry.info["codec_digest"]
        assert neck.proj.weight.shape == (1024, 320)
    # what `--codec elic-comneck -q 2` loads by default is the d1 codec; d3's is machine-only
    from comneck_cli.codecs import load_codec

    assert load_codec("elic-comneck", 2).digest.hex() == base.sha256[:8]
    assert load_codec("elic-comneck", 2, weights="elic-comneck-q2-d3").machine_only


def test_a_wrong_file_registers_nothing(layout, tmp_path):
    codec, neck = layout
    good = _release(tmp_path, "d1_1.pth.tar", layout)
    bad = _save_release(tmp_path / "d2_1.pth.tar", {k: v for k, v in codec.items() if k != "h_s.4.weight"}, neck)
    with pytest.raises(ModelFileError, match=r"d2_1\.pth\.tar: the codec weights \('state_dict'\) lack"):
        _import(good, bad)
    assert _user_entries() == set()


def test_names_must_say_scenario_and_quality(layout, tmp_path):
    renamed = _release(tmp_path, "comneck.pth.tar", layout)
    with pytest.raises(UsageError, match="cannot tell the scenario and quality of .*comneck.pth.tar"):
        _import(renamed)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    twins = [_release(tmp_path / "a", "d1_1.pth.tar", layout), _release(tmp_path / "b", "d1_1.pth.tar", layout)]
    with pytest.raises(UsageError, match="are both the release d1 quality 1"):
        _import(*twins)
    with pytest.raises(UsageError, match="name one file's release, but 2 files"):
        _import(*twins, scenario="d2", quality=1)
    assert _user_entries() == set()


@pytest.mark.slow  # converts full-size codecs
def test_scenario_and_quality_options_name_a_renamed_file(layout, tmp_path):
    imported = _import(_release(tmp_path, "comneck.pth.tar", layout), scenario="d2", quality=4)
    assert (imported[0].codec.name, imported[0].neck.name) == ("elic-comneck-q4-d2", "elic-comneck-q4-d2-neck")


@pytest.mark.slow  # converts full-size codecs, codes one image
def test_raw_release_as_weights_codes_like_the_import_and_d3_records_are_not_decoded(layout, tmp_path):
    from comneck_cli import coding as api
    from comneck_cli.codecs import load_codec

    raw = _release(tmp_path, "d3_1.pth.tar", layout)
    codec = load_codec("elic-comneck", 1, weights=raw)
    assert codec.machine_only and codec.source == raw
    (imported,) = _import(raw)
    assert codec.digest.hex() == imported.codec.sha256[:8]  # one conversion: records of either are the same
    record = api.encode(np.full((64, 64, 3), 128, np.uint8), codec)
    assert record.machine_only
    with pytest.raises(ComneckError, match="coded for machines only"):
        api.decode(record, load_codec("elic-comneck", 1, weights="elic-comneck-q1-d3"))
    with pytest.raises(ComneckError, match=r"d3_1\.pth\.tar is the release for quality 1, not 3"):
        load_codec("elic-comneck", 3, weights=raw)


def test_a_renamed_raw_release_is_refused_as_weights(layout, tmp_path):
    from comneck_cli.codecs import load_codec

    with pytest.raises(UsageError, match="cannot tell the scenario and quality"):
        load_codec("elic-comneck", 1, weights=_release(tmp_path, "mine.pth.tar", layout))


def _register_neck(name: str, digest: str, scenario: str = "d1", quality: int = 1, tmp_path=None):
    path = tmp_path / f"{name}.safetensors"
    path.write_bytes(b"a neck")
    return registry.import_file(name, path, "neck", {"codec": "elic-comneck", "quality": quality,
                                                     "codec_digest": digest, "scenario": scenario})


def test_features_pick_the_neck_of_the_records_codec_weights(tmp_path):
    """By the digest the neck's entry records, not by name: a d2 record gets the d2 neck without being told."""
    from comneck_cli.features import resolve_neck

    d1 = _register_neck("elic-comneck-q1-neck", "11111111", tmp_path=tmp_path)
    d2 = _register_neck("elic-comneck-q1-d2-neck", "22222222", "d2", tmp_path=tmp_path)
    assert resolve_neck(None, _record("elic-comneck", 1, "22222222")) == d2.path()
    assert resolve_neck(None, _record("elic-comneck", 1, "11111111")) == d1.path()


def test_features_without_a_neck_for_the_weights_names_the_import(tmp_path):
    from comneck_cli.features import resolve_neck

    codec_file = tmp_path / "c.safetensors"
    codec_file.write_bytes(b"d2 codec")
    entry = registry.import_file("elic-comneck-q3-d2", codec_file, "codec",
                                 {"codec": "elic-comneck", "quality": 3, "scenario": "d2"})
    with pytest.raises(RegistryError) as info:
        resolve_neck(None, _record("elic-comneck", 3, entry.sha256[:8]))
    assert info.value.params == ("neck",)
    assert str(info.value) == (f"no neck is registered for elic-comneck quality 3 codec weights {entry.sha256[:8]}; "
                               "import its release file with `comneck weights import-comneck d2_3.pth.tar`, or "
                               "pass `neck` FILE")


@pytest.mark.slow  # a full-size codec codes and decodes four 64² images; a tiny CLIP
def test_imported_release_runs_features_and_eval(tmp_path, monkeypatch, photos, tiny_clip_file):
    """End to end with the imported models: `features` finds the neck from the record alone, and `eval --codec
    elic-comneck` compares the neck with Reconstruction. The released neck feeds ViT-L/14 (1024 wide); here the
    release is a 64-wide neck for the tests' tiny CLIP, through the same code."""
    from PIL import Image

    from comneck_cli import coding as api
    from comneck_cli.codecs import load_codec
    from comneck_cli.eval.run import EvalConfig, run_eval
    from comneck_cli.features import FeatureExtractor, resolve_neck
    from comneck_cli.models import release
    from tests.conftest import TINY_CLIP
    from tests.test_comneck_release import RefLinearEncoder

    monkeypatch.setattr(release, "RELEASE_NECK_CONFIG", {**release.RELEASE_NECK_CONFIG, "width": 64, "heads": 1})
    monkeypatch.setattr(release, "RELEASE_CLIP", (TINY_CLIP, "test"))
    torch.manual_seed(0)
    codec_state, _ = _layout()
    _save_release(tmp_path / "d1_1.pth.tar", codec_state, RefLinearEncoder(width=64).state_dict())
    _import(tmp_path / "d1_1.pth.tar")

    image = np.asarray(Image.open(photos["chelsea"]).convert("RGB"))[:64, :64]
    record = api.encode(image, load_codec("elic-comneck", 1))
    extractor = FeatureExtractor.for_neck(resolve_neck(None, record), clip_weights=tiny_clip_file)
    codec = load_codec("elic-comneck", 1)
    extractor.check(record, codec)
    with pytest.warns(UserWarning, match="interpolating its positional embedding"):  # 4×4 latents, 16×16 positions
        feats = extractor.from_latents([api.decode_latents(record, codec)], layer=-2, select="pooled")
    assert feats.shape == (1, 32) and torch.isfinite(feats).all()

    data = tmp_path / "data"
    data.mkdir()
    for name in ("astronaut", "coffee"):
        Image.open(photos[name]).convert("RGB").crop((0, 0, 64, 64)).save(data / f"{name}.png")
    result = run_eval(EvalConfig(data=data, output=tmp_path / "report", codec="elic-comneck", qualities=(1,),
                                 methods=("neck", "reconstruction"), clip_weights=tiny_clip_file, size=64,
                                 select="pooled", device="cpu"))
    assert not result.skips and not result.failures, (result.skips, result.failures)
    rows = {(r["method"], r["image"]): r for r in result.rows}
    assert set(rows) == {(m, f"{n}.png") for m in ("neck", "reconstruction") for n in ("astronaut", "coffee")}
    assert all(r["feature_cosine"] is not None for r in rows.values())


def test_import_command_errors(layout, tmp_path):
    from click.testing import CliRunner

    from comneck_cli.cli.release_commands import import_comneck

    codec, neck = layout
    bad = _save_release(tmp_path / "d1_4.pth.tar", codec, {**neck, "trans_latent_dim.weight": torch.zeros(1024, 192)})
    result = CliRunner().invoke(import_comneck, [str(bad)])
    assert result.exit_code == 1
    assert result.stderr.startswith("comneck: error: ") and len(result.stderr.strip().splitlines()) == 1
    assert "the neck ('adapter') is not the ComNeck Linear_Encoder" in result.stderr
    renamed = _release(tmp_path, "mine.pth.tar", layout)
    result = CliRunner().invoke(import_comneck, [str(renamed)])
    assert result.exit_code == 2 and "give --scenario and --quality" in result.stderr
    assert _user_entries() == set()
