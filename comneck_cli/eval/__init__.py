"""``comneck eval``: rate against fidelity and accuracy for the neck, the paper's baselines and traditional codecs.

The paper's comparison (§4.1-4.2, A.2) on a labelled image folder, without an MLLM: every method turns an
image into bits and the bits into CLIP features; what is measured is the rate (bpp of the real bytes), what a
person sees (PSNR, MS-SSIM), how close the features are to C(x) (MSE, cosine) and CLIP zero-shot top-1.

One module per concern:

- ``data``        the image folder (ImageFolder classes or flat), ``--limit``, ``--size``;
- ``metrics``     bpp, PSNR, MS-SSIM, feature fidelity, the metric table (zero-shot: ``clip.zeroshot``);
- ``baselines``   traditional codecs through Pillow (JPEG, WebP, AVIF, JPEG XL) and the bpp-matching search;
- ``methods``     one class per method (neck, reconstruction, postprocess with ``models.unet``'s U-Net,
                  uncompressed, traditional codecs, CoTAM's semantic and semantic-adapter);
- ``run``         the loop over image chunks, the JSONL log behind ``--resume``;
- ``report``      averages, BD-rates, ``points.csv/json``, ``summary.md``, one PNG per metric;
- ``commands``    the Click command (imports neither torch nor compressai until it runs).

Re-exported lazily so that importing this package does not import torch::

    from comneck_cli.eval import EvalConfig, run_eval
    result = run_eval(EvalConfig(data=Path("val/"), output=Path("report/"), qualities=(1, 2, 3, 4)))
"""

from __future__ import annotations

import importlib
from typing import Any

from comneck_cli.clip.zeroshot import DEFAULT_TEMPLATES

_EXPORTS = {
    "EvalConfig": "run",
    "EvalResult": "run",
    "run_eval": "run",
    "bd_rate": "report",
}

__all__ = ["METHOD_NAMES", "DEFAULT_METHODS", "DEFAULT_PROMPT", *_EXPORTS]

# Names the CLI checks without importing torch; ``methods.METHODS`` is the registry they name.
METHOD_NAMES = ("neck", "reconstruction", "postprocess", "uncompressed", "jpeg", "webp", "avif", "jxl", "semantic",
                "semantic-adapter", "vbr-preedit")
DEFAULT_METHODS = ("neck", "reconstruction", "uncompressed", "jpeg", "webp", "avif", "jxl")
DEFAULT_PROMPT = DEFAULT_TEMPLATES[0]  # the zero-shot prompt, as training's single template


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
