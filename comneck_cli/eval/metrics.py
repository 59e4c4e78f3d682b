"""What ``comneck eval`` measures, per image, and the table of metrics the report plots and compares.

- rate: ``8 × bytes / (H × W)`` of the bytes a method really produces (a whole ``.cnk`` record, container
  included; a whole JPEG/WebP/AVIF/JXL file, headers included; the PNG file for ``uncompressed``), H × W the
  evaluated image;
- PSNR over the uint8 RGB pixels a person sees, all channels: ``10 log10(255² / MSE)``;
- MS-SSIM as pytorch-msssim (what CompressAI reports) defines it, ``data_range=255``, computed with separable
  filters in float64 (:func:`ms_ssim`); it downsamples four times with an 11-tap window, so it needs the short side
  to exceed 160 px and is not measured (None, with the reason) below;
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
MS_SSIM_WEIGHTS = np.array([0.0448, 0.2856, 0.3001, 0.2363, 0.1333])  # Wang et al. 2003, per scale


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
        # eval --mllm (eval.mllm): the MLLM's answers against its answers about the original image
        Metric("mllm_agreement", "MLLM answer agreement with the original", True, "mllm_agreement"),
        Metric("mllm_kl", "MLLM next-token KL vs the original (nats)", False, "mllm_kl"),
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


def _gaussian_valid(x: np.ndarray, window: np.ndarray) -> np.ndarray:
    """Separable Gaussian filter of an H×W×C array, 'valid' positions only (as pytorch-msssim's conv2d)."""
    from scipy.ndimage import correlate1d

    half = len(window) // 2
    x = correlate1d(x, window, axis=0, mode="constant")[half:-half]
    return correlate1d(x, window, axis=1, mode="constant")[:, half:-half]


def _pool(x: np.ndarray) -> np.ndarray:
    """avg_pool2d(kernel 2, padding = side % 2) as pytorch-msssim downsamples: odd sides get a zero row each end."""
    x = np.pad(x, ((x.shape[0] % 2,) * 2, (x.shape[1] % 2,) * 2, (0, 0)))
    x = x[: x.shape[0] // 2 * 2, : x.shape[1] // 2 * 2]
    return x.reshape(x.shape[0] // 2, 2, x.shape[1] // 2, 2, -1).mean(axis=(1, 3))


def ms_ssim(reference: np.ndarray, test: np.ndarray) -> tuple[float | None, str | None]:
    """(MS-SSIM, None) of two H×W×3 uint8 images, or (None, why it was not measured).

    pytorch-msssim's definition (an 11-tap σ = 1.5 Gaussian window, valid positions, C1 = (0.01·255)²,
    C2 = (0.03·255)², contrast-structure cs at scales 1-4 and SSIM at scale 5 weighted by ``MS_SSIM_WEIGHTS``,
    negative values clipped, the mean over channels) with separable scipy filters in float64: about 15× faster on CPU
    than its grouped convolutions, and equal to it within 1e-5 (tests/test_eval.py checks against pytorch-msssim).
    """
    short = min(reference.shape[:2])
    if short < MS_SSIM_MIN_SIDE:
        return None, f"MS-SSIM needs the short side > 160 px (pytorch-msssim's 4 downsamplings); images are {short} px"
    coords = np.arange(11, dtype=np.float64) - 5
    window = np.exp(-(coords**2) / (2 * 1.5**2))
    window /= window.sum()
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    x, y = reference.astype(np.float64), test.astype(np.float64)
    factors = []
    for scale in range(len(MS_SSIM_WEIGHTS)):
        mu_x, mu_y = _gaussian_valid(x, window), _gaussian_valid(y, window)
        var_x = _gaussian_valid(x * x, window) - mu_x**2
        var_y = _gaussian_valid(y * y, window) - mu_y**2
        cov = _gaussian_valid(x * y, window) - mu_x * mu_y
        cs = (2 * cov + c2) / (var_x + var_y + c2)
        if scale < len(MS_SSIM_WEIGHTS) - 1:
            factors.append(np.maximum(cs.mean(axis=(0, 1)), 0))
            x, y = _pool(x), _pool(y)
        else:
            ssim = (2 * mu_x * mu_y + c1) / (mu_x**2 + mu_y**2 + c1) * cs
            factors.append(np.maximum(ssim.mean(axis=(0, 1)), 0))
    return float(np.prod(np.stack(factors) ** MS_SSIM_WEIGHTS[:, None], axis=0).mean()), None


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
