"""Answers from a LLaVA-family MLLM (``transformers``' ``LlavaForConditionalGeneration``) about ``.cnk`` records,
with comneck's features injected into the model's own vision tower (``comneck ask``)::

    from comneck_cli.mllm import load_mllm
    mllm = load_mllm("llava-hf/llava-1.5-7b-hf", device="cuda")        # a folder or a cached hub id; loads once
    answers = mllm.ask([Path("photo.cnk")], "What is in the picture?", via="reconstruction")

``transformers`` is the optional extra ``comneck[mllm]``. The model code is re-exported lazily, so the CLI reads
:data:`MAX_NEW_TOKENS` without importing torch.
"""

from __future__ import annotations

import importlib
from typing import Any

from comneck_cli.errors import UsageError

# The longest answer any command or request may ask for (`ask`, `serve` and its /v1/ask, `eval --mllm`): one bound
# everywhere, so an answer length one of them takes is never refused by another.
MAX_NEW_TOKENS = 4096

_EXPORTS = ("MLLM", "VIAS", "Answer", "load_mllm")

__all__ = ["MAX_NEW_TOKENS", "check_max_new_tokens", *_EXPORTS]


def check_max_new_tokens(value: int | str) -> int:
    """``value`` (an int, or its digits as a query gives them) as an answer length; refused outside
    1..:data:`MAX_NEW_TOKENS`."""
    text = str(value)
    if not text.isdigit() or not 1 <= int(text) <= MAX_NEW_TOKENS:
        raise UsageError(f"`max_new_tokens` must be an integer from 1 to {MAX_NEW_TOKENS}, not {value!r}",
                         params=("max_new_tokens",))
    return int(text)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(".model", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
