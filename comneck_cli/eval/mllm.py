"""``comneck eval --mllm DIR --prompts FILE``: what compression does to an MLLM's answers.

For every image and prompt the model (a LLaVA checkpoint, :mod:`comneck_cli.mllm`) first answers about the
original image, greedily; that answer is the reference. Then, for every method and point, it answers about what the
method made of the image, through the same injection ``comneck ask`` uses:

- methods whose outcome is an image (``reconstruction``, ``postprocess``, ``semantic``, ``vbr-preedit``, ``jpeg``,
  ``webp``, ``avif``, ``jxl``) and ``uncompressed``: that image through the model's processor and tower;
- ``neck``: the record's ``y_hat`` through the neck into the model's own tower from block k+1 on (the neck must
  have been trained for this tower, as ``ask --via neck`` demands);
- ``semantic-adapter``: the decoded image's embedding plus the decoder adapter's tokens (an adapter trained for
  this tower).

Two numbers per (method, point, image), averaged over the prompts:

- ``mllm_agreement``: the share of prompts whose greedy answer (the decoded text) equals the reference answer;
- ``mllm_kl``: KL(P_original || P_compressed) of the next-token distributions, teacher-forced along the reference
  answer's tokens (its end-of-text token included), averaged over those positions: at position j both
  distributions are the model's for answer token j given the prompt, the image and the reference's tokens 0..j-1.

A method whose features cannot enter this model (a neck or adapter trained for another tower) keeps its other
metrics, and its rows say why the answers are not measured.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from comneck_cli.errors import ComneckError, InputError, UsageError

FIELDS = ("mllm_agreement", "mllm_kl")


def read_prompts(path: Path) -> list[str]:
    """The prompts of ``path``: one per line, as ``comneck ask --prompt`` takes them; blank lines are skipped."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"cannot read the prompts file {path}: {getattr(exc, 'strerror', None) or exc}",
                         params=("prompts",)) from None
    prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise InputError(f"the prompts file {path} holds no prompt; write one prompt a line", params=("prompts",))
    return prompts


def kl_along(reference: Tensor, test: Tensor) -> float:
    """Mean over positions of KL(reference || test), both (n, vocab) log-probabilities."""
    return float((reference.exp() * (reference - test)).sum(dim=-1).mean())


@dataclass
class _Said:
    """The model's answer to one prompt about one input: its text, its tokens, and (for the reference) the
    teacher-forced log-probabilities along them."""

    text: str
    ids: Tensor
    logprobs: Tensor | None = None


class AnswerJudge:
    """One loaded MLLM and the prompts it is asked about every image; :meth:`score` measures one outcome."""

    def __init__(self, mllm: Any, prompts: list[str], *, max_new_tokens: int = 32) -> None:
        self.mllm, self.prompts, self.max_new_tokens = mllm, list(prompts), max_new_tokens
        self._reference: dict[str, list[_Said]] = {}
        self._clip = None

    @classmethod
    def load(cls, model: str | Path, prompts: Path, *, device: torch.device | str, dtype: str | None = None,
             max_new_tokens: int = 32) -> "AnswerJudge":
        """The prompts read, then the model loaded (so a bad prompts file fails before any model loads)."""
        from comneck_cli.mllm import check_max_new_tokens, load_mllm

        check_max_new_tokens(max_new_tokens)
        texts = read_prompts(prompts)
        mllm = load_mllm(model, device=str(device), dtype=dtype)
        for number, text in enumerate(texts, 1):  # before any point: a bad prompt would fail every one of them
            try:
                mllm.prompt_text(text)
            except UsageError as exc:  # it names `prompt`, which on eval's command line is the zero-shot prompt
                raise UsageError(f"{prompts}, prompt {number}: {str(exc).replace('`prompt`', 'prompt')}",
                                 params=("prompts",)) from None
        return cls(mllm, texts, max_new_tokens=max_new_tokens)

    def settings(self) -> dict[str, Any]:
        """What decides what the numbers mean, for the eval log and report."""
        model, tag = self.mllm.tower_id
        return {"folder": str(self.mllm.folder), "tower": f"{model}/{tag}", "dtype": str(self.mllm.dtype),
                "prompts": self.prompts, "max_new_tokens": self.max_new_tokens,
                "prompts_sha256": hashlib.sha256("\n".join(self.prompts).encode()).hexdigest()[:16]}

    @property
    def tower_id(self) -> tuple[str, str]:
        return self.mllm.tower_id

    def clip(self) -> torch.nn.Module:
        """The model's tower as eval's CLIP (for necks trained for it); converted once."""
        if self._clip is None:
            self._clip = self.mllm.open_clip_model()
        return self._clip

    def new_chunk(self) -> None:
        self._reference.clear()

    # ------------------------------------------------------------------------------------------ answers
    def answers(self, features: Tensor) -> list[_Said]:
        """The greedy answer to every prompt about one input whose projected features are ``features``."""
        said = []
        for prompt in self.prompts:
            ids = self.mllm.answer_ids(self.mllm.generate_ids(features, prompt, self.max_new_tokens)[0])
            text = self.mllm.processor.tokenizer.decode(ids, skip_special_tokens=True).strip()
            said.append(_Said(text, ids))
        return said

    def reference(self, entry: Any) -> list[_Said]:
        """The answers about the original image, with their teacher-forced log-probabilities; once per image."""
        key = entry.item.id
        if key not in self._reference:
            features = self.mllm.image_features(entry.image)
            said = self.answers(features)
            for prompt, one in zip(self.prompts, said):
                one.logprobs = self.mllm.answer_logprobs(features, prompt, one.ids)
            self._reference[key] = said
        return self._reference[key]

    def features(self, ctx: Any, method: Any, point: Any, entry: Any, outcome: Any) -> Tensor:
        """The projected features the model reads for what ``method`` made of ``entry`` at ``point``."""
        if outcome.is_reference:
            return self.mllm.image_features(entry.image)
        if point.method == "neck":
            extractor = point.extractor
            self.mllm.check_neck(extractor.info, extractor.neck_path)
            return self.mllm.latent_features(extractor.neck, extractor.k, outcome.latents)
        if point.method == "semantic-adapter":
            extractor = point.extractor
            extractor.adapter_info.check_clip(*self.mllm.tower_id, extractor.adapter_path)
            _, x_hat, y_hat = method.coded(ctx, point.codec, entry)
            return self.mllm.adapted_features(extractor.adapter, y_hat, x_hat)
        if outcome.clip_image is not None:
            return self.mllm.image_features(outcome.clip_image)
        raise ComneckError(f"{point.method} gives the MLLM no input")

    def score(self, ctx: Any, method: Any, point: Any, entry: Any, outcome: Any) -> dict[str, Any]:
        """``mllm_agreement``, ``mllm_kl`` and the answers for one outcome; with a note instead of numbers when
        the outcome cannot enter the model."""
        try:
            features = self.features(ctx, method, point, entry, outcome)
        except ComneckError as exc:
            return {"mllm_agreement": None, "mllm_kl": None, "mllm_answers": None,
                    "mllm_note": f"MLLM answers not measured: {exc}"}
        reference = self.reference(entry)
        said = self.answers(features)
        agree = [float(one.text == ref.text) for one, ref in zip(said, reference)]
        kl = [kl_along(ref.logprobs, self.mllm.answer_logprobs(features, prompt, ref.ids))
              for prompt, ref in zip(self.prompts, reference)]
        return {"mllm_agreement": sum(agree) / len(agree), "mllm_kl": sum(kl) / len(kl),
                "mllm_answers": [one.text for one in said]}
