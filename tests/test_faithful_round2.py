"""Issue #30, items 3 and 6: `train neck --recipe release|paper` does what the authors' code (release) or the paper
does where they differ, `features` runs the C' a neck was trained for, and tests that fail when the method is broken
(z's medians, the cross-entropy form, d1's learning rates, the semantic guide's block)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from .test_train import one_thread  # noqa: F401 (autouse fixture)
from .test_train_neck import TINY_CLIP, neck_config, tiny_clip_config  # noqa: F401 (autouse fixture)


def neck_run(cfg):
    """A NeckRun built as `train_neck` builds it, to look at one step without training; its tower's ``ln_post``
    made non-trivial (:func:`trained_ln_post`)."""
    from comneck_cli.train.loop import Runtime
    from comneck_cli.train.neck import NeckRun, _resolve

    run = NeckRun(cfg, Runtime(torch.device("cpu")), _resolve(cfg))
    trained_ln_post(run.tail.ln_post)  # shared by the student's C' and the teacher
    return run


def trained_ln_post(norm: torch.nn.LayerNorm) -> None:
    """A fresh tower's ``ln_post`` (weight 1, bias 0) is idempotent, so applying it twice would change nothing;
    trained weights have a scale and shift, which the second application normalises away."""
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        norm.weight.copy_(1 + 2 * torch.rand(norm.weight.shape, generator=generator))
        norm.bias.copy_(torch.randn(norm.bias.shape, generator=generator))


def double_ln_post_embedding(visual, tokens: torch.Tensor) -> torch.Tensor:
    """The authors' ``VisionTransformer.forward`` tail (CLIP_modify/clip/model.py) after the blocks: ``ln_post`` on
    every token, ``ln_post`` again, ``@ proj``, the class token."""
    x = visual.ln_post(visual.ln_post(tokens))
    return (x @ visual.proj)[:, 0]


def run_blocks(visual, tokens: torch.Tensor, start: int) -> torch.Tensor:
    for block in visual.transformer.resblocks[start:]:
        tokens = block(tokens)
    return tokens


@pytest.fixture(scope="module")
def tiny_clip():
    import open_clip

    open_clip.add_model_config(Path(__file__).parent / "tiny_configs")
    torch.manual_seed(0)
    model = open_clip.create_model(TINY_CLIP, pretrained=None).eval()
    trained_ln_post(model.visual.ln_post)
    return model


# ---------------------------------------------------------------- item 3: data
@pytest.mark.parametrize("name, mode", [("bilinear", "BILINEAR"), ("bicubic", "BICUBIC")])
def test_resize_is_torchvisions_pixel_for_pixel(name, mode):
    """The authors' `transforms.Resize(256)` (bilinear by default on PIL) + `CenterCrop(256)`, exactly; the long side
    is truncated as torchvision does (457·256/300 = 389.97 -> 389, not 390)."""
    from PIL import Image
    from torchvision import transforms as T

    from comneck_cli.train.data import resize_centre_crop

    rng = np.random.default_rng(0)
    for shape in [(300, 457, 3), (513, 301, 3)]:
        image = rng.integers(0, 256, shape, dtype=np.uint8)
        reference = T.Compose([T.Resize(256, interpolation=getattr(T.InterpolationMode, mode)), T.CenterCrop(256),
                               T.ToTensor()])(Image.fromarray(image))
        assert torch.equal(resize_centre_crop(image, 256, name), reference)


@pytest.mark.parametrize("recipe, mode", [("release", "BILINEAR"), ("paper", "BICUBIC")])
def test_recipe_picks_the_datas_resize_filter(recipe, mode, trained_codec, image_folder, tmp_path):
    from PIL import Image
    from torchvision import transforms as T

    run = neck_run(neck_config("d1", trained_codec, image_folder, tmp_path, recipe=recipe))
    dataset = run.batches.dataset
    path, _ = dataset.samples[0]
    reference = T.Compose([T.Resize(64, interpolation=getattr(T.InterpolationMode, mode)), T.CenterCrop(64),
                           T.ToTensor()])(Image.open(path).convert("RGB"))
    assert torch.equal(dataset[(0, (0, 0, 0))][0], reference)


# ---------------------------------------------------------------- item 3: the objective
def test_cross_entropy_forms():
    """release (their ClipClsloss): raw embedding @ unit class weights, no scale; paper: logit_scale · cosine."""
    from comneck_cli.train.losses import zero_shot_cross_entropy

    torch.manual_seed(0)
    image, text, labels = 3 * torch.randn(4, 8), torch.randn(5, 8), torch.tensor([0, 1, 2, 4])
    unit = text / text.norm(dim=-1, keepdim=True)
    dot = F.cross_entropy(image @ unit.T, labels)
    cosine = F.cross_entropy(50.0 * (image / image.norm(dim=-1, keepdim=True)) @ unit.T, labels)
    assert zero_shot_cross_entropy(image, text, 50.0, labels, "dot") == pytest.approx(dot.item(), rel=1e-6)
    assert zero_shot_cross_entropy(image, text, 50.0, labels) == pytest.approx(cosine.item(), rel=1e-6)
    assert abs(dot.item() - cosine.item()) > 0.1


@pytest.mark.parametrize("recipe", ["release", "paper"])
def test_each_recipes_first_step_is_its_objective(recipe, trained_codec, image_folder, tmp_path):
    """One stage-1 step's cross-entropy and loss, recomputed by hand from the run's own parts in the recipe's form:
    release = 11.52 · 100 · CE(raw embedding after ln_post twice @ class weights); paper = CE(logit_scale · cos)
    with one ln_post. Fails when the run ignores the recipe's CE form, ln_post count or loss weights."""
    from comneck_cli.train.latents import frozen_latents

    run = neck_run(neck_config("d1", trained_codec, image_folder, tmp_path, recipe=recipe))
    _, x, labels = next(run.batches.iterate(0, 1))
    with torch.no_grad():
        last = run.neck(frozen_latents(run.model, run.codec.spec.family, x, None))
        for block in run.tail.blocks.resblocks:
            last = block(last)
        once = (run.tail.ln_post(last) @ run.tail.proj)[:, 0]
        twice = (run.tail.ln_post(run.tail.ln_post(last)) @ run.tail.proj)[:, 0]
        if recipe == "release":
            expected = F.cross_entropy(twice @ run.classes.T, labels)
        else:
            expected = F.cross_entropy(run.logit_scale * F.normalize(once, dim=-1) @ run.classes.T, labels)
    values = run.step(0, x, labels)
    assert values["ce"] == pytest.approx(expected.item(), rel=1e-4)
    assert values["loss"] == pytest.approx((1152.0 if recipe == "release" else 1.0) * values["ce"], rel=1e-5)


