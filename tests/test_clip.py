"""The split of a real (tiny) open_clip ViT into C's first k blocks and C' reproduces encode_image."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from comneck_cli.clip.tower import ClipHead, ClipTail, load_clip, select_features, split_clip
from comneck_cli.errors import ComneckError

TINY_CONFIGS = Path(__file__).parent / "tiny_configs"
TINY_CLIP = "comneck-tiny-ViT-14"  # 56 px, patch 14 (4x4 grid), width 64, 4 blocks, 4 heads
LAYERS = 4


@pytest.fixture(scope="session")
def tiny_clip():
    import open_clip

    open_clip.add_model_config(TINY_CONFIGS)
    torch.manual_seed(0)
    return load_clip(TINY_CLIP, None)


@pytest.fixture(scope="module")
def images():
    return torch.randn(2, 3, 56, 56, generator=torch.Generator().manual_seed(1))


def _towers():
    """Pooling variants open_clip offers for plain ViTs, plus a sequence-first transformer."""
    from open_clip.transformer import VisionTransformer

    def make(**kw):
        torch.manual_seed(2)
        return VisionTransformer(
            image_size=56, patch_size=14, width=64, layers=3, heads=4, mlp_ratio=4.0, output_dim=32, **kw
        ).eval()

    seq_first = make()
    seq_first.transformer.batch_first = False
    for block in seq_first.transformer.resblocks:
        block.attn.batch_first = False
    return {
        "avg": make(pool_type="avg"),
        "avg-ln-after-pool": make(pool_type="avg", final_ln_after_pool=True),
        "tok-ln-after-pool": make(final_ln_after_pool=True),
        "seq-first": seq_first,
    }


@pytest.mark.parametrize("k", range(LAYERS + 1))
def test_tail_of_head_is_encode_image(tiny_clip, images, k):
    head, tail = split_clip(tiny_clip, k)
    with torch.no_grad():
        expected = tiny_clip.encode_image(images)
        tokens = head(images)
        out = tail(tokens)
    assert tokens.shape == (2, 1 + 16, 64)
    assert out.embedding.shape == expected.shape == (2, 32)
    torch.testing.assert_close(out.embedding, expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("k", range(LAYERS + 1))
def test_hidden_states_follow_hf_numbering(tiny_clip, images, k):
    visual = tiny_clip.visual
    with torch.no_grad():
        ref = visual.forward_intermediates(
            images, output_fmt="NLC", output_extra_tokens=True, intermediates_only=True
        )
        pairs = zip(ref["image_intermediates_prefix"], ref["image_intermediates"])
        blocks = [torch.cat([cls, patches], dim=1) for cls, patches in pairs]
        expected = [visual._embeds(images), *blocks]  # [0] after ln_pre, [i] output of block i
        out = ClipTail(visual, k)(ClipHead(visual, k)(images))
    assert len(out.hidden_states) == LAYERS + 1
    for i, state in enumerate(out.hidden_states):
        if i < k:
            assert state is None
        else:
            torch.testing.assert_close(state, expected[i], rtol=0, atol=1e-5)
    # LLaVA's choice: layer -2 (output of block L-1), class token dropped, before ln_post.
    if k <= LAYERS - 1:
        torch.testing.assert_close(out.select(-2, "patch"), expected[LAYERS - 1][:, 1:], rtol=0, atol=1e-5)
        torch.testing.assert_close(out.select(-2, "cls"), expected[LAYERS - 1][:, 0], rtol=0, atol=1e-5)
    torch.testing.assert_close(out.select(-1, "all"), expected[LAYERS], rtol=0, atol=1e-5)
    assert out.select(0, "pooled") is out.embedding


@pytest.mark.parametrize("name", ["avg", "avg-ln-after-pool", "tok-ln-after-pool", "seq-first"])
def test_split_matches_other_tower_variants(name, images):
    visual = _towers()[name]
    with torch.no_grad():
        expected = visual(images)
        for k in (0, 2, 3):
            head, tail = split_clip(visual, k)
            torch.testing.assert_close(tail(head(images)).embedding, expected, rtol=0, atol=1e-5)


def test_split_shares_parameters_without_copying(tiny_clip):
    head, tail = split_clip(tiny_clip, 2)
    visual_params = {id(p) for p in tiny_clip.visual.parameters()}
    head_params = {id(p) for p in head.parameters()}
    tail_params = {id(p) for p in tail.parameters()}
    assert head_params | tail_params == visual_params
    assert not head_params & tail_params


def test_keeping_one_layer_keeps_only_that_state(tiny_clip, images):
    head, tail = split_clip(tiny_clip, 1)
    with torch.no_grad():
        out = tail(head(images), layer=-2)
    kept = [i for i, s in enumerate(out.hidden_states) if s is not None]
    assert kept == [LAYERS - 1]
    with pytest.raises(ComneckError, match="not kept"):
        out.select(-1, "patch")


def test_layer_inside_c_is_an_error_saying_why(tiny_clip, images):
    head, tail = split_clip(tiny_clip, 2)
    with pytest.raises(ComneckError, match=r"inside C's first k=2 blocks, which the transform-neck replaces"):
        tail(head(images), layer=1)
    with pytest.raises(ComneckError, match=r"layer -4 \(the output of block 1\)"):
        tail(head(images), layer=-4)
    out = tail(head(images))
    with pytest.raises(ComneckError, match="embedding after ln_pre"):
        out.select(0, "all")
    with pytest.raises(ComneckError, match="does not exist"):
        select_features(out.hidden_states, out.embedding, LAYERS + 1, "patch")
    with pytest.raises(ComneckError, match="unknown feature selection"):
        out.select(-1, "mean")


def test_bad_split_and_tower_are_errors(tiny_clip):
    with pytest.raises(ComneckError, match=r"k=5 is outside"):
        ClipHead(tiny_clip.visual, LAYERS + 1)
    with pytest.raises(ComneckError, match="not an open_clip VisionTransformer"):
        ClipTail(torch.nn.Linear(2, 2), 0)


def test_offline_missing_weights_say_how_to_supply_them(monkeypatch, tmp_path):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ComneckError) as info:
        load_clip("ViT-L-14", "openai", cache_dir=tmp_path)
    message = str(info.value)
    assert "ViT-L-14/openai are not in the local cache and cannot be downloaded" in message
    assert "`comneck weights import clip-vit-l-14-openai FILE`" in message


def test_unknown_model_and_tag_are_errors():
    with pytest.raises(ComneckError, match="unknown CLIP model 'ViT-Q-99'"):
        load_clip("ViT-Q-99", None)
    with pytest.raises(ComneckError, match="unknown weights tag 'nope' for CLIP model ViT-L-14; use one of: openai"):
        load_clip("ViT-L-14", "nope")


def test_weights_file_loads_and_openai_tag_forces_quick_gelu(tiny_clip, tmp_path, images):
    from open_clip.transformer import QuickGELU
    from safetensors.torch import save_file

    path = tmp_path / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in tiny_clip.state_dict().items()}, str(path))
    loaded = load_clip(TINY_CLIP, "openai", weights_file=path)
    assert not loaded.training
    assert isinstance(loaded.visual.transformer.resblocks[0].mlp.gelu, QuickGELU)
    for name, tensor in tiny_clip.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    plain = load_clip(TINY_CLIP, None, weights_file=path)
    assert not isinstance(plain.visual.transformer.resblocks[0].mlp.gelu, QuickGELU)
    with torch.no_grad():
        torch.testing.assert_close(plain.encode_image(images), tiny_clip.encode_image(images), rtol=0, atol=0)


def test_bad_weights_file_is_an_error(tiny_clip, tmp_path):
    with pytest.raises(ComneckError, match="does not exist"):
        load_clip(TINY_CLIP, None, weights_file=tmp_path / "missing.pt")
    bad = tmp_path / "bad.pt"
    torch.save({"not": torch.zeros(1)}, bad)
    with pytest.raises(ComneckError, match=f"CLIP weights file {bad} could not be loaded into {TINY_CLIP}"):
        load_clip(TINY_CLIP, None, weights_file=bad)


# --------------------------------------------------------------------------- preprocessing and zero-shot
def test_tensor_preprocessing_agrees_with_open_clips_transform(tiny_clip):
    """The differentiable path (teachers, guidance) and open_clip's eval transform (features, eval) give C the same
    input for a square image: one preprocessor, one config."""
    import numpy as np

    from comneck_cli.clip.preprocess import ClipPreprocess

    prep = ClipPreprocess(tiny_clip)
    ramp = np.linspace(0, 255, 112)
    image = np.stack([np.add.outer(ramp, ramp) / 2, np.add.outer(ramp, 255 - ramp) / 2,
                      np.full((112, 112), 90.0)], axis=-1).round().astype(np.uint8)
    pixels = torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255
    assert prep.size == (56, 56)
    ours, theirs = prep(pixels)[0], prep.image(image)
    assert ours.shape == theirs.shape == (3, 56, 56)
    assert ((ours - theirs) * prep.std[0]).abs().max() < 1.5 / 255  # a uint8 rounding apart
    at_size = torch.rand(1, 3, 56, 56)  # no resize at C's own size: normalisation only
    torch.testing.assert_close(prep(at_size), (at_size - prep.mean) / prep.std)


def test_zero_shot_weights_average_normalised_templates(tiny_clip):
    import open_clip
    import torch.nn.functional as F

    from comneck_cli.clip.zeroshot import ZeroShot, class_weights, imagenet_templates

    classes, templates = ["cat", "dog", "fish"], ("a photo of a {}.", "a drawing of a {}.")
    weights = class_weights(tiny_clip, TINY_CLIP, classes, templates, batch_size=2)  # one class per text pass
    tokenizer = open_clip.get_tokenizer(TINY_CLIP)
    with torch.no_grad():
        texts = [F.normalize(tiny_clip.encode_text(tokenizer([t.format(c) for t in templates])), dim=-1) for c in classes]
        by_hand = torch.stack([F.normalize(per_template.mean(0), dim=0) for per_template in texts])
    torch.testing.assert_close(weights, by_hand)
    classifier = ZeroShot(tiny_clip, TINY_CLIP, classes, templates)
    assert classifier.predict(3 * by_hand[[2, 0, 1]]).tolist() == [2, 0, 1]
    assert len(imagenet_templates()) == 80 and all("{}" in t for t in imagenet_templates())


def test_clip_errors_name_parameters_for_the_command_line(tmp_path):
    from comneck_cli.cli.plumbing import flag

    with pytest.raises(ComneckError) as info:
        load_clip(TINY_CLIP, None, weights_file=tmp_path / "missing.pt")
    assert "--" not in str(info.value) and "pass --clip-weights an existing" in info.value.render(flag)
    with pytest.raises(ComneckError) as info:
        load_clip("ViT-Q-99", None)
    assert "pass --clip an open_clip model name" in info.value.render(flag)
