"""The codec's training-time latent path: x -> g_a -> y -> (y_hat, likelihoods), per codec family.

CompressAI's ``forward`` returns ``x_hat`` and the likelihoods but not ``y_hat``, which the transform-neck
T needs, and it runs every part in one dtype. These functions repeat each family's ``forward`` step by
step (same modules, same order of random draws, so ``quantizer="noise"`` reproduces ``model(x)`` bit for
bit) and return ``y_hat`` too. ``g_a`` runs under the caller's autocast; the entropy models (``h_a``,
``h_s``, context models, likelihoods) always run in float32, because rates computed in bfloat16 are
too coarse to train on.

Quantisation of ``y`` (what ``g_s`` and T see):

- ``"noise"``: CompressAI's convention for training codecs, y + U(-½, ½) (ELIC uses its own
  straight-through rounding here, as its latent codec is built with ``quantizer="ste"``);
- ``"ste"``: straight-through rounding around the predicted means where the family has means,
  ``round(y - mu) + mu`` forward and identity backward: the y_hat the entropy coder will produce.

Rates always come from the noisy proxy in training mode, as in CompressAI. In eval mode every family
rounds, and :func:`frozen_latents` returns exactly the ``y_hat`` that ``Codec.compress`` writes (for the
autoregressive family it runs the serial entropy coder, since its means depend on decoded neighbours).
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor, nn

from comneck_cli.codecs._compressai import import_compressai
from comneck_cli.codecs import (RATE_STEPS, Autoregressive, Family, LatentCodecModel, MeanScaleHyperprior, ScaleHyperprior,
                      VariableRate)

import_compressai()  # the light import (no point-cloud modules) before compressai.ops
from compressai.ops import quantize_ste  # noqa: E402

QUANTIZERS = ("noise", "ste")


@dataclass
class Latents:
    """``y_hat`` as g_s and T see it, and the likelihoods of ``y_hat`` and ``z_hat`` (for the rate R)."""

    y_hat: Tensor
    likelihoods: dict[str, Tensor]


def _fp32() -> AbstractContextManager:
    """Turn autocast off for the entropy models (a no-op context when none is active)."""
    for device_type in ("cuda", "cpu"):
        if torch.is_autocast_enabled(device_type):
            return torch.autocast(device_type, enabled=False)
    return nullcontext()


def _round(y: Tensor, means: Tensor | None, quantizer: str, training: bool) -> Tensor | None:
    """STE-rounded y_hat (mean-aware), or None to keep the entropy model's own (noise) output."""
    if quantizer != "ste" and training:
        return None
    return quantize_ste(y) if means is None else quantize_ste(y - means) + means


def _scale_hyperprior(model: nn.Module, y: Tensor, quantizer: str) -> Latents:
    """bmshj2018-hyperprior: z = h_a(|y|), scales = h_s(z_hat), zero-mean Gaussian."""
    z_hat, z_lik = model.entropy_bottleneck(model.h_a(torch.abs(y)))
    y_noisy, y_lik = model.gaussian_conditional(y, model.h_s(z_hat))
    y_hat = _round(y, None, quantizer, model.training)
    return Latents(y_noisy if y_hat is None else y_hat, {"y": y_lik, "z": z_lik})


def _mean_scale(model: nn.Module, y: Tensor, quantizer: str) -> Latents:
    """mbt2018-mean: scales and means from h_s(z_hat); eval-mode y_hat = round(y - mu) + mu."""
    z_hat, z_lik = model.entropy_bottleneck(model.h_a(y))
    scales, means = model.h_s(z_hat).chunk(2, 1)
    y_noisy, y_lik = model.gaussian_conditional(y, scales, means=means)
    y_hat = _round(y, means, quantizer, model.training)
    return Latents(y_noisy if y_hat is None else y_hat, {"y": y_lik, "z": z_lik})


def _autoregressive(model: nn.Module, y: Tensor, quantizer: str) -> Latents:
    """mbt2018 / cheng2020: a masked context model over y_hat adds to the hyperprior's parameters.

    With ``"ste"`` the context is ``round(y)`` and y_hat is rounded around the means predicted from it:
    a parallel stand-in for the serial decoder, whose context is the mean-aware y_hat itself.
    """
    z_hat, z_lik = model.entropy_bottleneck(model.h_a(y))
    params = model.h_s(z_hat)
    gc = model.gaussian_conditional
    context = gc.quantize(y, "noise" if model.training else "dequantize")
    if quantizer == "ste":
        context = quantize_ste(y)
    gaussian = model.entropy_parameters(torch.cat((params, model.context_prediction(context)), dim=1))
    scales, means = gaussian.chunk(2, 1)
    _, y_lik = gc(y, scales, means=means)
    y_hat = _round(y, means, quantizer, model.training) if quantizer == "ste" else context
    return Latents(y_hat, {"y": y_lik, "z": z_lik})


def _latent_codec(model: nn.Module, y: Tensor, quantizer: str) -> Latents:
    """ELIC: the model's latent codec (hyperprior + channel groups + checkerboard) returns y_hat itself.

    It always rounds straight-through around its means, so both quantizers give the same y_hat.
    """
    out = model.latent_codec(y)
    return Latents(out["y_hat"], dict(out["likelihoods"]))


