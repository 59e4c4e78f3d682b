"""CoTAM's adapter loss and schedule (issue #21, items 2 and 6): each test fails when the part it names is broken:
the adapter's tokens not added to CLIP's layer-0 tokens, the importance weighting made uniform, the final-embedding
term removed, or the warm-up skipped."""

from __future__ import annotations

import shutil

import pytest
import torch

from .conftest import TINY_CLIP
from .test_train import one_thread  # noqa: F401 (autouse fixture)


@pytest.fixture(scope="module")
def clip(tiny_clip_file):
    from comneck_cli.clip.tower import load_clip

    return load_clip(TINY_CLIP, None, weights_file=tiny_clip_file).requires_grad_(False)


def _adapter(clip, seed=0):
    from comneck_cli.models.adapter import DecoderAdapter

    torch.manual_seed(seed)
    return DecoderAdapter.for_clip(clip, latent_channels=12)


def test_the_adapter_tokens_enter_clip_as_a_sum_with_the_layer0_tokens(clip):
    """What C's first block receives is E(x_hat) + A(y_hat), E being C's embedding after ln_pre."""
    from comneck_cli.models.neck import TransformNeck
    from comneck_cli.train.adapter import CotamLoss

    adapter = _adapter(clip)
    loss = CotamLoss(clip, 0, (0.1, 1.0))
    x_hat, y_hat = torch.rand(2, 3, 64, 64), torch.randn(2, 12, 4, 4)
    seen = []
    hook = clip.visual.transformer.resblocks[0].register_forward_pre_hook(lambda _, args: seen.append(args[0]))
    try:
        loss.levels(adapter(y_hat, loss.embed(x_hat)))
    finally:
        hook.remove()
    a = TransformNeck.forward(adapter, y_hat)
    assert a.shape == (2, 1 + 16, 64) and a.abs().sum() > 0
    assert torch.allclose(seen[0], loss.embed(x_hat) + a, atol=1e-6)
    assert not torch.allclose(seen[0], loss.embed(x_hat), atol=1e-3)


def test_token_weights_follow_the_importance_map():
    """CoTAM's masks.token_mask: bilinear to the token grid, divided by the maximum, class token 1."""
    from comneck_cli.train.adapter import token_weights

    importance = torch.zeros(2, 8, 8)
    importance[0, :4] = 0.5  # top half of image 0 matters, at half the scale
    m = token_weights(importance, (4, 4))
    assert m.shape == (2, 17)
    assert torch.equal(m[:, 0], torch.ones(2))
    assert torch.allclose(m[0, 1:].reshape(4, 4)[:2], torch.ones(2, 4))
    assert torch.allclose(m[0, 1:].reshape(4, 4)[2:], torch.zeros(2, 4))
    assert torch.equal(m[1], torch.ones(17))  # flat map: no preference


def test_the_shallow_term_is_importance_weighted(clip):
    """Tokens of weight 0 get no gradient from the shallow term; with uniform weights they would."""
    from comneck_cli.train.adapter import CotamLoss

    loss = CotamLoss(clip, 0, (0.1, 1.0))
    x, x_hat = torch.rand(2, 3, 64, 64), torch.rand(2, 3, 64, 64)
    teacher = loss.teacher(x)
    m = torch.ones(2, 17)
    m[:, 1:9] = 0  # the top half of the patch tokens does not matter
    tokens = torch.zeros(2, 17, 64, requires_grad=True)

    def adapter(y_hat, embedded):
        return embedded + tokens

    terms = loss(adapter, None, x_hat, m, teacher, final=False)
    (grad,) = torch.autograd.grad(terms["shallow"], tokens)
    assert grad[:, 1:9].abs().sum() == 0 and grad[:, 9:].abs().sum() > 0
    uniform = loss(adapter, None, x_hat, torch.ones(2, 17), teacher, final=False)["shallow"]
    assert terms["shallow"] < uniform


@pytest.mark.parametrize("final", [False, True])
def test_the_loss_is_the_shallow_term_in_warmup_then_both(clip, final):
    """Warm-up: only w_s·shallow reaches A; after it w_s·shallow + w_f·final, the final term's gradient non-zero."""
    from comneck_cli.train.adapter import CotamLoss

    loss = CotamLoss(clip, 0, (0.1, 2.0))
    adapter = _adapter(clip)
    x, x_hat, y_hat = torch.rand(2, 3, 64, 64), torch.rand(2, 3, 64, 64), torch.randn(2, 12, 4, 4)
    teacher = loss.teacher(x)
    params = list(adapter.parameters())
    terms = loss(adapter, y_hat, x_hat, torch.rand(2, 17), teacher, final=final)
    total = torch.autograd.grad(terms["loss"], params, retain_graph=True)
    shallow = torch.autograd.grad(terms["shallow"], params, retain_graph=True)
    last = torch.autograd.grad(terms["final"], params, allow_unused=True)
    assert sum(float(g.abs().sum()) for g in last if g is not None) > 0
    for t, s, f in zip(total, shallow, last):
        expected = 0.1 * s + (2.0 * f if final and f is not None else 0)
        assert torch.allclose(t, expected, atol=1e-7), final


def test_the_trainer_warms_up_on_the_shallow_term_with_importance_weights(vbr_codec_file, tiny_clip_file, photos,
                                                                           tmp_path, monkeypatch):
    """The run passes CoTAM's schedule (shallow only for warmup_epochs, then both) and the guide's importance map
    as token weights to the loss."""
    from comneck_cli.coding.semantic import Guide
    from comneck_cli.clip.tower import load_clip
    from comneck_cli.train import adapter as training

    data = tmp_path / "data"
    data.mkdir()
    for name in ("coffee", "chelsea", "astronaut", "rocket"):
        shutil.copy(photos[name], data / photos[name].name)
    calls, crops = [], []
    forward, reconstruct = training.CotamLoss.forward, training.reconstruct

    def spy(self, adapter, y_hat, x_hat, m, teacher, final):
        calls.append((final, m.detach().clone()))
        return forward(self, adapter, y_hat, x_hat, m, teacher, final)

    def coded(codec, x, *args):
        crops.append(x.clone())
        return reconstruct(codec, x, *args)

    monkeypatch.setattr(training.CotamLoss, "forward", spy)
    monkeypatch.setattr(training, "reconstruct", coded)
    cfg = training.AdapterTrainConfig(codec="mbt2018-mean-vbr", weights=vbr_codec_file, clip_model=TINY_CLIP,
                                      clip_tag="none", clip_weights=tiny_clip_file, rates=(3.0, 3.0),
                                      gain_maps=0.0, warmup_epochs=1.0, steps=4, batch_size=2, data=data, register=None,
                                      output=tmp_path / "a.safetensors", quiet=True, device="cpu",
                                      run_dir=tmp_path / "run")
    result = training.train_adapter(cfg)
    assert cfg.crop == 64 and result.extra["warmup_steps"] == 2  # 4 images, batch 2: 2 steps an epoch
    assert [final for final, _ in calls] == [False, False, True, True]
    guide = Guide(load_clip(TINY_CLIP, None, weights_file=tiny_clip_file))
    for (_, m), x in zip(calls, crops):  # the weights are the guide's map of the crops the codec coded
        images = [x[i].mul(255).round().byte().permute(1, 2, 0).numpy() for i in range(x.shape[0])]
        maps = torch.stack([torch.from_numpy(guide.importance(image)).float() for image in images])
        assert torch.allclose(m, training.token_weights(maps, (4, 4)), atol=1e-5)
        assert not torch.equal(m, torch.ones_like(m))
