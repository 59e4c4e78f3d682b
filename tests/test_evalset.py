"""The unseen evaluation set (issue #19): its listing, and assembling it from package archives without a network."""

from __future__ import annotations

import bz2
import hashlib
import io
import json
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import evalset  # noqa: E402

# What trained or tuned the shipped codec (its model card), and what future training draws from (wallpaper and
# background packages): none of it may be a source of the set.
TRAINED_OR_TUNED = {"scikit-image", "python3-skimage", "mate-backgrounds", "gnome-backgrounds",
                    "plasma-workspace-wallpapers", "lomiri-wallpapers", "ukui-wallpapers"}


def test_the_listing_has_twenty_photos_from_three_untrained_sources_each_with_its_licence():
    listing = evalset.read_listing()
    photos, sources = listing["photos"], listing["sources"]
    assert len(photos) >= 20 and len({p["source"] for p in photos}) >= 3
    assert len({p["name"] for p in photos}) == len(photos)
    assert "never train or tune" in listing["rule"].lower()
    for photo in photos:
        assert photo["source"] in sources and re.fullmatch(r"[0-9a-f]{64}", photo["sha256"]), photo
        assert photo["licence"] and photo["licence_where"] and photo["bytes"] > 0, photo
        assert min(photo["width"], photo["height"]) >= 400, photo  # photos, not thumbnails
    for source in sources.values():
        assert source["kind"] in {"debian", "pypi"} and source["version"], source
        name = source["package"]
        assert name not in TRAINED_OR_TUNED and not re.search("wallpaper|background", name), name


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture()
def fake_set(tmp_path):
    """A two-source listing (a Debian package with a PNG, a wheel with a bz2 raw image) and the two archives."""
    rng = np.random.default_rng(0)
    png_pixels = rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)
    raw_pixels = rng.integers(0, 256, (4, 6, 3), dtype=np.uint8)
    files = {"usr/share/fake/photo.png": _png(png_pixels), "fake_wheel/data/face.dat": bz2.compress(raw_pixels.tobytes())}
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    root = tmp_path / "pkgroot"
    (root / "DEBIAN").mkdir(parents=True)
    (root / "DEBIAN" / "control").write_text("Package: fakepkg\nVersion: 1.0-1\nArchitecture: all\n"
                                             "Maintainer: nobody <n@example.org>\nDescription: test photos\n")
    (root / "usr/share/fake").mkdir(parents=True)
    (root / "usr/share/fake/photo.png").write_bytes(files["usr/share/fake/photo.png"])
    with zipfile.ZipFile(downloads / "fake_wheel-2.0-py3-none-any.whl", "w") as wheel:
        wheel.writestr("fake_wheel/data/face.dat", files["fake_wheel/data/face.dat"])
    listing = {
        "rule": "never train or tune on these",
        "sources": {"deb": {"kind": "debian", "package": "fakepkg", "version": "1.0-1"},
                    "whl": {"kind": "pypi", "package": "fake-wheel", "version": "2.0"}},
        "photos": [
            {"name": "a-photo", "source": "deb", "path": "usr/share/fake/photo.png", "width": 30, "height": 20,
             "sha256": hashlib.sha256(files["usr/share/fake/photo.png"]).hexdigest(), "licence": "CC0-1.0"},
            {"name": "a-face", "source": "whl", "path": "fake_wheel/data/face.dat", "width": 6, "height": 4,
             "sha256": hashlib.sha256(files["fake_wheel/data/face.dat"]).hexdigest(), "licence": "CC0-1.0",
             "decode": {"format": "bz2-rgb24", "shape": [4, 6, 3]}},
        ],
    }
    return {"listing": listing, "downloads": downloads, "root": root, "folder": tmp_path / "cache",
            "pixels": {"a-photo": png_pixels, "a-face": raw_pixels}}


def no_network(command, **kwargs):
    raise AssertionError(f"tried to fetch: {command}")


def build_deb(fake_set) -> None:
    if shutil.which("dpkg-deb") is None:
        pytest.skip("needs dpkg-deb")
    subprocess.run(["dpkg-deb", "--root-owner-group", "--build", str(fake_set["root"]),
                    str(fake_set["downloads"] / "fakepkg_1.0-1_all.deb")], check=True, capture_output=True)


def test_assembles_from_archives_already_downloaded_and_loads_the_exact_pixels(fake_set):
    build_deb(fake_set)
    folder, listing = fake_set["folder"], fake_set["listing"]
    assert evalset.status(folder, listing) == {"a-photo": "missing", "a-face": "missing"}
    assert evalset.assemble(folder, fake_set["downloads"], listing, run=no_network, use_installed=False) == []
    assert evalset.status(folder, listing) == {"a-photo": "ok", "a-face": "ok"}
    assert sorted(p.name for p in folder.iterdir()) == ["a-face.dat", "a-photo.png"]
    photos = evalset.load_photos(folder, listing)
    assert list(photos) == ["a-photo", "a-face"]
    for name, pixels in fake_set["pixels"].items():
        assert np.array_equal(photos[name], pixels), name


