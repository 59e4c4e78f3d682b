"""benchmarks/autoencoder_ceiling.py's linear reference (issue #19): the best linear block transform of width M."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import autoencoder_ceiling  # noqa: E402


def _image(blocks: np.ndarray, rows: int, cols: int) -> torch.Tensor:
    """(rows·cols, 768) blocks -> (1, 3, 16·rows, 16·cols), inverting the script's block order."""
    image = blocks.reshape(rows, cols, 16, 16, 3).transpose(0, 2, 1, 3, 4).reshape(16 * rows, 16 * cols, 3)
    return torch.from_numpy(image).permute(2, 0, 1)[None].float()


def test_blocks_in_a_two_dimensional_subspace_need_exactly_two_components():
    """Blocks = mean + a·u + b·v: width 2 restores them (to 8-bit rounding), width 1 cannot, and the PSNR grows
    with the width; blocks are cut at the codec's 16-pixel stride, so a wrong block order would not find the plane."""
    rng = np.random.default_rng(0)
    u, v = rng.normal(size=(2, 768))
    coefficients = rng.normal(size=(2, 48, 1))
    blocks = np.clip(0.5 + 0.02 * (coefficients[0] * u + coefficients[1] * v), 0, 1)
    blocks = np.round(blocks * 255) / 255
    images = [("a", _image(blocks[:24], 4, 6)), ("b", _image(blocks[24:], 6, 4))]
    reference = autoencoder_ceiling.linear_reference(images, [1, 2, 16])
    assert reference[1] < 45 < reference[2]
    assert reference[2] > 50 or math.isinf(reference[2])
    assert reference[16] >= reference[2] - 1e-6


def test_a_photo_needs_more_width_for_more_psnr(photos):
    """On a real photo the reference rises with M (monotone) and is finite below full width."""
    from PIL import Image

    x = torch.from_numpy(np.array(Image.open(photos["astronaut"]).convert("RGB").resize((256, 256)))).permute(
        2, 0, 1)[None].float().div(255)
    reference = autoencoder_ceiling.linear_reference([("astronaut", x)], [16, 96, 192])
    assert 15 < reference[16] < reference[96] < reference[192] < 80
