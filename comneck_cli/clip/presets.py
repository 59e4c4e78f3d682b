"""What each MLLM family reads from the CLIP visual tower, as one named preset per family.

``comneck features --for FAMILY`` picks the tower, resolution, preprocessing and tensor; the tensor is then
exactly what that family's projector takes. Hidden-state layers use Hugging Face's numbering
(``hidden_states[0]`` after ``pre_layrnorm``/``ln_pre``, ``hidden_states[i]`` the output of block i), which is
how the families' own code selects them (``tests/test_presets.py`` checks each against ``transformers``).

| family            | tower            | tensor                                                   | shape      |
|-------------------|------------------|----------------------------------------------------------|------------|
| llava, shikra     | ViT-L/14 @ 224   | hidden state -2 (block 23 of 24), before ln_post, no CLS | 256 × 1024 |
| llava-1.5         | ViT-L/14 @ 336   | the same, after padding the image to a square (mean colour) | 576 × 1024 |
| honeybee          | ViT-L/14 @ 224   | hidden state -1 (last block), before ln_post, no CLS     | 256 × 1024 |
| llama-adapter     | ViT-L/14 @ 224   | all 257 tokens after ln_post and the projection          | 257 × 768  |
| clip-embedding    | ViT-L/14 @ 224   | the projected CLS embedding (V2L-Tokenizer style)        | 768        |
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from comneck_cli.errors import ComneckError

if TYPE_CHECKING:  # the CLI imports this module for its choices: keep it free of numpy and torch
    import numpy as np


@dataclass(frozen=True)
class Preset:
    """One family's tower (open_clip name and weights tag), selection and preprocessing."""

    name: str
    clip_model: str
    clip_tag: str
    layer: int
    select: str
    pad_to_square: bool
    shape: str


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset("llava", "ViT-L-14", "openai", -2, "patch", False, "256×1024"),
        Preset("shikra", "ViT-L-14", "openai", -2, "patch", False, "256×1024"),
        Preset("llava-1.5", "ViT-L-14-336", "openai", -2, "patch", True, "576×1024"),
        Preset("honeybee", "ViT-L-14", "openai", -1, "patch", False, "256×1024"),
        Preset("llama-adapter", "ViT-L-14", "openai", -1, "projected", False, "257×768"),
        Preset("clip-embedding", "ViT-L-14", "openai", -1, "pooled", False, "768"),
    )
}


def get_preset(name: str) -> Preset:
    try:
        return PRESETS[name]
    except KeyError:
        raise ComneckError(f"unknown MLLM family {name!r}; use one of {', '.join(PRESETS)}") from None


def expand_to_square(image: "np.ndarray", fill: tuple[int, int, int]) -> "np.ndarray":
    """LLaVA-1.5's ``expand2square``: centre the image on a square canvas of the CLIP mean colour.

    LLaVA pastes at ``((side - w) // 2, 0)`` or ``(0, (side - h) // 2)``; the same offsets here, so the
    features match what LLaVA-1.5 computes pixel for pixel.
    """
    height, width = image.shape[:2]
    if height == width:
        return image
    side = max(height, width)
    import numpy as np

    canvas = np.empty((side, side, 3), dtype=image.dtype)
    canvas[...] = np.asarray(fill, dtype=image.dtype)
    top, left = (side - height) // 2, (side - width) // 2
    canvas[top : top + height, left : left + width] = image
    return canvas


def mean_colour(image_mean: tuple[float, ...]) -> tuple[int, int, int]:
    """LLaVA's fill: ``tuple(int(x * 255) for x in image_processor.image_mean)`` (truncation, not rounding)."""
    return tuple(int(x * 255) for x in image_mean)  # type: ignore[return-value]