@pytest.mark.parametrize("recipe", ["release", "paper"])
def test_each_recipes_distillation_target(recipe, trained_codec, image_folder, tmp_path):
    """The teacher's target: the tower on the crop resized bicubically to CLIP's input (unclamped for release, as
    torchvision's Resize on their float tensor) and normalised, then ln_post twice (release) or once (paper)."""
    from torchvision import transforms as T

    run = neck_run(neck_config("d1", trained_codec, image_folder, tmp_path, recipe=recipe))
    _, x, _ = next(run.batches.iterate(0, 1))
    cfg = run.teacher.preprocess.cfg
    resized = T.Resize(run.teacher.size, interpolation=T.InterpolationMode.BICUBIC, antialias=True)(x)
    if recipe == "paper":
        resized = resized.clamp(0, 1)
    clip_input = T.Normalize(cfg.mean, cfg.std)(resized)
    visual = run.tail  # C' shares ln_post and proj with the tower
    with torch.no_grad():
        last = run.teacher.head(clip_input)
        for block in run.tail.blocks.resblocks:
            last = block(last)
        normed = visual.ln_post(last)
        normed = visual.ln_post(normed) if recipe == "release" else normed
        expected = (normed @ visual.proj)[:, 0]
        target = run.teacher(x)[0]
    torch.testing.assert_close(target, expected, rtol=1e-5, atol=1e-6)


def test_release_defaults_and_batch(trained_codec, image_folder, tmp_path):
    """release is the default, batch 32 is the neck's default (the authors' config), the codec's stays 8; the neck
    file records its recipe."""
    from click.testing import CliRunner

    from comneck_cli.cli import main
    from comneck_cli.train import CodecTrainConfig, NeckTrainConfig
    from comneck_cli.train.config import defaults

    assert defaults(NeckTrainConfig())["recipe"] == "release"
    assert defaults(NeckTrainConfig())["batch_size"] == 32
    assert defaults(CodecTrainConfig())["batch_size"] == 8
    help_text = " ".join(CliRunner().invoke(main, ["train", "neck", "--help"]).output.split())
    assert "--recipe [release|paper]" in help_text and "[default: (32); x>=1]" in help_text