def test_a_source_that_cannot_be_fetched_is_one_sentence_and_the_others_still_come(fake_set):
    folder, listing = fake_set["folder"], fake_set["listing"]
    calls = []

    def offline(command, **kwargs):
        calls.append(command)
        return subprocess.CompletedProcess(command, 100, "", "E: Failed to fetch fakepkg: Temporary failure\n")

    problems = evalset.assemble(folder, fake_set["downloads"], listing, run=offline, use_installed=False)
    assert calls == [["apt-get", "download", "fakepkg=1.0-1"]]  # the wheel was there: fetched nothing
    assert problems == [f"fakepkg 1.0-1 could not be fetched (`apt-get download fakepkg=1.0-1 ...`: E: Failed to "
                        f"fetch fakepkg: Temporary failure); put its .deb in {fake_set['downloads']} or install it, "
                        "then run this again (1 photo: a-photo)"]
    assert evalset.status(folder, listing) == {"a-photo": "missing", "a-face": "ok"}


def test_a_corrupt_or_wrong_file_is_never_used(fake_set):
    folder, listing, downloads = fake_set["folder"], fake_set["listing"], fake_set["downloads"]
    assert evalset.assemble(folder, downloads, {**listing, "photos": listing["photos"][1:]}, run=no_network,
                            use_installed=False) == []
    face = folder / "a-face.dat"
    face.write_bytes(face.read_bytes()[:-1] + b"x")
    assert evalset.status(folder, listing)["a-face"] == "corrupt"
    with pytest.raises(evalset.EvalsetError, match=r"lacks 2 of 2 photos \(a-photo \(missing\), a-face \(corrupt\)\); "
                                                   r"run `python benchmarks/evalset.py` first"):
        evalset.load_photos(folder, listing)
    # another version's file under the listed path: refused, and the cached file stays as it was
    wrong = json.loads(json.dumps(listing))
    wrong["photos"][1]["sha256"] = "0" * 64
    problems = evalset.assemble(folder, downloads, {**wrong, "photos": wrong["photos"][1:]}, run=no_network,
                                use_installed=False)
    assert problems == ["a-face: fake_wheel/data/face.dat in fake_wheel-2.0-py3-none-any.whl is not the listed file "
                        "(sha256 differs); fetch fake-wheel 2.0 exactly"]
    # the right archive repairs it
    assert evalset.assemble(folder, downloads, {**listing, "photos": listing["photos"][1:]}, run=no_network,
                            use_installed=False) == []
    assert evalset.status(folder, listing)["a-face"] == "ok"


def test_check_lists_the_real_set_and_fetches_nothing(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(subprocess, "run", no_network)
    assert evalset.main(["--check", "--folder", str(tmp_path)]) == 1
    out = capsys.readouterr().out.splitlines()
    listing = evalset.read_listing()
    assert len(out) == len(listing["photos"]) + 1 and all(line.startswith("missing ") for line in out[:-1])
    assert out[-1] == f"0 of {len(listing['photos'])} photos present and verified in {tmp_path}"
    assert list(tmp_path.iterdir()) == []


def test_the_cache_folder_comes_from_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv(evalset.ENV, str(tmp_path / "set"))
    assert evalset.default_folder() == tmp_path / "set"
    monkeypatch.delenv(evalset.ENV)
    monkeypatch.delenv("COMNECK_HOME", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    assert evalset.default_folder() == Path.home() / ".cache" / "comneck" / "evalset"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert evalset.default_folder() == tmp_path / "xdg" / "comneck" / "evalset"


def test_a_ppm_decodes_to_its_samples_though_comneck_encode_does_not_read_ppm(tmp_path):
    pixels = np.random.default_rng(1).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "x.ppm")
    assert np.array_equal(evalset.decode(tmp_path / "x.ppm", {"name": "x", "decode": {"format": "netpbm"}}), pixels)


def test_a_file_of_a_package_installed_here_is_taken_without_fetching(tmp_path):
    """A file of an installed package (as matplotlib's photo is here) is copied when its bytes are the listed ones."""
    from importlib import metadata

    installed = Path(metadata.distribution("pytest").locate_file("pytest/__init__.py"))
    listing = {"sources": {"p": {"kind": "pypi", "package": "pytest", "version": "any"}},
               "photos": [{"name": "init", "source": "p", "path": "pytest/__init__.py",
                           "sha256": hashlib.sha256(installed.read_bytes()).hexdigest()}]}
    assert evalset.assemble(tmp_path / "set", tmp_path / "downloads", listing, run=no_network) == []
    assert (tmp_path / "set" / "init.py").read_bytes() == installed.read_bytes()
