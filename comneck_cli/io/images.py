"""Read, pad, crop and write images.

Images travel as uint8 H×W×3 numpy arrays between here and the codec; torch conversion happens in
``to_tensor`` / ``from_tensor`` so reading and writing stay usable without torch.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import replace
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from comneck_cli.formats import CnkError, Limits

from comneck_cli.errors import ComneckError, InputError
from comneck_cli.io.outputs import read_problem

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
"""What a folder of images is searched for: training and evaluation sets, batch inputs, video frames."""
# Extension -> Pillow format name for writing decoded images.
WRITE_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP", ".tif": "TIFF", ".tiff": "TIFF"}
READ_FORMATS = ("PNG", "JPEG", "WEBP", "TIFF", "MPO", "GIF", "BMP")


class ImageConversionWarning(UserWarning):
    """Information was dropped while turning the input into 8-bit RGB."""


def input_limits(limits: Limits | None = None, max_pixels: int | None = None) -> Limits:
    """``limits`` (default: the environment's, ``Limits.from_env()``) with ``max_pixels`` (``--max-pixels``) applied:
    the one set of bounds for images, video frames, records written and read, and the features path."""
    limits = limits if limits is not None else Limits.from_env()
    return limits if max_pixels is None else replace(limits, max_pixels=max_pixels)


def check_size(height: int, width: int, subject: str, limits: Limits | None = None) -> None:
    """Refuse, as ComneckError, an image size a ``.cnk`` reader with these limits would refuse."""
    try:
        input_limits(limits).check_image(height, width, subject)
    except CnkError as exc:
        raise InputError(str(exc), params=exc.params) from None  # the container's sentence, its `max_pixels` kept


# How the files read_image takes begin (PNG, JPEG, WebP, TIFF in both byte orders and BigTIFF, GIF, BMP): a stream
# that starts otherwise is refused at once instead of read to its end.
IMAGE_SIGNATURES = (b"\x89PNG", b"\xff\xd8", b"RIFF", b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+", b"GIF8", b"BM")
# Bytes an image stream may hold per pixel of the limit: 16-bit RGBA samples stored raw take 8; headers 1 MiB more.
STREAM_BYTES_PER_PIXEL = 8


def read_image_stream(stream: BinaryIO, label: str, limits: Limits | None = None) -> bytes:
    """The bytes of one image file from ``stream`` (stdin), read a chunk at a time: refused as soon as they do not
    begin like an image, or once they exceed what an uncompressed image within ``limits`` can hold, so an endless
    stream (``< /dev/zero``) is never read into memory whole."""
    limits = input_limits(limits)
    cap = limits.max_pixels * STREAM_BYTES_PER_PIXEL + (1 << 20)
    chunks, size, checked = [], 0, False
    while chunk := stream.read(min(1 << 20, cap + 1 - size)):
        chunks.append(chunk)
        size += len(chunk)
        if not checked and size >= 8:
            if not b"".join(chunks)[:8].startswith(IMAGE_SIGNATURES):
                raise InputError(f"{label}: not a readable image (not PNG, JPEG, WebP or TIFF data)")
            checked = True
        if size > cap:
            raise InputError(f"{label}: more than {cap} bytes, more than an image within the limit of "
                             f"{limits.max_pixels} pixels holds; if the input is trusted, raise `max_pixels`",
                             params=["max_pixels"])
    return b"".join(chunks)


def read_image(
    source: Path | str | bytes | BinaryIO, name: str | None = None, *, max_pixels: int | None = None,
    limits: Limits | None = None,
) -> np.ndarray:
    """Decode an image file into uint8 RGB (H, W, 3), EXIF orientation applied.

    Grayscale converts losslessly; alpha, 16-bit samples and CMYK lose information and warn with
    ``ImageConversionWarning``. A file that is not an image, is truncated, or whose header declares a size the
    ``.cnk`` reader would refuse (``limits``, default the environment's, with ``max_pixels`` applied: more than
    89,478,485 pixels, Pillow's decompression-bomb threshold, or a side over 65,536) raises ComneckError before
    its pixels are decoded, so the encoder never writes a record its own reader refuses.
    """
    label = name or (str(source) if isinstance(source, (str, Path)) else "input")
    data = source if not isinstance(source, bytes) else io.BytesIO(source)
    limits = input_limits(limits, max_pixels)
    try:
        with warnings.catch_warnings():
            # Our own check below replaces Pillow's warning; its hard error (2× the limit) stays on.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            previous, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, limits.max_pixels
            try:
                img = Image.open(data)  # lazy: only the header is read until load()
            finally:
                Image.MAX_IMAGE_PIXELS = previous
        with img:
            if img.format not in READ_FORMATS:
                raise InputError(f"{label}: unsupported image format {img.format}; use PNG, JPEG, WebP or TIFF")
            width, height = img.size
            check_size(height, width, label, limits)
            if width < 1 or height < 1:
                raise InputError(f"{label}: image has no pixels")
            deep = img.mode in ("RGB", "RGBA") and _has_16_bit_samples(img)  # known only before load()
            frames = getattr(img, "n_frames", 1)
            if frames > 1 and img.format != "MPO":  # MPO: a camera's JPEG with its previews, not a sequence
                _warn(label, f"{frames} frames or pages; only the first is encoded (for every frame, encode a "
                             "folder of frames or a video)")
            img = ImageOps.exif_transpose(img)
            img.load()
            if deep:
                _warn(label, "16-bit samples reduced to 8 bits")
            rgb = _to_rgb(img, label)
    except ComneckError:
        raise
    except Image.DecompressionBombError as exc:
        # Pillow's text names its own threshold, twice ours: say the limit the user set.
        raise InputError(
            f"{label}: image is over the limit of {limits.max_pixels} pixels (decompression-bomb protection); "
            "if the file is trusted, raise `max_pixels`", params=["max_pixels"]
        ) from exc
    except MemoryError:  # within a raised --max-pixels, but more than this machine holds
        raise InputError(f"{label}: not enough memory to decode this image; lower `max_pixels` to refuse such "
                           "images before decoding, or use a machine with more memory", params=["max_pixels"]) from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        if isinstance(exc, FileNotFoundError):
            raise InputError(f"{label}: {read_problem(exc)}") from exc
        if isinstance(exc, UnidentifiedImageError):  # Pillow's text shows a path or an object's repr
            empty = source == b"" or (isinstance(source, (str, Path)) and Path(source).stat().st_size == 0)
            what = "empty input" if empty else "not PNG, JPEG, WebP or TIFF data"
            raise InputError(f"{label}: not a readable image ({what})") from exc
        raise InputError(f"{label}: not a readable image ({str(exc).splitlines()[0] or type(exc).__name__})") from exc
    array = np.asarray(rgb, dtype=np.uint8)
    if array.ndim != 3 or array.shape[0] < 1 or array.shape[1] < 1:
        raise InputError(f"{label}: image has no pixels")
    return array


def _has_16_bit_samples(img: Image.Image) -> bool:
    """Whether an RGB(A) image's file holds 16-bit samples: Pillow opens a 16-bit RGB PNG or TIFF as 8-bit ``RGB``
    and keeps the file's sample layout only in its tiles' raw mode (``RGB;16B``)."""
    for tile in img.tile:
        rawmode = tile.args if isinstance(tile.args, str) else tile.args[0] if tile.args else ""
        if isinstance(rawmode, str) and ";16" in rawmode:
            return True
    return False


def _to_rgb(img: Image.Image, label: str) -> Image.Image:
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in ("L", "1"):
        return img.convert("RGB")
    if mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        _warn(label, f"{mode} samples reduced to 8 bits")
        array = np.asarray(img, dtype=np.float64)
        if mode == "F" and np.isnan(array).any():  # NaN has no 8-bit value (numpy's cast would warn)
            _warn(label, "NaN samples set to 0")
            array = np.nan_to_num(array, nan=0.0, posinf=np.inf, neginf=-np.inf)
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
            _warn(label, "transparency dropped (the alpha channel is discarded: transparent pixels keep the colour "
                         "stored under them)")
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


# Rows converted at a time by to_tensor / from_tensor: their temporaries stay a band, not a second whole image.
_CONVERT_ROWS = 256


def to_tensor(image: np.ndarray, multiple: int):
    """uint8 H×W×3 -> float (1, 3, H', W') in [0, 1], padded (centred) to a multiple by repeating the edge pixels.

    CompressAI pads with zeros; the black border and its sharp edge cost bits and ring into the picture at
    low rate. Repeating the edges is flat and cheap to code. Decoders only crop, so this is an encoder choice.
    """
    import torch

    height, width = image.shape[:2]
    left, right, top, bottom = pad_amounts(height, width, multiple)
    # One float tensor, filled band by band and padded in place: no whole-image float temporaries.
    x = torch.empty(1, 3, top + height + bottom, left + width + right)
    for row in range(0, height, _CONVERT_ROWS):
        band = torch.from_numpy(np.array(image[row : row + _CONVERT_ROWS], copy=True)).permute(2, 0, 1)
        x[0, :, top + row : top + row + band.shape[1], left : left + width] = band.float().div_(255.0)
    x[..., :top, left : left + width] = x[..., top : top + 1, left : left + width]
    x[..., top + height :, left : left + width] = x[..., top + height - 1 : top + height, left : left + width]
    x[..., :left] = x[..., left : left + 1]
    x[..., left + width :] = x[..., left + width - 1 : left + width]
    return x


def from_tensor(x_hat, height: int, width: int, multiple: int) -> np.ndarray:
    """Crop the padding back off and round to uint8 H×W×3 (band by band, so memory beyond x_hat is the output)."""
    import torch

    left, _, top, _ = pad_amounts(height, width, multiple)
    out = np.empty((height, width, 3), dtype=np.uint8)
    for row in range(0, height, _CONVERT_ROWS):
        band = x_hat[0, :, top + row : top + min(row + _CONVERT_ROWS, height), left : left + width]
        out[row : row + band.shape[1]] = band.mul(255.0).round_().clamp_(0, 255).to(torch.uint8).permute(1, 2, 0).cpu()
    return out


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