@pytest.mark.slow
def test_neck_records_its_recipe_and_d2_follows_it(trained_codec, image_folder, tmp_path):
    from comneck_cli.errors import MismatchError
    from comneck_cli.models.neck import load_neck
    from comneck_cli.train import train_neck

    cfg = neck_config("d1", trained_codec, image_folder, tmp_path / "d1", steps=(1, 1, 1), batch_size=2)
    d1 = train_neck(cfg).output
    assert load_neck(d1)[1].recipe == "release" and load_neck(d1)[1].ln_post_twice
    with pytest.raises(MismatchError, match="release recipe"):
        train_neck(neck_config("d2", trained_codec, image_folder, tmp_path / "bad", steps=(1, 1, 1), batch_size=2,
                               neck_init=d1, recipe="paper"))
    cfg = neck_config("d2", trained_codec, image_folder, tmp_path / "d2", steps=(1, 1, 1), batch_size=2, neck_init=d1)
    assert load_neck(train_neck(cfg).output)[1].recipe == "release"


# ---------------------------------------------------------------- item 3: inference follows the neck's record
def test_clip_tail_applies_ln_post_twice_only_when_asked(tiny_clip):
    from comneck_cli.clip.tower import split_clip

    visual = tiny_clip.visual
    x = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        head, once = split_clip(tiny_clip, 2)
        _, twice = split_clip(tiny_clip, 2, ln_post_twice=True)
        tokens = head(x)
        torch.testing.assert_close(once(tokens).embedding, tiny_clip.encode_image(x))
        last = run_blocks(visual, tokens, 2)
        torch.testing.assert_close(twice(tokens).embedding, double_ln_post_embedding(visual, last))
        projected = twice(tokens, projected=True).projected
        torch.testing.assert_close(projected, visual.ln_post(visual.ln_post(last)) @ visual.proj)
        assert not torch.allclose(once(tokens).embedding, twice(tokens).embedding)
        # hidden states do not pass through ln_post: the same either way
        torch.testing.assert_close(once(tokens, layer=-2).select(-2, "patch"), twice(tokens, layer=-2).select(-2, "patch"))


@pytest.mark.parametrize("recipe", ["release", "paper", ""])
def test_features_run_the_c_prime_the_neck_was_trained_for(recipe, neck_file, tiny_clip, tmp_path):
    """A release neck (the authors' files, and those trained here by default) gets ln_post twice in C'; a paper neck
    and an older file without the field get it once."""
    from safetensors.torch import save_file

    from comneck_cli.features import FeatureExtractor
    from comneck_cli.models.neck import load_neck, save_neck

    clip_file = tmp_path / "clip.safetensors"
    save_file({k: v.contiguous() for k, v in tiny_clip.state_dict().items()}, str(clip_file))
    clip = tiny_clip
    neck, info = load_neck(neck_file)
    path = tmp_path / "neck.safetensors"
    save_neck(neck, path, type(info)(**{**info.__dict__, "recipe": recipe}))
    assert load_neck(path)[1].recipe == recipe
    extractor = FeatureExtractor.for_neck(path, clip_weights=clip_file)
    torch.manual_seed(1)
    y_hat = torch.randn(1, 12, 4, 4)
    features = extractor.from_latents([y_hat], -1, "pooled")
    with torch.no_grad():
        last = run_blocks(clip.visual, neck(y_hat), 2)
        expected = (double_ln_post_embedding(clip.visual, last) if recipe == "release"
                    else (clip.visual.ln_post(last) @ clip.visual.proj)[:, 0])
    torch.testing.assert_close(features, expected)


# ---------------------------------------------------------------- item 6: breakages no test caught
def test_z_is_rounded_around_its_medians_in_forward():
    """ElicComneck.forward's z_hat (what training and the authors' inference feed h_s) is the coder's: rounded
    around the bottleneck's medians. The fixture's medians are 0, so they are moved here."""
    from comneck_cli.codecs.elic_comneck import ElicComneck

    torch.manual_seed(0)
    model = ElicComneck(N=8).eval()
    with torch.no_grad():
        model.entropy_bottleneck.quantiles += 0.37  # medians 0.37: rounding z and z - 0.37 differ
    model.update(force=True)
    assert (model.entropy_bottleneck._get_medians() - 0.37).abs().max() < 1e-6
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        _, coded = model.compress(x)
        forward = model(x)["y_hat"]
    torch.testing.assert_close(forward, coded, rtol=0, atol=1e-4)


