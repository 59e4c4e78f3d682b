"""Spatially varying gains in training: the variable-rate codec learns the gain maps ``--semantic`` codes with.

``comneck encode --semantic`` codes y with a gain that varies over the latent grid (``coding.semantic.gain_map``,
SPEC §7.1): g(i, j) = clamp(g_R · 2^(S·(m(i, j) − m̄)), g_min, g_max), m a 4-bit importance map on cells of 2×2
positions. A codec trained with one gain per image has never seen neighbouring positions at different steps. As
CoTAM trains on random quality masks, a share of the training steps (``fraction``) draws, for each image of the
batch, an importance map m and a strength S ~ U[0, S_max], and codes the image at the gain map the encoder would
write: the map goes through the record's quantiser (``semantic.quantise``) and ``semantic.gain_map`` itself, so
training sees exactly the gains a record can carry. Maps are

- ``random``: smooth random fields (uniform noise on a coarse grid of 2–6 cells a side, bilinearly upsampled,
  stretched to [0, 1]), so the codec meets every shape of map;
- ``clip``: the importance the encoder would compute (``semantic.Guide.importance``: a shallow CLIP block's
  class-token attention) on the training CLIP;
- ``both``: each image draws one of the two.

Distortion is weighed where the bits go: each pixel's λ is the λ of its position's gain (:func:`lambda_for_gain`,
log λ interpolated in log g between the levels' (g_k, λ_k), which at a constant gain is the rate's own λ), so the
loss is R + 255²·mean(λ(g_p)·(x − x̂)²), the rate-distortion trade-off each position's step implies. The draws are
functions of (seed, step), so a resumed run draws the same.
"""

from __future__ import annotations

import random
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from comneck_cli.coding.semantic import DEFAULT_STRENGTH, Y_STRIDE, gain_map, quantise
from comneck_cli.errors import UsageError

if TYPE_CHECKING:
    from comneck_cli.coding.semantic import Guide

SOURCES = ("random", "clip", "both")
DEFAULT_FRACTION = 0.5
DEFAULT_MAX_STRENGTH = 2 * DEFAULT_STRENGTH  # the encoder's default sits mid-range
_STREAM = 0x6A1  # keeps the maps' draws apart from the rate's (same seed and step)


def check_settings(fraction: float, max_strength: float, source: str, variable_rate: bool,
                   has_clip: bool) -> None:
    """Refuse settings no run could use (typed :class:`UsageError` naming the parameters)."""
    if not 0 <= fraction <= 1:
        raise UsageError(f"`gain_maps` is the share of steps with a gain map, in [0, 1], not {fraction:g}",
                         params=("gain_maps",))
    if fraction and not variable_rate:
        raise UsageError("`gain_maps` needs a variable-rate codec: a fixed-rate codec has no gain to vary",
                         params=("gain_maps",))
    if not 0 < max_strength <= 65.535:
        raise UsageError(f"`gain_map_strength` must be in (0, 65.535] (what a record stores), not {max_strength:g}",
                         params=("gain_map_strength",))
    if source not in SOURCES:
        raise UsageError(f"`gain_map_source` is one of {', '.join(SOURCES)}, not {source!r}",
                         params=("gain_map_source",))
    if source != "random" and not has_clip:
        raise UsageError(f"`gain_map_source` {source} reads CLIP attention, and this run loads no CLIP; use random",
                         params=("gain_map_source",))


def lambda_for_gain(model: nn.Module, gain: Tensor) -> Tensor:
    """λ at gain g, elementwise: log λ linear in log g between the levels' (|Gain_k|, λ_k), clamped to the ends.

    ``rate_gain`` and ``vbr.rate_lambda`` both interpolate in log space over the rate R with the same knots, so at
    the gain of rate R this is R's λ."""
    log_g = model.Gain.detach().double().abs().log().flatten().to(gain.device)
    log_l = torch.tensor(list(model.lmbda), dtype=torch.float64, device=gain.device).log()
    at = gain.double().log().clamp(log_g[0], log_g[-1])
    high = torch.searchsorted(log_g, at.contiguous()).clamp(1, len(log_g) - 1)
    low = high - 1
    frac = (at - log_g[low]) / (log_g[high] - log_g[low])
    return (log_l[low] + frac * (log_l[high] - log_l[low])).exp().float()


