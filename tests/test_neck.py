"""The transform-neck T: size, token interface with C', neck files and what they were made for."""

from __future__ import annotations

import dataclasses
import warnings

import pytest
import torch

from comneck_cli.clip.tower import ClipTail
from comneck_cli.errors import ComneckError
from comneck_cli.models.neck import NeckInfo, TransformNeck, load_neck, save_neck

TINY = {"latent_channels": 8, "width": 64, "heads": 4, "grid": (4, 4), "mlp_ratio": 4.0}


@pytest.fixture()
def neck():
    torch.manual_seed(0)
    return TransformNeck(**TINY).eval()


@pytest.fixture()
def y_hat():
    return torch.randn(2, 8, 4, 4, generator=torch.Generator().manual_seed(1)).round()


@pytest.fixture()
def info():
    return NeckInfo(
        codec="elic2022-official",
        quality=3,
        codec_digest="0a1B2c3D",
        clip_model="ViT-L-14",
        clip_tag="openai",
        k=2,
        scenario="d1",
    )


def test_full_size_neck_has_the_authors_parameter_count():
    neck = TransformNeck(latent_channels=320, width=1024, heads=16, grid=(16, 16))
    assert sum(p.numel() for p in neck.parameters()) == 13_191_168
    assert neck.positional_embedding.shape == (257, 1024)
    assert neck.block.attn.num_heads == 16
    assert neck.block.mlp.c_fc.out_features == 4096
    assert type(neck.block.mlp.gelu).__name__ == "QuickGELU"


def test_forward_gives_clip_tokens(neck, y_hat):
    with torch.no_grad():
        tokens = neck(y_hat)
    assert tokens.shape == (2, 1 + 16, 64)
    assert torch.isfinite(tokens).all()
    assert not torch.allclose(tokens[0], tokens[1])


def test_tokens_enter_c_prime_and_train_the_neck(neck, y_hat):
    from open_clip.transformer import VisionTransformer

    torch.manual_seed(2)
    visual = VisionTransformer(image_size=56, patch_size=14, width=64, layers=4, heads=4, mlp_ratio=4.0, output_dim=32)
    tail = ClipTail(visual.eval(), 2).requires_grad_(False)
    out = tail(neck(y_hat), layer=-2)
    assert out.embedding.shape == (2, 32)
    assert out.select(-2, "patch").shape == (2, 16, 64)
    out.embedding.square().sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in neck.parameters())


def test_wrong_latent_channels_is_an_error(neck):
    with pytest.raises(ComneckError, match="reads 8-channel latents but got 320 channels"):
        neck(torch.zeros(1, 320, 4, 4))


