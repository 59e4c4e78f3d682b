"""comneck: compress images for multimodal LLMs.

The public Python API, re-exported lazily so that ``import comneck_cli`` (and the CLI's ``--help``)
does not import torch::

    from comneck_cli import load_codec, read_image, encode, encode_batch, decode, decode_latents
"""

from __future__ import annotations

import importlib
from typing import Any

from comneck_cli.errors import ComneckError

_EXPORTS = {
    "encode": "coding",
    "encode_to_bpp": "coding",
    "encode_batch": "coding",
    "decode": "coding",
    "decode_latents": "coding",
    "check_record": "coding",
    "resolve_device": "coding",
    "CodecCache": "coding",
    "ImageEncoder": "coding",
    "load_codec": "codecs",
    "save_codec": "codecs",
    "CODECS": "codecs",
    "Codec": "codecs",
    "read_image": "io.images",
}

__all__ = ["ComneckError", *_EXPORTS]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
