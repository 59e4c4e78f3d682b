"""``lapped-pca-vbr`` (issue #34.1): a variable-rate mean-scale hyperprior codec whose training starts at the linear
optimum instead of climbing towards it.

g_a and g_s are each a *linear path* plus CompressAI's nonlinear transform as a *residual branch*:

    g_a(x) = L_a(x) + R_a(x)        L_a: a 32×32 convolution at stride 16 (each latent sees its 16×16 block and
    g_s(y) = L_s(y) + R_s(y)             8 pixels around it: lapped, so the learned codec need not block)

:func:`initialise_pca` sets L_a/L_s to the top M principal components of photo blocks (of x − ½, uncentred, so the
offset is exact), in the centre 16×16 of each kernel, and zeroes the last layer of each residual branch: the codec
then computes the best linear block transform of its width, whose unquantised PSNR is far above what this project's
CPU-trained transforms reach (model card: 37.0 dB at M = 192 against 33.8), and every training step refines it.
The entropy model (hyperprior h_a/h_s, gains, offsets) is CompressAI's ``MeanScaleHyperpriorVbr``, unchanged, but
:func:`initialise_pca` also starts it where statistics already are: h_s's last layer has zero weights and, as bias,
each latent channel's standard deviation and mean over the photos' blocks, so the prior starts as the best
stationary Gaussian per channel (from the PCA eigenvalues) instead of a random function of z, and training only has
to learn what varies over the image. Its reconstruction offsets (QuantABCD) start at zero.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from torch import Tensor, nn

from comneck_cli.codecs._compressai import import_compressai

import_compressai()

from compressai.models.vbr import MeanScaleHyperpriorVbr  # noqa: E402
from compressai.registry import register_model  # noqa: E402

STRIDE = 16  # the hyperprior family's downsampling: one latent vector per 16×16 block
KERNEL = 32  # the linear path's support: the block and half a block around it
PCA_SCALE = 16.0  # latent units per unit of pixel (0..1) coefficient: the range the trained codec's y has


class LinearPlusResidual(nn.Module):
    """``linear(x) + residual(x)``: the residual branch learns what a linear transform cannot."""

    def __init__(self, linear: nn.Module, residual: nn.Module) -> None:
        super().__init__()
        self.linear, self.residual = linear, residual

    def forward(self, x: Tensor) -> Tensor:
        return self.linear(x) + self.residual(x)


@register_model("lapped-pca-vbr")
class LappedPcaVbr(MeanScaleHyperpriorVbr):
    """``MeanScaleHyperpriorVbr`` with a lapped linear path beside g_a and g_s (see the module doc)."""

    def __init__(self, N: int = 192, M: int = 320, **kwargs) -> None:
        super().__init__(N=N, M=M, **kwargs)
        pad = (KERNEL - STRIDE) // 2
        self.g_a = LinearPlusResidual(nn.Conv2d(3, M, KERNEL, STRIDE, pad), self.g_a)
        self.g_s = LinearPlusResidual(nn.ConvTranspose2d(M, 3, KERNEL, STRIDE, pad), self.g_s)


def photo_blocks(images: Sequence[Tensor], limit: int = 200_000, seed: int = 0) -> np.ndarray:
    """(n, 768) float64 rows: the whole 16×16 blocks of (1, 3, H, W) images in [0, 1], minus ½, channels first in
    a row (the layout of a convolution kernel), at most ``limit`` of them drawn at random."""
    rows = []
    for x in images:
        h, w = x.shape[-2] // STRIDE * STRIDE, x.shape[-1] // STRIDE * STRIDE
        blocks = x[0, :, :h, :w].double().reshape(3, h // STRIDE, STRIDE, w // STRIDE, STRIDE)
        rows.append(blocks.permute(1, 3, 0, 2, 4).reshape(-1, 3 * STRIDE * STRIDE).numpy() - 0.5)
    data = np.concatenate(rows)
    if len(data) > limit:
        data = data[np.random.default_rng(seed).choice(len(data), limit, replace=False)]
    return data


def initialise_pca(model: LappedPcaVbr, images: Sequence[Tensor]) -> None:
    """Set the linear paths to the top M principal components of ``images``' blocks and silence the residual
    branches, so ``g_s(g_a(x))`` is exactly that block transform (the module doc)."""
    data = photo_blocks(images)
    m = model.M
    if len(data) < m:
        raise ValueError(f"{len(data)} blocks of 16×16 cannot give {m} principal components; give more photos")
    _, vectors = np.linalg.eigh(data.T @ data / len(data))
    top = np.ascontiguousarray(vectors[:, ::-1][:, :m].T)  # (M, 768), largest first
    y = PCA_SCALE * data @ top.T  # each block's latent vector, as the linear path computes it
    basis = torch.from_numpy(top).float()
    kernel = basis.reshape(m, 3, STRIDE, STRIDE)
    lo, hi = (KERNEL - STRIDE) // 2, (KERNEL + STRIDE) // 2
    with torch.no_grad():
        a, s = model.g_a.linear, model.g_s.linear
        a.weight.zero_()
        a.weight[:, :, lo:hi, lo:hi] = PCA_SCALE * kernel
        a.bias.copy_(-0.5 * PCA_SCALE * kernel.sum(dim=(1, 2, 3)))  # y = scale·Bᵀ(x − ½)
        s.weight.zero_()
        s.weight[:, :, lo:hi, lo:hi] = kernel / PCA_SCALE  # x = B·y/scale + ½
        s.bias.fill_(0.5)
        for branch in (model.g_a.residual, model.g_s.residual):
            last = branch[-1]
            last.weight.zero_()
            last.bias.zero_()
        prior = model.h_s[-1]  # (scales, means) = chunk(h_s(z_hat), 2): constant per channel to begin with
        prior.weight.zero_()
        prior.bias.copy_(torch.from_numpy(np.concatenate([y.std(axis=0), y.mean(axis=0)])).float())
        # Reconstruction offsets start at 0 (plain rounding): a random QuantABCD fed these channels' large
        # deviations would move every nonzero y_hat by whole steps.
        offsets = model.QuantABCD[-1]
        offsets.weight.zero_()
        offsets.bias.zero_()
