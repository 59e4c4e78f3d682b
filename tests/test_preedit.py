"""The pre-editing module P: shapes and range, start as the identity, guidance tokens, its file format."""

from __future__ import annotations

import pytest
import torch

from comneck_cli.errors import ComneckError

from .conftest import TINY_CLIP
from .test_train import one_thread  # noqa: F401 (autouse fixture)


@pytest.fixture(scope="module")
def tiny_clip(tiny_clip_file):
    from comneck_cli.clip.tower import load_clip

    return load_clip(TINY_CLIP, "test", weights_file=tiny_clip_file)


def test_tokens_come_from_the_asked_layers(tiny_clip):
    """Layer i is the output of block i: the same tensors the full tower's hidden states hold."""
    from comneck_cli.clip.tower import split_clip
    from comneck_cli.models.preedit import ClipTokens

    tokens = ClipTokens(tiny_clip, (1, 3))
    x = torch.rand(2, 3, 56, 56)  # the tiny tower's own size: no resize
    with torch.no_grad():
        got = tokens(x)
        head, tail = split_clip(tiny_clip, 0)
        states = tail(head((x - tokens.prep.mean) / tokens.prep.std), layer=None).hidden_states
    assert [t.shape for t in got] == [(2, 16, 64)] * 2
    assert torch.allclose(got[0], states[1][:, 1:]) and torch.allclose(got[1], states[3][:, 1:])
    assert [g.shape for g in tokens.grids(got)] == [(2, 64, 4, 4)] * 2
    with pytest.raises(ComneckError, match="must lie in 1..4"):
        ClipTokens(tiny_clip, (0, 2))


@pytest.mark.parametrize("size", [(64, 64), (75, 131)])
def test_output_keeps_size_and_range_and_starts_as_identity(tiny_clip, size):
    from comneck_cli.models.preedit import ClipTokens, PreEditor

    torch.manual_seed(0)
    tokens = ClipTokens(tiny_clip, (1, 2))
    editor = PreEditor(tokens.width, (1, 2), channels=8)
    x = torch.rand(2, 3, *size)
    with torch.no_grad():
        assert torch.equal(editor(x, tokens.grids(tokens(x))), x)  # r starts at zero
        editor.out.bias.fill_(5.0)  # a residual that pushes every pixel out of range is clamped
        edited = editor(x, tokens.grids(tokens(x)))
    assert edited.shape == x.shape and torch.equal(edited, torch.ones_like(x))


def test_file_round_trip_and_checks(tiny_clip, tmp_path):
    from comneck_cli import weights as registry
    from comneck_cli.models.preedit import PREEDIT_KIND, PreEditInfo, PreEditor, load_preedit, save_preedit

    torch.manual_seed(1)
    editor = PreEditor(64, (1, 2), channels=8, scales=2)
    with torch.no_grad():
        editor.out.weight.normal_()
    info = PreEditInfo(codec="mbt2018-mean-vbr", codec_digest="0123abcd", clip_model=TINY_CLIP, clip_tag="test")
    path = tmp_path / "p.safetensors"
    save_preedit(editor, path, info)
    loaded, read = load_preedit(path)
    assert read.config == {"clip_width": 64, "layers": [1, 2], "channels": 8, "scales": 2}
    assert (read.codec, read.codec_digest, read.clip_model) == ("mbt2018-mean-vbr", "0123abcd", TINY_CLIP)
    assert all(torch.equal(a, b) for a, b in zip(editor.state_dict().values(), loaded.state_dict().values()))
    registry.import_file("p", path, PREEDIT_KIND)
    assert registry.lookup("p").kind == "preedit"
    (tmp_path / "junk.safetensors").write_bytes(b"not a file")
    with pytest.raises(ComneckError, match="not a comneck pre-editing module file"):
        load_preedit(tmp_path / "junk.safetensors")


def test_a_codec_p_was_not_trained_with_is_refused(vbr_codec_file, tiny_clip_file, tmp_path):
    from comneck_cli.codecs import load_codec
    from comneck_cli.models.preedit import PreEditInfo, PreEditor, load_pre_edit, save_preedit

    path = tmp_path / "p.safetensors"
    save_preedit(PreEditor(64, (1,)), path, PreEditInfo("mbt2018-mean-vbr", "00000000", TINY_CLIP, "test"))
    codec = load_codec("mbt2018-mean-vbr", 3, weights=vbr_codec_file)
    with pytest.raises(ComneckError, match="was trained with mbt2018-mean-vbr weights 00000000"):
        load_pre_edit(path, codec, clip_weights=tiny_clip_file)
    with pytest.raises(ComneckError, match="no pre-editing module 'mbt2018-mean-vbr-preedit' is registered"):
        load_pre_edit(None, codec)
