"""What C takes: an image made into the CLIP tower's input, by open_clip's own preprocessing config.

Every path that feeds C starts here, so the tower sees the same size, mean, std and interpolation everywhere
(``open_clip.model.get_model_preprocess_cfg``: the ``preprocess_cfg`` open_clip attaches to the tower, or its
legacy ``image_size``/``image_mean``/``image_std``):

- :meth:`ClipPreprocess.image` for a uint8 image file's pixels (``features``, ``eval``): open_clip's eval transform
  itself (``image_transform_v2``: resize the short side, centre crop, normalise), after LLaVA-1.5's
  ``expand2square`` with ``pad_to_square``;
- :meth:`ClipPreprocess.forward` for a float batch in [0, 1] that gradients may flow through (training teachers,
  the semantic guide, the pre-editing module's guidance): the whole image resized to the tower's size with the
  config's interpolation (antialiased, clamped to [0, 1] as a uint8 resize is), then normalised. Training crops
  are square, so this is the eval transform without its (then empty) crop.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from comneck_cli.clip.presets import expand_to_square, mean_colour

if TYPE_CHECKING:
    import numpy as np


class ClipPreprocess(nn.Module):
    """The CLIP tower's input from images, by the tower's own open_clip preprocessing config.

    ``size`` is the tower's input ``(H, W)``; ``mean``/``std`` are buffers (they follow ``.to(device)``).
    """

    def __init__(self, clip: nn.Module):
        super().__init__()
        from open_clip.model import get_model_preprocess_cfg
        from open_clip.transform import PreprocessCfg

        self.cfg = PreprocessCfg(**get_model_preprocess_cfg(clip))
        size = self.cfg.size
        self.size: tuple[int, int] = tuple(size) if isinstance(size, (tuple, list)) else (size, size)
        self.register_buffer("mean", torch.tensor(self.cfg.mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(self.cfg.std, dtype=torch.float32).view(1, 3, 1, 1))
        self._transform = None
        self.clamp = True  # as a uint8 resize would; the ComNeck authors' teacher resizes floats unclamped

    def forward(self, x: Tensor) -> Tensor:
        """Images ``(B, 3, H, W)`` in [0, 1] -> C's input ``(B, 3, *size)``, differentiable."""
        if tuple(x.shape[-2:]) != self.size:
            mode = "bilinear" if self.cfg.interpolation == "bilinear" else "bicubic"
            x = F.interpolate(x, size=self.size, mode=mode, align_corners=False, antialias=True)
            x = x.clamp(0, 1) if self.clamp else x
        return (x - self.mean) / self.std

    def image(self, image: "np.ndarray", *, pad_to_square: bool = False) -> Tensor:
        """One uint8 ``H×W×3`` image -> ``(3, *size)`` through open_clip's eval transform (on the CPU); with
        ``pad_to_square`` first centred on a square of the mean colour (LLaVA-1.5's ``expand2square``)."""
        from open_clip.transform import image_transform_v2
        from PIL import Image

        if self._transform is None:
            self._transform = image_transform_v2(self.cfg, is_train=False)
        if pad_to_square:
            image = expand_to_square(image, mean_colour(self.cfg.mean))
        return self._transform(Image.fromarray(image, "RGB"))
