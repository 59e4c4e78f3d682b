"""Widen a trained mean-scale hyperprior codec's latent y from M to M' channels, keeping what it computes.

Issue #19: the shipped codec's width M = 192 caps its quality (a linear block transform of width 192 reaches 37 dB
on the validation photos, one of width 320 42.5 dB), and training a wider codec from scratch costs far more than a
CPU gives. Widening keeps everything the narrow codec learned and adds silent channels for training to bring in:

    y  = g_a(x)            new output channels of g_a's last layer: small random weights (they carry signal, so
                           the layers after them get gradients)
    x_hat = g_s(y_hat)     new input channels of g_s's first layer: zero weights, so x_hat is unchanged
    z  = h_a(y)            new input channels of h_a's first layer: zero weights, so z is unchanged
    mu, sigma = h_s(z_hat) the old channels' means and scales unchanged (new hidden units of h_s enter the old
                           outputs through zero weights); the new channels' means 0 and scales at the
                           Gaussian conditional's lower bound, so a new channel near 0 costs almost no bits

Applies to CompressAI's mean-scale hyperprior layout (``mbt2018-mean``, ``mbt2018-mean-vbr``): h_s = deconv(N, M),
deconv(M, 3M/2), conv(3M/2, 2M) with the scales first and the means second in its output.
"""

from __future__ import annotations

import torch
from torch import nn

from comneck_cli.errors import ComneckError

NEW_WEIGHT_SCALE = 0.1  # new incoming weights: this fraction of the layer's existing weights' spread
NEW_SCALE_BIAS = 0.11  # sigma of a new channel: the Gaussian conditional's lower bound (CompressAI's 0.11)


def _check_layout(model: nn.Module, width: int) -> int:
    """The model's M, after checking it has the mean-scale hyperprior layout and that ``width`` > M."""
    try:
        g_a_last, g_s_first, h_a_first = model.g_a[-1], model.g_s[0], model.h_a[0]
        h_s = [model.h_s[i] for i in (0, 2, 4)]
    except (AttributeError, IndexError, TypeError):
        raise ComneckError(f"{type(model).__name__} is not a mean-scale hyperprior codec (g_a, g_s, h_a, h_s as "
                           "CompressAI's mbt2018-mean); only those can be widened", params=("config",)) from None
    m = g_a_last.weight.shape[0]
    shapes_ok = (g_s_first.weight.shape[0] == m and h_a_first.weight.shape[1] == m
                 and h_s[0].weight.shape[1] == m and h_s[1].weight.shape == (m, m * 3 // 2, *h_s[1].weight.shape[2:])
                 and h_s[2].weight.shape[:2] == (2 * m, m * 3 // 2))
    if not shapes_ok:
        raise ComneckError(f"{type(model).__name__}'s layers do not have the mean-scale hyperprior widths of M = {m}; "
                           "only CompressAI's mbt2018-mean layout can be widened", params=("config",))
    if width <= m:
        raise ComneckError(f"`config` M = {width} does not widen the codec's M = {m}; give a larger M",
                           params=("config",))
    return m


def _spread(weight: torch.Tensor) -> float:
    return float(weight.std()) * NEW_WEIGHT_SCALE


@torch.no_grad()
def widen_latent(model: nn.Module, kwargs: dict, width: int, *, seed: int = 0) -> nn.Module:
    """A new codec of ``model``'s class built with ``{**kwargs, "M": width}`` that computes what ``model`` computes:
    the same x_hat from the same x, the same z, the same means and scales for the old channels of y.

    The new weights are drawn from a generator seeded with ``seed`` (the same widening every time).
    """
    m = _check_layout(model, width)
    wide = type(model)(**{**kwargs, "M": width})
    old, new = model.state_dict(), wide.state_dict()
    for name, value in old.items():
        if name in new and new[name].shape == value.shape:
            new[name].copy_(value)
    generator = torch.Generator().manual_seed(seed)

    def random_like(t: torch.Tensor, spread: float) -> torch.Tensor:
        return torch.randn(t.shape, generator=generator, dtype=t.dtype) * spread

    g_a = f"g_a.{len(model.g_a) - 1}"
    hidden = m * 3 // 2

    # g_a's last conv (out = M): old rows kept, new rows small random, new biases 0
    new[f"{g_a}.weight"].zero_()[:m] = old[f"{g_a}.weight"]
    new[f"{g_a}.weight"][m:] = random_like(new[f"{g_a}.weight"][m:], _spread(old[f"{g_a}.weight"]))
    new[f"{g_a}.bias"].zero_()[:m] = old[f"{g_a}.bias"]
    # g_s's first deconv (weight: in = M, out = N) and h_a's first conv (weight: out = N, in = M): new inputs silent
    new["g_s.0.weight"].zero_()[:m] = old["g_s.0.weight"]
    new["h_a.0.weight"].zero_()[:, :m] = old["h_a.0.weight"]
    # h_s.0 deconv (N -> M) and h_s.2 deconv (M -> 3M/2): new units small random, fed to old outputs through zeros
    new["h_s.0.weight"].zero_()[:, :m] = old["h_s.0.weight"]
    new["h_s.0.weight"][:, m:] = random_like(new["h_s.0.weight"][:, m:], _spread(old["h_s.0.weight"]))
    new["h_s.0.bias"].zero_()[:m] = old["h_s.0.bias"]
    new["h_s.2.weight"].zero_()[:m, :hidden] = old["h_s.2.weight"]
    new["h_s.2.weight"][:, hidden:] = random_like(new["h_s.2.weight"][:, hidden:], _spread(old["h_s.2.weight"]))
    new["h_s.2.bias"].zero_()[:hidden] = old["h_s.2.bias"]
    # h_s.4 conv (3M/2 -> 2M): scales of the old channels at [0, M), means at [M', M' + M); new ones constant
    new["h_s.4.weight"].zero_()[:m, :hidden] = old["h_s.4.weight"][:m]
    new["h_s.4.weight"][width : width + m, :hidden] = old["h_s.4.weight"][m:]
    new["h_s.4.bias"].zero_()[:m] = old["h_s.4.bias"][:m]
    new["h_s.4.bias"][width : width + m] = old["h_s.4.bias"][m:]
    new["h_s.4.bias"][m:width] = NEW_SCALE_BIAS
    wide.load_state_dict(new)
    return wide
