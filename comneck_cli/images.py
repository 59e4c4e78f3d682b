"""Read, pad, crop and write images.

Images travel as uint8 H×W×3 numpy arrays between here and the codec; torch conversion happens in
``to_tensor`` / ``from_tensor`` so reading and writing stay usable without torch.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from formats import Limits

from .errors import ComneckError

# Extension -> Pillow format name for writing decoded images.
WRITE_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP", ".tif": "TIFF", ".tiff": "TIFF"}
READ_FORMATS = ("PNG", "JPEG", "WEBP", "TIFF", "MPO", "GIF", "BMP")


class ImageConversionWarning(UserWarning):
    """Information was dropped while turning the input into 8-bit RGB."""


def read_image(
    source: Path | str | bytes | BinaryIO, name: str | None = None, *, max_pixels: int | None = None
) -> np.ndarray:
    """Decode an image file into uint8 RGB (H, W, 3), EXIF orientation applied.

    Grayscale converts losslessly; alpha, 16-bit samples and CMYK lose information and warn with
    ``ImageConversionWarning``. A file that is not an image, is truncated, or has more than ``max_pixels``
    pixels (decompression-bomb protection; default ``COMNECK_MAX_PIXELS`` or Pillow's 89,478,485) raises
    ComneckError before its pixels are decoded.
    """
    label = name or (str(source) if isinstance(source, (str, Path)) else "input")
    data = source if not isinstance(source, bytes) else io.BytesIO(source)
    limit = max_pixels or Limits.from_env().max_pixels
    try:
        with warnings.catch_warnings():
            # Our own check below replaces Pillow's warning; its hard error (2× the limit) stays on.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            previous, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, limit
            try:
                img = Image.open(data)
            finally:
                Image.MAX_IMAGE_PIXELS = previous
        with img:
            if img.format not in READ_FORMATS:
                raise ComneckError(f"{label}: unsupported image format {img.format}; use PNG, JPEG, WebP or TIFF")
            width, height = img.size
            if width * height > limit:
                raise ComneckError(
                    f"{label}: image is {width}×{height} ({width * height} pixels), over the limit of {limit} "
                    "pixels (decompression-bomb protection); if the file is trusted, raise --max-pixels"
                )
            if width < 1 or height < 1:
                raise ComneckError(f"{label}: image has no pixels")
            img = ImageOps.exif_transpose(img)
            img.load()
            rgb = _to_rgb(img, label)
    except ComneckError:
        raise
    except Image.DecompressionBombError as exc:
        raise ComneckError(
            f"{label}: image is too large to decode safely ({exc}; decompression-bomb protection); "
            "if the file is trusted, raise --max-pixels"
        ) from exc
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        if isinstance(exc, FileNotFoundError):
            raise ComneckError(f"{label}: no such file") from exc
        raise ComneckError(f"{label}: not a readable image ({str(exc).splitlines()[0] or type(exc).__name__})") from exc
    array = np.asarray(rgb, dtype=np.uint8)
    if array.ndim != 3 or array.shape[0] < 1 or array.shape[1] < 1:
        raise ComneckError(f"{label}: image has no pixels")
    return array


def _to_rgb(img: Image.Image, label: str) -> Image.Image:
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in ("L", "1"):
        return img.convert("RGB")
    if mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        _warn(label, f"{mode} samples reduced to 8 bits")
        array = np.asarray(img, dtype=np.float64)
        top = 65535.0 if mode.startswith("I;16") or array.max(initial=0) > 255 else 255.0
        gray = np.clip(np.rint(array / top * 255.0), 0, 255).astype(np.uint8)
        return Image.fromarray(gray).convert("RGB")
    if mode == "P":
        if "transparency" in img.info:
            img = img.convert("RGBA")
            mode = "RGBA"
        else:
            return img.convert("RGB")
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        alpha = np.asarray(img.getchannel("A"))
        if alpha.min(initial=255) < 255:
            _warn(label, "transparency dropped (composited onto black)")
        return img.convert("RGB")
    if mode == "CMYK":
        _warn(label, "CMYK converted to RGB without a colour profile")
        return img.convert("RGB")
    _warn(label, f"{mode} converted to RGB")
    return img.convert("RGB")


def _warn(label: str, what: str) -> None:
    warnings.warn(f"{label}: {what}", ImageConversionWarning, stacklevel=3)


def size_label(data) -> str:
    """``W×H`` of an image array, or ``latent grid W×H`` of a (1, M, h, w) y_hat tensor, for error messages."""
    if data.ndim == 4:
        return f"latent grid {data.shape[-1]}×{data.shape[-2]}"
    return f"{data.shape[1]}×{data.shape[0]}"


def pad_amounts(height: int, width: int, multiple: int) -> tuple[int, int, int, int]:
    """(left, right, top, bottom) centred padding up to a multiple, as CompressAI pads."""
    out_h = (height + multiple - 1) // multiple * multiple
    out_w = (width + multiple - 1) // multiple * multiple
    left, top = (out_w - width) // 2, (out_h - height) // 2
    return left, out_w - width - left, top, out_h - height - top


def to_tensor(image: np.ndarray, multiple: int):
    """uint8 H×W×3 -> float (1, 3, H', W') in [0, 1], padded (centred) to a multiple by repeating the edge pixels.

    CompressAI pads with zeros; the black border and its sharp edge cost bits and ring into the picture at
    low rate. Repeating the edges is flat and cheap to code. Decoders only crop, so this is an encoder choice.
    """
    import torch
    import torch.nn.functional as F

    x = torch.from_numpy(np.array(image, copy=True)).permute(2, 0, 1).unsqueeze(0).float().div_(255.0)
    return F.pad(x, pad_amounts(image.shape[0], image.shape[1], multiple), mode="replicate")


def from_tensor(x_hat, height: int, width: int, multiple: int) -> np.ndarray:
    """Crop the padding back off and round to uint8 H×W×3."""
    import torch

    left, _, top, _ = pad_amounts(height, width, multiple)
    crop = x_hat[0, :, top : top + height, left : left + width]
    return crop.mul(255.0).round_().clamp_(0, 255).to(torch.uint8).permute(1, 2, 0).cpu().numpy()


def image_format_for(path: Path | None) -> str:
    """Pillow format for an output path (PNG for stdout or an unknown suffix)."""
    if path is None:
        return "PNG"
    suffix = path.suffix.lower()
    if suffix not in WRITE_FORMATS:
        raise ComneckError(f"cannot write {path}: unknown image extension {suffix!r}; use one of {', '.join(WRITE_FORMATS)}")
    return WRITE_FORMATS[suffix]


def encode_image_bytes(image: np.ndarray, fmt: str) -> bytes:
    """Serialise uint8 RGB with Pillow (lossless PNG/TIFF/WebP-lossless by default, JPEG at quality 95)."""
    buffer = io.BytesIO()
    options = {"JPEG": {"quality": 95}, "WEBP": {"lossless": True}}.get(fmt, {})
    Image.fromarray(image, "RGB").save(buffer, format=fmt, **options)
    return buffer.getvalue()