def test_other_grid_interpolates_positions_and_warns_once(neck):
    y = torch.randn(1, 8, 5, 6)
    with pytest.warns(UserWarning, match=r"latent grid 5x6 differs from the neck's 4x4 positional grid"):
        tokens = neck(y)
    assert tokens.shape == (1, 1 + 30, 64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        neck(y)  # the same grid again: no second warning
        neck(torch.randn(1, 8, 4, 4))  # the trained grid: never a warning
    with torch.no_grad(), pytest.warns(UserWarning, match="latent grid 7x3"):
        neck.positional_embedding[1:] = 0.25
        pos = neck.positions(7, 3)
    assert pos.shape == (1 + 21, 64)
    assert torch.equal(pos[0], neck.positional_embedding[0])  # class position kept
    torch.testing.assert_close(pos[1:], torch.full((21, 64), 0.25))  # bicubic keeps a constant


def test_save_load_round_trip(neck, y_hat, info, tmp_path):
    path = tmp_path / "neck.safetensors"
    save_neck(neck, path, info)
    loaded, loaded_info = load_neck(path, "cpu")
    assert loaded_info == dataclasses.replace(info, config={**TINY, "grid": [4, 4]})
    assert loaded_info.codec_digest == "0a1b2c3d"
    assert not loaded.training
    with torch.no_grad():
        assert torch.equal(loaded(y_hat), neck(y_hat))
    assert [p.name for p in tmp_path.iterdir()] == ["neck.safetensors"]  # no temp file left behind


def test_neck_file_is_plain_safetensors_with_string_metadata(neck, info, tmp_path):
    from safetensors import safe_open

    path = tmp_path / "neck.safetensors"
    save_neck(neck, path, info)
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        keys = set(f.keys())
    assert meta["format"] == "comneck-neck"
    assert meta["codec"] == "elic2022-official" and meta["quality"] == "3" and meta["k"] == "2"
    assert meta["clip_model"] == "ViT-L-14" and meta["clip_tag"] == "openai" and meta["scenario"] == "d1"
    assert keys == set(neck.state_dict())


@pytest.mark.parametrize(
    "change, message",
    [
        ({"codec": "mbt2018-mean"}, "elic2022-official quality 3 but the record was coded with mbt2018-mean quality 3"),
        ({"quality": 2}, "elic2022-official quality 3 but the record was coded with elic2022-official quality 2"),
        ({"digest_hex": "ffffffff"}, "weights 0a1b2c3d but the record was coded with weights ffffffff"),
        ({"digest_hex": bytes.fromhex("deadbeef")}, "but the record was coded with weights deadbeef"),
        ({"digest_hex": "not-hex"}, "but the record was coded with weights 'not-hex'"),
        ({"clip_model": "ViT-B-16"}, "trained for CLIP ViT-L-14/openai but features are asked of ViT-B-16/openai"),
        ({"clip_tag": "laion2b_s32b_b82k"}, "ViT-L-14/openai but features are asked of ViT-L-14/laion2b_s32b_b82k"),
        ({"k": 4}, r"feeds CLIP block 3 \(split k=2\) but the split is k=4"),
    ],
)
def test_mismatch_names_the_field(info, change, message):
    used = {
        "codec": "elic2022-official",
        "quality": 3,
        "digest_hex": "0A1B2C3D",
        "clip_model": "ViT-L-14",
        "clip_tag": "openai",
        "k": 2,
    }
    info.check_matches(**used)  # the neck's own setting passes (digest case-insensitive)
    info.check_matches(**{**used, "digest_hex": bytes.fromhex("0a1b2c3d")})
    with pytest.raises(ComneckError, match=f"neck n.safetensors .*{message}.*; use a matching neck or `neck`"):
        info.check_matches(**{**used, **change}, neck="n.safetensors")


def test_bad_info_values_are_rejected(info):
    with pytest.raises(ValueError, match="8 hex digits"):
        dataclasses.replace(info, codec_digest="0a1b2c3d4e")
    with pytest.raises(ValueError, match="scenario"):
        dataclasses.replace(info, scenario="d4")


def test_files_that_are_not_necks_are_errors(neck, info, tmp_path):
    from safetensors.torch import save_file

    with pytest.raises(ComneckError, match="does not exist"):
        load_neck(tmp_path / "missing.safetensors")

    text = tmp_path / "text.safetensors"
    text.write_text("hello")
    with pytest.raises(ComneckError, match="is not a comneck neck file"):
        load_neck(text)

    plain = tmp_path / "plain.safetensors"
    save_file({k: v.contiguous() for k, v in neck.state_dict().items()}, str(plain))
    with pytest.raises(ComneckError, match="no comneck-neck metadata"):
        load_neck(plain)

    wrong = tmp_path / "wrong.safetensors"
    save_file({"x": torch.zeros(2)}, str(wrong), metadata=info.to_metadata() | {"config": '{"latent_channels": 8, '
              '"width": 64, "heads": 4, "grid": [4, 4], "mlp_ratio": 4.0}'})
    with pytest.raises(ComneckError, match="holds tensors that do not fit its recorded config"):
        load_neck(wrong)

    damaged = tmp_path / "damaged.safetensors"
    meta = info.to_metadata()
    del meta["k"]
    save_file({"x": torch.zeros(2)}, str(damaged), metadata=meta)
    with pytest.raises(ComneckError, match="damaged metadata"):
        load_neck(damaged)
