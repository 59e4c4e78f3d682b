"""Each --for preset against the families' own vision-tower code: Hugging Face transformers' CLIP classes.

The families (LLaVA, LLaVA-1.5, Shikra, Honeybee, LLaMA-Adapter, V2L) load CLIP ViT-L/14 through
``transformers.CLIPVisionModel`` and pick ``hidden_states[layer]``; here a tiny open_clip ViT is converted
to a ``CLIPVisionModelWithProjection`` with the same weights and both must give the same tensors.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from comneck_cli.clip.tower import ClipHead, ClipTail
from comneck_cli.features import FeatureExtractor
from comneck_cli.clip.presets import PRESETS, expand_to_square, mean_colour

from .conftest import TINY_CLIP

transformers = pytest.importorskip("transformers")


def to_hf(visual) -> "transformers.CLIPVisionModelWithProjection":
    """open_clip VisionTransformer -> transformers CLIPVisionModelWithProjection with identical weights."""
    width = visual.transformer.width
    blocks = visual.transformer.resblocks
    config = transformers.CLIPVisionConfig(
        hidden_size=width, intermediate_size=blocks[0].mlp.c_fc.out_features, num_hidden_layers=len(blocks),
        num_attention_heads=blocks[0].attn.num_heads, image_size=visual.image_size[0],
        patch_size=visual.patch_size[0], projection_dim=visual.proj.shape[1], hidden_act="quick_gelu",
        layer_norm_eps=1e-5,
    )
    hf = transformers.CLIPVisionModelWithProjection(config).eval()
    sd = {
        "vision_model.embeddings.class_embedding": visual.class_embedding,
        "vision_model.embeddings.patch_embedding.weight": visual.conv1.weight,
        "vision_model.embeddings.position_embedding.weight": visual.positional_embedding,
        "vision_model.pre_layrnorm.weight": visual.ln_pre.weight, "vision_model.pre_layrnorm.bias": visual.ln_pre.bias,
        "vision_model.post_layernorm.weight": visual.ln_post.weight,
        "vision_model.post_layernorm.bias": visual.ln_post.bias,
        "visual_projection.weight": visual.proj.T,
    }
    for i, b in enumerate(blocks):
        p = f"vision_model.encoder.layers.{i}."
        for name, w, bias in zip("qkv", b.attn.in_proj_weight.chunk(3), b.attn.in_proj_bias.chunk(3)):
            sd[p + f"self_attn.{name}_proj.weight"], sd[p + f"self_attn.{name}_proj.bias"] = w, bias
        sd.update({
            p + "self_attn.out_proj.weight": b.attn.out_proj.weight, p + "self_attn.out_proj.bias": b.attn.out_proj.bias,
            p + "layer_norm1.weight": b.ln_1.weight, p + "layer_norm1.bias": b.ln_1.bias,
            p + "layer_norm2.weight": b.ln_2.weight, p + "layer_norm2.bias": b.ln_2.bias,
            p + "mlp.fc1.weight": b.mlp.c_fc.weight, p + "mlp.fc1.bias": b.mlp.c_fc.bias,
            p + "mlp.fc2.weight": b.mlp.c_proj.weight, p + "mlp.fc2.bias": b.mlp.c_proj.bias,
        })
    missing, unexpected = hf.load_state_dict({k: v.detach().clone() for k, v in sd.items()}, strict=False)
    assert not unexpected and all("position_ids" in m for m in missing), (missing, unexpected)
    return hf


@pytest.fixture(scope="module")
def towers(tiny_clip_file):
    import open_clip

    model = open_clip.create_model(TINY_CLIP, pretrained=str(tiny_clip_file), force_quick_gelu=True).eval()
    return model, to_hf(model.visual)


def hf_reference(hf, pixels: torch.Tensor, preset) -> torch.Tensor:
    """What each family's own code does with the HF tower's outputs."""
    out = hf(pixel_values=pixels, output_hidden_states=True)
    if preset.select == "patch":  # LLaVA: image_forward_outs.hidden_states[select_layer][:, 1:]
        return out.hidden_states[preset.layer][:, 1:]
    if preset.select == "projected":  # LLaMA-Adapter: all tokens after ln_post and the projection
        return hf.visual_projection(hf.vision_model.post_layernorm(out.last_hidden_state))
    return out.image_embeds  # V2L: the projected CLS embedding


@pytest.mark.parametrize("family", sorted(PRESETS))
@pytest.mark.parametrize("k", [0, 2])
def test_preset_equals_the_family_code(towers, family, k):
    model, hf = towers
    preset = PRESETS[family]
    pixels = torch.randn(2, 3, 56, 56, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = hf_reference(hf, pixels, preset)
        tail = ClipTail(model.visual, k)
        out = tail(ClipHead(model.visual, k)(pixels), layer=None, projected=preset.select == "projected")
        got = out.select(preset.layer, preset.select)
    assert got.shape == want.shape
    assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()


def test_llava_15_padding_and_preprocessing_match_llava(towers):
    """LLaVA-1.5: expand2square with the mean colour, then CLIPImageProcessor (resize, crop, normalise)."""
    model, _ = towers
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (40, 90, 3), dtype=np.uint8)
    processor = transformers.CLIPImageProcessor(
        size={"shortest_edge": 56}, crop_size={"height": 56, "width": 56},
        image_mean=list(model.visual.preprocess_cfg["mean"]), image_std=list(model.visual.preprocess_cfg["std"]),
    )
    fill = mean_colour(processor.image_mean)

    def expand2square(pil_img, background_color):  # verbatim from LLaVA's llava/mm_utils.py
        width, height = pil_img.size
        if width == height:
            return pil_img
        elif width > height:
            result = Image.new(pil_img.mode, (width, width), background_color)
            result.paste(pil_img, (0, (width - height) // 2))
            return result
        else:
            result = Image.new(pil_img.mode, (height, height), background_color)
            result.paste(pil_img, ((height - width) // 2, 0))
            return result

    theirs = np.asarray(expand2square(Image.fromarray(image), fill))
    assert np.array_equal(expand_to_square(image, fill), theirs)
    ex = FeatureExtractor(clip=model, k=0, device=torch.device("cpu"), pad_to_square=True)
    ours = ex.preprocess(image)
    want = torch.from_numpy(processor(images=Image.fromarray(theirs), return_tensors="np")["pixel_values"][0])
    # Both resize with PIL bicubic; HF's resize rounds to uint8 in between, open_clip's stays float.
    assert torch.allclose(ours, want, atol=0.05), (ours - want).abs().max()


def test_presets_cover_the_families():
    assert PRESETS["llava-1.5"].clip_model == "ViT-L-14-336" and PRESETS["llava-1.5"].pad_to_square
    assert {p.clip_tag for p in PRESETS.values()} == {"openai"}
    assert (PRESETS["honeybee"].layer, PRESETS["honeybee"].select) == (-1, "patch")


def test_larger_tower_grid_end_to_end(tmp_path, codec_files, photos, tiny_clip_file):
    """The 336-pixel case in miniature: a 112-px tower has an 8×8 patch grid, a 128×128 image an 8×8 latent grid,
    so the neck's tokens (1 + 64) enter C' without interpolation (as 384² images do for ViT-L/14-336's 24×24);
    other sizes interpolate the neck's positions and say so."""
    import open_clip
    from click.testing import CliRunner
    from safetensors.torch import save_file

    from comneck_cli import weights as registry
    from comneck_cli.cli import main
    from comneck_cli.models.neck import NeckInfo, TransformNeck, save_neck

    name = "comneck-tiny-ViT-14-112"
    torch.manual_seed(0)
    clip = open_clip.create_model(name, pretrained=None)
    save_file({k: v.contiguous() for k, v in clip.state_dict().items()}, str(tmp_path / "clip112.safetensors"))
    neck = TransformNeck(latent_channels=12, width=64, heads=4, grid=(8, 8))
    info = NeckInfo(codec="mbt2018-mean", quality=1, codec_digest=registry.file_sha256(codec_files["mbt2018-mean"])[:8],
                    clip_model=name, clip_tag="test", k=2, scenario="d1", config=neck.config)
    save_neck(neck, tmp_path / "neck112.safetensors", info)
    full = np.asarray(Image.open(photos["astronaut"]).convert("RGB"))
    Image.fromarray(full[:128, :128]).save(tmp_path / "a.png")
    Image.fromarray(full[:192, :192]).save(tmp_path / "b.png")
    runner = CliRunner()
    w = ["--weights", str(codec_files["mbt2018-mean"])]
    for stem in "ab":
        assert runner.invoke(main, ["encode", str(tmp_path / f"{stem}.png"), "--codec", "mbt2018-mean", "-q", "1", *w]).exit_code == 0
    args = ["--neck", str(tmp_path / "neck112.safetensors"), "--clip-weights", str(tmp_path / "clip112.safetensors"), *w]
    r = runner.invoke(main, ["features", str(tmp_path / "a.cnk"), "-o", str(tmp_path / "a.pt"), *args])
    assert r.exit_code == 0, r.stderr
    assert torch.load(tmp_path / "a.pt", weights_only=True)["features"].shape == (1, 64, 64)
    assert "interpolating" not in r.stderr
    r = runner.invoke(main, ["features", str(tmp_path / "b.cnk"), "-o", str(tmp_path / "b.pt"), *args])
    assert r.exit_code == 0 and "interpolating" in r.stderr
    assert torch.load(tmp_path / "b.pt", weights_only=True)["features"].shape == (1, 144, 64)
    # A preset for another tower refuses this neck; a preset with a contradicting --layer is a usage error.
    r = runner.invoke(main, ["features", str(tmp_path / "a.cnk"), "-o", str(tmp_path / "c.pt"), "--for", "llava", *args])
    assert r.exit_code == 1 and "reads ViT-L-14" in r.stderr
    r = runner.invoke(main, ["features", str(tmp_path / "a.cnk"), "-o", str(tmp_path / "c.pt"), "--for", "llava",
                             "--layer", "-1", *args])
    assert r.exit_code == 2 and "--for llava sets --layer -2" in r.stderr
