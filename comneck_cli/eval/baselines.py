"""Traditional image codecs through Pillow, swept to the learned codec's rates.

Each is one :class:`ImageCodec` in :data:`TRADITIONAL`: JPEG (libjpeg-turbo) and WebP (libwebp) and AVIF
(libavif/aom) are built into Pillow 13; JPEG XL only where an installed package adds a Pillow ``JXL`` plugin
(``pillow-jxl-plugin``, GPL-3.0+, an optional extra). ``imagecodecs`` also encodes JPEG XL but needs numpy ≥ 2,
which CompressAI's numpy < 2 pin excludes, so it is not used. VVC (the paper's A.2) has no encoder packaged
for Python here. A codec that is not available is reported as skipped with :meth:`ImageCodec.unavailable`.

Rate matching: for every image and every learned quality q, :meth:`ImageCodec.match_bpp` binary-searches the
codec's integer quality setting for the file whose bpp is nearest (in log bpp) to the bpp of the learned
codec's ``.cnk`` record of that image at q. Quality settings are monotone in rate, so the search takes about
log2(100) ≈ 7 encodes. The curves therefore cover the learned codec's bpp range point for point; where the
codec cannot go that low (JPEG's headers alone are ~5 kbit) the nearest setting is kept, the real bpp is
reported, and a note says so (none within 5 % of the target). Settings other than quality are Pillow's
defaults (4:2:0 chroma subsampling; WebP method 4; AVIF speed 6); rate counts the whole file, headers included.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass(frozen=True)
class ImageCodec:
    """A Pillow image format swept over an integer ``quality`` setting (higher = more bits)."""

    name: str
    title: str
    format: str
    qualities: range
    plugin: str | None = None  # a module whose import registers the Pillow format
    install: str = ""  # what to install when the format is missing
    options: dict[str, Any] = field(default_factory=dict)

    def unavailable(self) -> str | None:
        """None if this Pillow can write and read the format, else a sentence saying why not and what to do."""
        from PIL import Image

        if self.plugin is not None:
            try:
                __import__(self.plugin)
            except ImportError:
                pass
        Image.init()
        if self.format in Image.SAVE and self.format in Image.OPEN:
            return None
        import PIL

        return (f"no {self.title} encoder is installed (Pillow {PIL.__version__} has none for {self.format}); "
                f"{self.install}")

    def encode(self, image: np.ndarray, quality: int) -> bytes:
        from PIL import Image

        buffer = io.BytesIO()
        Image.fromarray(image, "RGB").save(buffer, format=self.format, quality=int(quality), **self.options)
        return buffer.getvalue()

    def decode(self, data: bytes) -> np.ndarray:
        from PIL import Image

        with Image.open(io.BytesIO(data)) as img:
            return np.asarray(img.convert("RGB"), dtype=np.uint8)

    def match_bpp(self, image: np.ndarray, target_bpp: float) -> tuple[int, bytes, str | None]:
        """(quality, file bytes, note) whose bpp is nearest to ``target_bpp`` in log bpp; see the module docstring."""
        height, width = image.shape[:2]
        files: dict[int, bytes] = {}

        def bpp(q: int) -> float:
            if q not in files:
                files[q] = self.encode(image, q)
            return 8.0 * len(files[q]) / (height * width)

        lo, hi = self.qualities[0], self.qualities[-1]
        note = None
        if bpp(lo) >= target_bpp:
            best = lo
            if bpp(lo) > target_bpp * 1.05:
                note = f"{self.name} cannot go down to the .cnk record's bpp: its lowest setting (quality {lo}) is used"
        elif bpp(hi) <= target_bpp:
            best = hi
            if bpp(hi) < target_bpp / 1.05:
                note = f"{self.name} cannot reach the .cnk record's bpp: its highest setting (quality {hi}) is used"
        else:
            a, b = lo, hi  # bpp(a) < target <= bpp(b)
            while b - a > 1:
                mid = (a + b) // 2
                if bpp(mid) < target_bpp:
                    a = mid
                else:
                    b = mid
            best = min((b, a), key=lambda q: abs(math.log(bpp(q) / target_bpp)))
        return best, files[best], note


_JXL_INSTALL = (
    "`pip install pillow-jxl-plugin` (GPL-3.0+, an optional extra) adds one; imagecodecs needs numpy>=2, "
    "which conflicts with compressai's numpy<2 pin"
)

TRADITIONAL: dict[str, ImageCodec] = {
    c.name: c
    for c in (
        ImageCodec("jpeg", "JPEG", "JPEG", range(1, 101), install="reinstall Pillow with libjpeg"),
        ImageCodec("webp", "WebP", "WEBP", range(0, 101), install="reinstall Pillow with libwebp"),
        ImageCodec("avif", "AVIF", "AVIF", range(0, 101),
                   install="use Pillow wheels built with libavif (Pillow >= 11.2)"),
        ImageCodec("jxl", "JPEG XL", "JXL", range(0, 100), plugin="pillow_jxl", install=_JXL_INSTALL),
    )
}
