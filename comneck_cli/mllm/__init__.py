"""Answers from a LLaVA-family MLLM (``transformers``' ``LlavaForConditionalGeneration``) about ``.cnk`` records,
with comneck's features injected into the model's own vision tower (``comneck ask``)::

    from comneck_cli.mllm import load_mllm
    mllm = load_mllm("llava-hf/llava-1.5-7b-hf", device="cuda")        # a folder or a cached hub id; loads once
    answers = mllm.ask([Path("photo.cnk")], "What is in the picture?", via="reconstruction")

``transformers`` is the optional extra ``comneck[mllm]``.
"""

from __future__ import annotations

from comneck_cli.mllm.model import MLLM, VIAS, Answer, load_mllm

__all__ = ["MLLM", "VIAS", "Answer", "load_mllm"]