def smooth_field(generator: torch.Generator, grid: tuple[int, int]) -> np.ndarray:
    """A random smooth map in [0, 1] on ``grid``: uniform noise on 2–6 cells a side, bilinearly upsampled."""
    cells = [int(torch.randint(2, 7, (1,), generator=generator)) for _ in range(2)]
    coarse = torch.rand(1, 1, *cells, generator=generator, dtype=torch.float64)
    field = F.interpolate(coarse, size=grid, mode="bilinear", align_corners=True)[0, 0]
    low, high = field.min(), field.max()
    return ((field - low) / (high - low)).numpy() if high > low else np.zeros(grid)


MASK_MODES = ("uniform", "patch", "gradient")  # CoTAM's RandomMaskProvider modes, drawn uniformly
MASK_LEVELS = 10  # CoTAM's quality levels 0..9


def quality_mask(generator: torch.Generator, grid: tuple[int, int]) -> tuple[str, np.ndarray]:
    """CoTAM's random quality mask (``masks.RandomMaskProvider``, jmliu206/CoTAM) on ``grid``: (mode, levels / 9 in
    [0, 1]). ``uniform``: one level everywhere; ``patch``: independent levels on squares of 1, 2 or 4 cells;
    ``gradient``: a ramp over all levels along x, y or one of two diagonals."""
    pick = lambda n: int(torch.randint(n, (1,), generator=generator))  # noqa: E731
    mode, (rows, cols), top = MASK_MODES[pick(len(MASK_MODES))], grid, MASK_LEVELS - 1
    if mode == "uniform":
        levels = np.full(grid, pick(MASK_LEVELS))
    elif mode == "patch":
        size = (1, 2, 4)[pick(3)]
        coarse = torch.randint(MASK_LEVELS, (-(-rows // size), -(-cols // size)), generator=generator).numpy()
        levels = coarse.repeat(size, axis=0).repeat(size, axis=1)[:rows, :cols]
    else:
        ramp_y, ramp_x = np.meshgrid(np.linspace(0, 1, rows), np.linspace(0, 1, cols), indexing="ij")
        levels = np.rint((ramp_x, ramp_y, (ramp_x + ramp_y) / 2, (1 - ramp_x + ramp_y) / 2)[pick(4)] * top)
    return mode, levels.astype(np.float64) / top


class GainMaps:
    """Draws, for a training step, the gain maps (B, 1, h, w) of its images, or None for a step at one gain.

    ``fraction``: share of steps with maps; ``max_strength``: S_max; ``source``: one of :data:`SOURCES`;
    ``guide``: the CLIP guidance for ``clip``/``both`` maps."""

    def __init__(self, model: nn.Module, seed: int, *, fraction: float = DEFAULT_FRACTION,
                 max_strength: float = DEFAULT_MAX_STRENGTH, source: str = "random", guide: Guide | None = None):
        self.model, self.seed, self.fraction, self.max_strength = model, seed, fraction, max_strength
        self.source, self.guide = source, guide

    def __call__(self, step: int, x: Tensor, rate: float) -> Tensor | None:
        """The gains of batch ``x`` (B, 3, H, W in [0, 1], H and W multiples of 64) at rate R, or None."""
        draw = random.Random((self.seed * 1_000_003 + step) * _STREAM)
        if self.fraction == 0 or draw.random() >= self.fraction:
            return None
        generator = torch.Generator().manual_seed(draw.getrandbits(62))
        height, width = x.shape[-2:]
        grid = (height // Y_STRIDE, width // Y_STRIDE)
        gains = []
        for image in x:
            use_clip = self.source == "clip" or (self.source == "both" and draw.random() < 0.5)
            if use_clip:
                pixels = image.detach().clamp(0, 1).mul(255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
                importance = self.guide.importance(pixels)
            else:
                importance = smooth_field(generator, grid)
            imap = quantise(importance, height, width, draw.uniform(0, self.max_strength))
            gains.append(gain_map(self.model, rate, imap, grid))
        return torch.cat(gains).to(x.device)

    def pixel_weights(self, gains: Tensor, rate: float) -> Tensor:
        """(B, 1, H, W): each pixel's λ(g) relative to the rate's own λ, so R + λ_R·255²·mean(w·(x − x̂)²) is the
        loss of every position at its own gain."""
        from comneck_cli.codecs import rate_gain

        reference = lambda_for_gain(self.model, rate_gain(self.model, rate).to(gains.device))
        weights = lambda_for_gain(self.model, gains) / reference
        return weights.repeat_interleave(Y_STRIDE, dim=2).repeat_interleave(Y_STRIDE, dim=3)