# Family type -> its latent path; a family missing here cannot be trained.
LATENT_PATHS: dict[type[Family], Callable[[nn.Module, Tensor, str], Latents]] = {
    ScaleHyperprior: _scale_hyperprior,
    MeanScaleHyperprior: _mean_scale,
    Autoregressive: _autoregressive,
    LatentCodecModel: _latent_codec,
}

# Families whose eval-mode latent path already equals the entropy coder's y_hat (no serial decoding).
_EXACT_IN_EVAL = (ScaleHyperprior, MeanScaleHyperprior, LatentCodecModel)


def latent_path(model: nn.Module, family: Family, x: Tensor, quantizer: str = "ste") -> Latents:
    """x (B, 3, H, W) in [0, 1], H and W multiples of 64 -> :class:`Latents`.

    ``g_a`` runs under whatever autocast the caller set; everything after it in float32.
    """
    if quantizer not in QUANTIZERS:
        raise ValueError(f"unknown quantizer {quantizer!r}")
    y = model.g_a(x).float()
    with _fp32():
        return LATENT_PATHS[type(family)](model, y, quantizer)


@torch.no_grad()
def frozen_latents(model: nn.Module, family: Family, x: Tensor, gain: Tensor | None = None) -> Tensor:
    """The exact y_hat a frozen codec (eval mode) writes for x: equal to ``Codec.compress(x)[1]``.

    The autoregressive family needs its entropy tables (``model.update()``) and codes image by image; a
    variable-rate codec needs the gain of the rate it codes at (``codecs.rate_gain``).
    """
    if isinstance(family, _EXACT_IN_EVAL):
        return latent_path(model, family, x).y_hat
    if isinstance(family, VariableRate):
        if gain is None:
            raise ValueError("a variable-rate codec's y_hat depends on its rate: pass the rate's gain")
        return variable_rate_path(model, x, gain).y_hat
    y = model.g_a(x).float()
    where = next(model.h_s.parameters()).device
    with _fp32():
        return torch.cat([family.compress(model, y[i : i + 1].to(where))[1] for i in range(y.shape[0])]).to(x.device)


def rate_bpp(likelihoods: dict[str, Tensor], num_pixels: int) -> Tensor:
    """R in bits per pixel: -log2 of all likelihoods over the batch's pixels (CompressAI's ``bpp_loss``)."""
    import math

    return sum(torch.log(lik).sum() for lik in likelihoods.values()) / (-math.log(2) * num_pixels)


# ---------------------------------------------------------------------------------------------- variable rate
def rate_for_step(seed: int, step: int, low: float, high: float) -> float:
    """The rate R a variable-rate training step uses: uniform over [low, high], a function of (seed, step) only
    (a resumed run draws the same), snapped to the 1/1000 grid records store."""
    import random

    rate = random.Random(seed * 1_000_003 + step).uniform(low, high)
    return round(rate * RATE_STEPS) / RATE_STEPS


def variable_rate_path(model: nn.Module, x: Tensor, gain: Tensor) -> Latents:
    """mbt2018-mean-vbr at any gain g (``codecs.rate_gain``; per image, or a map (B, 1, h, w) over y's grid as
    ``--semantic`` codes with): x -> (y_hat, likelihoods of g·y and z_hat).

    Training mode is CompressAI's ``stage=2`` path with the gain given instead of a level's (its ``forward``
    ignores ``inputscale`` while training): z_hat rounded straight-through around the bottleneck's medians,
    q = sign(g(y - mu))·round_ste(|g(y - mu)|) with the learned reconstruction offsets, y_hat = q/g + mu, and
    noisy likelihoods of g·y under scales g·sigma. Eval mode (frozen codec) rounds, and y_hat is exactly what
    ``Codec.code`` writes at that gain (``VariableRate.dequantize`` of the coded symbols).
    """
    gain = gain.to(x.device, torch.float32)
    if gain.dim() != 4:  # one gain per image; a map (B, 1, h, w) varies over the latent grid
        gain = gain.reshape(-1, 1, 1, 1)
    y = model.g_a(x).float()
    with _fp32():
        z = model.h_a(y)
        z_hat, z_lik = model.entropy_bottleneck(z)
        if model.training:
            medians = model.entropy_bottleneck._get_medians()
            z_hat = quantize_ste(z - medians) + medians
        scales, means = model.h_s(z_hat).chunk(2, 1)
        _, y_lik = model.gaussian_conditional(y * gain, scales * gain, means=means * gain)
        if not model.training:
            q = torch.round(y * gain - means * gain)  # the symbols VariableRate.compress codes
            return Latents(VariableRate.dequantize(model, q, scales, means, gain), {"y": y_lik, "z": z_lik})
        centred = (y - means) * gain
        signs = torch.sign(centred).detach()
        q_abs = quantize_ste(torch.abs(centred))  # identity backward, also where q rounds to zero
        stdev = model.gaussian_conditional.lower_bound_scale(scales * gain)
        offsets = -model.QuantABCD(torch.stack((stdev, gain.expand_as(stdev).detach()), dim=4)).squeeze(4)
        offsets = torch.where(q_abs.detach() < 1e-4, torch.zeros_like(offsets), offsets)
        return Latents(signs * (q_abs + offsets) / gain + means, {"y": y_lik, "z": z_lik})
