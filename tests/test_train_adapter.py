"""`train adapter`'s multi-level loss (issue #21, item 6): the pixel MSE alone already lowers the shallow and deep
CLIP errors, so "every term fell after training" proves nothing about the CLIP terms. This test fails when a term is
detached or left out of the loss the trainer backpropagates."""

from __future__ import annotations

import torch

from .conftest import TINY_CLIP
from .test_train import one_thread  # noqa: F401 (autouse fixture)


def test_the_gradient_of_each_term_reaches_the_adapter(tiny_clip_file):
    """The loss the trainer backpropagates is w·terms, each term differentiable down to A's parameters."""
    from comneck_cli.models.adapter import DecoderAdapter
    from comneck_cli.clip.tower import load_clip
    from comneck_cli.train.adapter import MultiLevel, multilevel_loss

    torch.manual_seed(0)
    levels = MultiLevel(load_clip(TINY_CLIP, None, weights_file=tiny_clip_file).requires_grad_(False), (1, -1))
    adapter = DecoderAdapter(width=8, blocks=1)
    for p in adapter.parameters():  # away from the identity start, whose last layer is zero
        torch.nn.init.normal_(p, std=0.05)
    x = torch.rand(2, 3, 64, 64)
    x_hat = (x + 0.1 * torch.randn_like(x)).clamp(0, 1)
    with torch.no_grad():
        teacher = levels(x)
    params = list(adapter.parameters())
    for index, key in enumerate(("pixel", "shallow", "deep")):
        weights = tuple(2.0 if i == index else 0.0 for i in range(3))
        terms = multilevel_loss(levels, weights, adapter(x_hat), x, teacher)
        total = torch.autograd.grad(terms["loss"], params, retain_graph=True)
        own = torch.autograd.grad(terms[key], params)
        assert all(torch.allclose(t, 2 * o) for t, o in zip(total, own)), key
        assert sum(float(o.abs().sum()) for o in own) > 0, key
