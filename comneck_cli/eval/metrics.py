"""What ``comneck eval`` measures, per image, and the table of metrics the report plots and compares.

- rate: ``8 × bytes / (H × W)`` of the bytes a method really produces (a whole ``.cnk`` record, container
  included; a whole JPEG/WebP/AVIF/JXL file, headers included; the PNG file for ``uncompressed``), H × W the
  evaluated image;
- PSNR over the uint8 RGB pixels a person sees, all channels: ``10 log10(255² / MSE)``;
- MS-SSIM by pytorch-msssim (what CompressAI reports), ``data_range=255``; it downsamples four times with an
  11-tap window, so it needs the short side to exceed 160 px and is not measured (None, with the reason) below;
- feature fidelity against C(x) at the chosen layer and selection: the MSE over all elements, and the cosine
  similarity of every token (along the feature dimension) averaged over the tokens;
- zero-shot top-1: the projected image embedding against the class weights of one prompt per class
  (``"a photo of a {}."``), by :class:`comneck_cli.clip.zeroshot.ZeroShot` (open_clip's zero-shot classifier).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
import numpy as np


MS_SSIM_MIN_SIDE = 161  # pytorch-msssim asserts the short side > (win_size - 1) * 2**4 = 160


@dataclass(frozen=True)
class Metric:
    """One measured quantity: ``field`` in the per-image rows (``correct`` averages into ``accuracy``)."""

    name: str
    title: str
    higher_is_better: bool
    field: str


METRICS: dict[str, Metric] = {
    m.name: m
    for m in (
        Metric("psnr", "PSNR (dB)", True, "psnr"),
        Metric("ms_ssim", "MS-SSIM", True, "ms_ssim"),
        Metric("feature_mse", "feature MSE vs C(x)", False, "feature_mse"),
        Metric("feature_cosine", "feature cosine similarity vs C(x)", True, "feature_cosine"),
        Metric("accuracy", "zero-shot top-1 accuracy", True, "correct"),
    )
}


def bits_per_pixel(num_bytes: int, height: int, width: int) -> float:
    return 8.0 * num_bytes / (height * width)


def psnr(reference: np.ndarray, test: np.ndarray) -> float:
    """PSNR in dB of two uint8 images of the same shape; ``inf`` when they are identical."""
    if reference.shape != test.shape:
        raise ValueError(f"PSNR of images of different shapes {reference.shape} and {test.shape}")
    mse = float(np.mean((reference.astype(np.float64) - test.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10.0 * math.log10(255.0**2 / mse)


def ms_ssim(reference: np.ndarray, test: np.ndarray, device="cpu") -> tuple[float | None, str | None]:
    """(MS-SSIM, None), or (None, why it was not measured); computed in float32 on ``device``."""
    short = min(reference.shape[:2])
    if short < MS_SSIM_MIN_SIDE:
        return None, f"MS-SSIM needs the short side > 160 px (pytorch-msssim's 4 downsamplings); images are {short} px"
    import torch
    from pytorch_msssim import ms_ssim as _ms_ssim

    def as_tensor(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.array(a, dtype=np.float32)).permute(2, 0, 1).unsqueeze(0).to(device)

    return float(_ms_ssim(as_tensor(reference), as_tensor(test), data_range=255, size_average=True)), None


def feature_fidelity(features, reference) -> tuple[float | None, float | None, str | None]:
    """(MSE, mean cosine similarity, None) of one image's features against C(x), or (None, None, why)."""
    import torch.nn.functional as F

    if tuple(features.shape) != tuple(reference.shape):
        return None, None, (
            f"features {tuple(features.shape)} and C(x) {tuple(reference.shape)} differ in shape (a latent grid "
            "other than the CLIP patch grid); evaluate square images of the neck's size with `size`"
        )
    a, b = features.double(), reference.double()
    mse = float(((a - b) ** 2).mean())
    cosine = float(F.cosine_similarity(a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1]), dim=-1).mean())
    return mse, cosine, None
