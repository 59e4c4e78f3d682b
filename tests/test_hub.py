"""`comneck_cli.hub`: the one rule for "a file or a registry name", the same for every kind of model file."""

from __future__ import annotations

import os

import pytest

from comneck_cli import hub
from comneck_cli import weights as registry
from comneck_cli.errors import MismatchError, ModelFileError, RegistryError


@pytest.fixture
def model(tmp_path):
    path = tmp_path / "m.safetensors"
    path.write_bytes(b"tensors")
    return path


def test_an_existing_file_wins_over_a_registered_name(model, tmp_path, monkeypatch):
    other = tmp_path / "other.safetensors"
    other.write_bytes(b"other")
    registry.import_file("m.safetensors", other, "neck")
    monkeypatch.chdir(model.parent)
    assert hub.resolve("m.safetensors", "neck") == hub.resolve(model.name, "neck") == model.relative_to(model.parent)


@pytest.mark.parametrize("kind", sorted(hub.KINDS))
def test_a_registered_name_is_its_verified_file_for_every_kind(model, kind):
    entry = registry.import_file("name", model, kind)
    assert hub.resolve("name", kind) == entry.path()
    entry.path().write_bytes(b"swapped")
    with pytest.raises(registry.WeightsError, match="does not match its registered sha256"):
        hub.resolve("name", kind)


def test_a_name_of_another_kind_is_refused(model):
    registry.import_file("n1", model, "neck")
    with pytest.raises(MismatchError, match="'n1' is registered as neck weights, not as codec weights"):
        hub.resolve("n1", "codec")
    with pytest.raises(MismatchError):
        hub.find("n1", "adapter")


def test_neither_a_file_nor_a_name_is_one_sentence_naming_the_parameter(tmp_path):
    with pytest.raises(RegistryError, match="neither a file nor a registered name") as caught:
        hub.resolve("nope", "adapter")
    assert caught.value.params == ("adapter",)
    assert caught.value.render(lambda p: f"--{p}") == str(caught.value)  # names the value, not a flag
    with pytest.raises(ModelFileError, match=r"neck file .*missing.safetensors does not exist") as caught:
        hub.resolve(tmp_path / "missing.safetensors", "neck")
    with pytest.raises(ModelFileError, match="does not exist"):
        hub.resolve(f"sub{os.sep}x", "codec", param="weights")


def test_nothing_given_falls_back_on_the_default_name(model):
    with pytest.raises(RegistryError, match=r"no neck given; pass `neck` FILE or NAME") as caught:
        hub.resolve(None, "neck")
    assert caught.value.render(lambda p: "--neck") == "no neck given; pass --neck FILE or NAME"
    with pytest.raises(RegistryError) as caught:
        hub.resolve(None, "preedit", default="c-preedit", param="pre_edit", hint="train one")
    assert caught.value.render(lambda p: "--pre-edit") == ("no pre-editing module 'c-preedit' is registered; pass "
                                                          "--pre-edit FILE or NAME, or train one")
    entry = registry.import_file("c-preedit", model, "preedit")
    assert hub.resolve(None, "preedit", default="c-preedit") == entry.path()
    assert hub.find("unregistered", "clip") is None


def test_portable_makes_paths_absolute_and_keeps_names(model, monkeypatch):
    monkeypatch.chdir(model.parent)
    assert hub.portable(model.name) == str(model)
    assert hub.portable("a-name") == "a-name" and hub.portable(None) is None


def test_every_resolution_goes_through_the_hub():
    """No library module outside the registry and the hub reads the registry by name (the ~seven ad-hoc
    resolutions issue #20 counted are gone)."""
    import pathlib

    root = pathlib.Path(__file__).resolve().parents[1] / "comneck_cli"
    offenders = [str(p.relative_to(root)) for p in root.rglob("*.py")
                 if "hub" not in p.parts and "registry.resolve(" in p.read_text(encoding="utf-8")]
    assert not offenders, offenders
