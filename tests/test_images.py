"""Reading images: modes, orientation, broken files."""

from __future__ import annotations

import io
import warnings

import numpy as np
import pytest
from PIL import Image

from comneck_cli import ComneckError, read_image
from comneck_cli.io.images import ImageConversionWarning, from_tensor, pad_amounts, to_tensor


def _png(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=kw.pop("format", "PNG"), **kw)
    return buf.getvalue()


def test_grayscale_converts_without_warning(photos):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rgb = read_image(photos["camera"])
    assert rgb.shape == (512, 512, 3) and (rgb[..., 0] == rgb[..., 2]).all()


def test_rgba_with_transparency_warns():
    img = Image.new("RGBA", (5, 4), (10, 20, 30, 128))
    with pytest.warns(ImageConversionWarning, match="transparency dropped"):
        rgb = read_image(_png(img))
    assert rgb.shape == (4, 5, 3)


def test_opaque_rgba_and_palette_are_silent():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        read_image(_png(Image.new("RGBA", (3, 3), (1, 2, 3, 255))))
        read_image(_png(Image.new("RGB", (3, 3), (9, 9, 9)).convert("P")))


def test_sixteen_bit_and_cmyk_warn():
    deep = Image.fromarray(np.full((4, 4), 65535, dtype=np.uint16))
    with pytest.warns(ImageConversionWarning, match="8 bits"):
        assert read_image(_png(deep)).max() == 255
    cmyk = Image.new("CMYK", (4, 4), (0, 0, 0, 0))
    with pytest.warns(ImageConversionWarning, match="CMYK"):
        read_image(_png(cmyk, format="JPEG"))


def test_exif_orientation_is_applied():
    img = Image.new("RGB", (6, 2), (255, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise on display
    rgb = read_image(_png(img, format="JPEG", exif=exif))
    assert rgb.shape == (6, 2, 3)


@pytest.mark.parametrize("data", [b"", b"hello", b"\x89PNG\r\n\x1a\n" + b"\0" * 20])
def test_not_an_image_is_one_error(data):
    with pytest.raises(ComneckError, match="not a readable image"):
        read_image(data, name="x.png")


def test_truncated_jpeg_is_refused(photos):
    data = photos["rocket"].read_bytes()
    with pytest.raises(ComneckError, match="rocket"):
        read_image(data[: len(data) // 2], name="rocket.jpg")


def test_pad_and_crop_are_inverse():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (37, 70, 3), dtype=np.uint8)
    x = to_tensor(image, 64)
    assert x.shape == (1, 3, 64, 128)
    assert pad_amounts(37, 70, 64) == (29, 29, 13, 14)
    assert np.array_equal(from_tensor(x, 37, 70, 64), image)


def test_padding_repeats_the_edge_pixels():
    # the border must be as cheap to code as possible: flat continuations of the edges, no black frame
    import torch

    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, (37, 70, 3), dtype=np.uint8)
    x = to_tensor(image, 64)[0]
    left, _, top, _ = pad_amounts(37, 70, 64)
    inner = x[:, top : top + 37, left : left + 70]
    assert torch.equal(x[:, :top, left : left + 70], inner[:, :1].expand(-1, top, -1))
    assert torch.equal(x[:, top + 37 :, left : left + 70], inner[:, -1:].expand(-1, 64 - 37 - top, -1))
    assert torch.equal(x[:, :, :left], x[:, :, left : left + 1].expand(-1, -1, left))
    assert torch.equal(x[:, :, left + 70 :], x[:, :, left + 69 : left + 70].expand(-1, -1, 128 - 70 - left))
