"""Codec families: how each kind of CompressAI model turns y into entropy-coded strings and strings back into
``y_hat``.

CompressAI's own ``decompress`` returns only ``x_hat`` (its issue 329), and the transform-neck needs ``y_hat``
without running ``g_s``, so the families decode the latents themselves through the model's entropy models.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from comneck_cli.codecs import rans


class Family:
    """How one kind of CompressAI model maps x to strings and strings to ``y_hat``.

    ``compress`` returns the strings in record order and the encoder's own ``y_hat``;
    ``decompress`` must rebuild exactly that ``y_hat`` from the strings alone.
    """

    variable_rate = False

    def compress(self, model: nn.Module, y: Tensor, gain: Tensor | None = None) -> tuple[list[bytes], Tensor]:
        raise NotImplementedError

    def decompress(self, model: nn.Module, strings: list[bytes], grid: tuple[int, int],
                   gain: Tensor | None = None) -> Tensor:
        raise NotImplementedError

    def string_count(self, model: nn.Module) -> int:
        return 2

    @staticmethod
    def side_info(model: nn.Module, z: Tensor) -> tuple[bytes, Tensor]:
        """Entropy-code z with the factorized prior; the encoder uses the *decoded* z_hat, as the decoder will."""
        z_strings = model.entropy_bottleneck.compress(z)
        return z_strings[0], model.entropy_bottleneck.decompress(z_strings, z.shape[-2:])

    @staticmethod
    def decode_side_info(model: nn.Module, string: bytes, grid: tuple[int, int]) -> Tensor:
        return model.entropy_bottleneck.decompress([string], (grid[0] // 4, grid[1] // 4))


class ScaleHyperprior(Family):
    """bmshj2018-hyperprior: zero-mean Gaussian, scales from h_s(z_hat); y_hat = round(y)."""

    def compress(self, model, y, gain=None):
        z_string, z_hat = self.side_info(model, model.h_a(torch.abs(y)))
        indexes = model.gaussian_conditional.build_indexes(model.h_s(z_hat))
        y_string = model.gaussian_conditional.compress(y, indexes)[0]
        return [y_string, z_string], model.gaussian_conditional.quantize(y, "dequantize")

    def decompress(self, model, strings, grid, gain=None):
        z_hat = self.decode_side_info(model, strings[1], grid)
        indexes = model.gaussian_conditional.build_indexes(model.h_s(z_hat))
        return model.gaussian_conditional.decompress([strings[0]], indexes, z_hat.dtype)


class MeanScaleHyperprior(Family):
    """mbt2018-mean: Gaussian with means and scales from h_s(z_hat); y_hat = round(y - mu) + mu."""

    def compress(self, model, y, gain=None):
        z_string, z_hat = self.side_info(model, model.h_a(y))
        scales, means = model.h_s(z_hat).chunk(2, 1)
        indexes = model.gaussian_conditional.build_indexes(scales)
        y_string = model.gaussian_conditional.compress(y, indexes, means=means)[0]
        return [y_string, z_string], model.gaussian_conditional.quantize(y, "dequantize", means)

    def decompress(self, model, strings, grid, gain=None):
        z_hat = self.decode_side_info(model, strings[1], grid)
        scales, means = model.h_s(z_hat).chunk(2, 1)
        indexes = model.gaussian_conditional.build_indexes(scales)
        return model.gaussian_conditional.decompress([strings[0]], indexes, means=means)


class Autoregressive(Family):
    """mbt2018 and cheng2020: a 5×5 masked context model decoded position by position on the CPU."""

    kernel = 5

    def compress(self, model, y, gain=None):
        z_string, z_hat = self.side_info(model, model.h_a(y))
        params = model.h_s(z_hat)
        pad = (self.kernel - 1) // 2
        y_hat = F.pad(y, (pad, pad, pad, pad))  # _compress_ar writes y_hat in place as it codes
        y_string = model._compress_ar(y_hat, params, y.shape[2], y.shape[3], self.kernel, pad)
        return [y_string, z_string], F.pad(y_hat, (-pad, -pad, -pad, -pad))

    def decompress(self, model, strings, grid, gain=None):
        """CompressAI's ``_decompress_ar`` step for step, decoding through comneck's bounded rANS stream
        (:mod:`comneck_cli.codecs.rans`) instead of ``compressai.ans.RansDecoder``: the same y_hat, bit for bit."""
        z_hat = self.decode_side_info(model, strings[1], grid)
        params = model.h_s(z_hat)
        pad = (self.kernel - 1) // 2
        y_hat = torch.zeros((1, model.M, grid[0] + 2 * pad, grid[1] + 2 * pad))
        gc = model.gaussian_conditional
        tables = rans.tables_of(gc._quantized_cdf, gc._cdf_length, gc._offset)
        stream = rans.Stream(strings[0])
        for h in range(grid[0]):
            for w in range(grid[1]):
                # the 5×5 masked convolution only where it is needed, and 1×1 entropy parameters at (h, w)
                y_crop = y_hat[:, :, h : h + self.kernel, w : w + self.kernel]
                ctx_p = F.conv2d(y_crop, model.context_prediction.weight, bias=model.context_prediction.bias)
                p = params[:, :, h : h + 1, w : w + 1]
                scales_hat, means_hat = model.entropy_parameters(torch.cat((p, ctx_p), dim=1)).chunk(2, 1)
                symbols = rans.decode(stream, gc.build_indexes(scales_hat), tables)
                rv = torch.from_numpy(symbols.astype("float32")).reshape(1, -1, 1, 1)
                y_hat[:, :, h + pad : h + pad + 1, w + pad : w + pad + 1] = gc.dequantize(rv, means_hat)
        return F.pad(y_hat, (-pad, -pad, -pad, -pad))


class LatentCodecModel(Family):
    """ELIC (SimpleVAECompressionModel): uneven channel groups, each coded in two checkerboard passes.

    Its latent codec yields one string per (group, pass), then z: 5 groups give 11 strings.
    """

    def compress(self, model, y, gain=None):
        out = model.latent_codec.compress(y)
        return [s[0] for s in out["strings"]], out["y_hat"]

    def decompress(self, model, strings, grid, gain=None):
        shape = {
            "y": [torch.Size([g, *grid]) for g in model.groups],
            "hyper": torch.Size([grid[0] // 4, grid[1] // 4]),
        }
        return model.latent_codec.decompress([[s] for s in strings], shape)["y_hat"]

    def string_count(self, model):
        return 2 * len(model.groups) + 1


class VariableRate(Family):
    """mbt2018-mean-vbr (Kamisli et al., DCC 2024): one model for every rate.

    A gain g (the inverse quantisation step) scales the centred latent before rounding:
    q = round(g·y - g·mu), coded with scales g·sigma; ``y_hat = sign(q)·(|q| + offset)/g + mu``, where a small
    network (``QuantABCD``) predicts the reconstruction offset from (g·sigma, g) and the offset is zero where
    q = 0. g may be a scalar or a map broadcastable over y (1, 1, h, w) for spatially varying steps.
    Encoder and decoder both derive y_hat from q with :meth:`dequantize`, so they agree bit for bit.
    """

    variable_rate = True

    def compress(self, model, y, gain=None):
        gain = _gain_tensor(gain)
        z_string, z_hat = self.side_info(model, model.h_a(y))
        scales, means = model.h_s(z_hat).chunk(2, 1)
        gc = model.gaussian_conditional
        indexes = gc.build_indexes(scales * gain)
        y_string = gc.compress(y * gain, indexes, means=means * gain)[0]
        q = torch.round(y * gain - means * gain)  # the symbols gc.compress just wrote
        return [y_string, z_string], self.dequantize(model, q, scales, means, gain)

    def decompress(self, model, strings, grid, gain=None):
        gain = _gain_tensor(gain)
        z_hat = self.decode_side_info(model, strings[1], grid)
        scales, means = model.h_s(z_hat).chunk(2, 1)
        gc = model.gaussian_conditional
        q = gc.decompress([strings[0]], gc.build_indexes(scales * gain), z_hat.dtype)
        return self.dequantize(model, q, scales, means, gain)

    @staticmethod
    def dequantize(model: nn.Module, q: Tensor, scales: Tensor, means: Tensor, gain: Tensor) -> Tensor:
        """Integer symbols q -> y_hat, with the learned quantisation-reconstruction offsets."""
        stdev = model.gaussian_conditional.lower_bound_scale(scales * gain)
        stdev_and_gain = torch.stack((stdev, gain.expand_as(stdev)), dim=4)
        offsets = -model.QuantABCD(stdev_and_gain).squeeze(4)
        offsets = torch.where(q.abs() < 1e-4, torch.zeros_like(offsets), offsets)
        return torch.sign(q) * (q.abs() + offsets) / gain + means


def _gain_tensor(gain: Tensor | float | None) -> Tensor:
    if gain is None:
        raise ValueError("a variable-rate codec needs a gain")
    gain = torch.as_tensor(gain, dtype=torch.float32)
    return gain.reshape(1, 1, 1, 1) if gain.numel() == 1 else gain


def rate_gain(model: nn.Module, rate: float) -> Tensor:
    """Rate parameter R in [1, L] (L = the model's trained levels; R = q reproduces level q) -> gain.

    Between levels the gain is interpolated linearly in log space, so rate (and bpp) move smoothly. Computed in
    float64 and rounded once to float32, so encoder and decoder derive the same gain from the stored R.
    """
    gains = model.Gain.detach().double().abs().log()
    position = min(max(float(rate) - 1.0, 0.0), len(gains) - 1.0)
    low = int(position)
    high = min(low + 1, len(gains) - 1)
    frac = position - low
    return torch.exp(gains[low] * (1 - frac) + gains[high] * frac).float().reshape(1)