def test_d1_default_learning_rates_are_the_authors(trained_codec, image_folder, tmp_path):
    """Their config: Adam at 1e-4, MultiStepLR milestone 20 (x0.1): stage 1 at 1e-4, stages 2 and 3 at 1e-5."""
    from comneck_cli.train.neck import default_stages

    assert [s.lr for s in default_stages("d1")] == [1e-4, 1e-5, 1e-5]
    cfg = neck_config("d1", trained_codec, image_folder, tmp_path, lr=None)
    run = neck_run(cfg)
    seen = []
    for index in range(3):
        run.enter(index)
        seen.append(run.optimizer.param_groups[0]["lr"])
    assert seen == [1e-4, 1e-5, 1e-5]


def test_semantic_guide_reads_block_two(tiny_clip):
    """CoTAM's map is the class token's attention to the patches in CLIP block 2 (1-based), mean over heads."""
    from comneck_cli.clip.preprocess import ClipPreprocess
    from comneck_cli.coding.semantic import Guide

    visual = tiny_clip.visual
    torch.manual_seed(2)
    x = torch.rand(2, 3, 64, 64)

    def attention_of(block: int) -> torch.Tensor:
        with torch.no_grad():
            tokens = _embed(visual, ClipPreprocess(tiny_clip)(x))
            for b in visual.transformer.resblocks[: block - 1]:
                tokens = b(tokens)
            q = visual.transformer.resblocks[block - 1].ln_1(tokens)
            _, weights = visual.transformer.resblocks[block - 1].attn(q, q, q, need_weights=True)
        return weights[:, 0, 1:].reshape(-1, 4, 4)

    got = Guide(tiny_clip).attention(x)
    torch.testing.assert_close(got, attention_of(2))
    assert not torch.allclose(got, attention_of(1), atol=1e-4)


def _embed(visual, images: torch.Tensor) -> torch.Tensor:
    """open_clip's own embedding (``_embeds``): patches, class token, positions, ``ln_pre``."""
    return visual._embeds(images)


def test_semantic_loss_targets_the_original_images_tokens(image_folder, tiny_clip_file, tmp_path, monkeypatch):
    """`train vbr --pre-edit`: L_sem compares the decoded image's tokens with those of the original x, never with
    those of P's edit x_e (which would teach P and the codec to agree with each other, not with the image)."""
    from comneck_cli.train import vbr
    from comneck_cli.train.loop import Runtime

    cfg = vbr.VbrTrainConfig(data=image_folder, steps=1, crop=64, batch_size=2, pre_edit=True,
                             config={"N": 16, "M": 24}, gain_maps=0.0, clip_model=TINY_CLIP, clip_tag="test", clip_weights=tiny_clip_file,
                             token_layers=(1, 2), guide_layers=(1, 2), quiet=True, device="cpu", register=None,
                             pre_edit_register=None, output=tmp_path / "vbr.safetensors", run_dir=tmp_path / "run")
    run = vbr.VbrRun(cfg, Runtime(torch.device("cpu")), vbr._resolve(cfg))
    with torch.no_grad():  # a P that edits visibly (a fresh one is the identity, where both targets agree)
        run.editor.out.weight.normal_(std=0.3, generator=torch.Generator().manual_seed(0))
    seen = []
    loss = vbr.semantic_token_loss

    def spy(decoded, original):
        seen.append([t.detach().clone() for t in original])
        return loss(decoded, original)

    monkeypatch.setattr(vbr, "semantic_token_loss", spy)
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        original = run.decoded_tokens(x)
        edited = run.decoded_tokens(run.editor(x, run.tokens.grids(run.tokens(x))))
    run.step(0, x, torch.zeros(2, dtype=torch.long))
    assert len(seen) == 1 and len(seen[0]) == 2
    assert all((a - b).abs().mean() > 1e-2 * b.abs().mean() for a, b in zip(edited, original))  # P's edit shows
    for got, want in zip(seen[0], original):
        torch.testing.assert_close(got, want)
