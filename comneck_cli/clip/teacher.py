"""The CLIP tower as teacher: C(x) on the uncompressed image, reduced to the outputs a student is compared on.

Training (the neck's L_dist, the post-processing U-Net, the adapter) compares a student's CLIP outputs with the
teacher's; inference (the semantic guide) borrows its preprocessing. A :class:`Target` names one output:

- ``pooled``: the projected image embedding (what ``encode_image`` returns);
- ``projected``: every last-layer token through ``ln_post`` and ``proj``;
- ``layerN/patch|cls|all``: hidden state N (Hugging Face numbering, negative from the end) before ``ln_post``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import Tensor, nn

from comneck_cli.clip.preprocess import ClipPreprocess
from comneck_cli.errors import ComneckError

HIDDEN_SELECTS = ("patch", "cls", "all")  # of one hidden state (before ln_post)
TOKEN_SELECTS = ("patch", "all", "projected")  # compared token by token: the student's grid must be the teacher's
SELECTION_FORMS = "pooled, projected, layerN/patch|cls|all (e.g. layer-2/patch)"
_LAYER_FORM = re.compile(r"layer(-?\d+)/(\w+)")


@dataclass(frozen=True)
class Target:
    """One CLIP output a student is compared on: ``pooled``, ``projected``, or ``patch``/``cls``/``all`` of hidden
    state ``layer`` (Hugging Face numbering)."""

    select: str = "pooled"
    layer: int = -1

    @classmethod
    def parse(cls, text: str) -> "Target":
        """``pooled``, ``projected``, ``layerN/patch|cls|all``, or the older ``SELECT[:LAYER]`` (``patch:-2``)."""
        target = cls.parse_or_none(text)
        if target is None:
            raise ComneckError(f"unknown distillation target {text.strip()!r}; use {SELECTION_FORMS}")
        return target

    @classmethod
    def parse_or_none(cls, text: str) -> "Target | None":
        """As :meth:`parse`, but None for a name that is no selection (a malformed one still raises)."""
        text = text.strip()
        match = _LAYER_FORM.fullmatch(text)
        if match:
            select, layer = match[2], match[1]
            if select not in HIDDEN_SELECTS:
                raise ComneckError(f"distillation target {text!r} selects {select!r}; after layerN/ use patch, cls "
                                   "or all, e.g. layer-2/patch")
        else:
            select, _, layer = text.partition(":")
            if select not in HIDDEN_SELECTS + ("pooled", "projected"):
                return None
        if select in ("pooled", "projected"):
            return cls(select, -1)  # both come from the last block: no layer to choose
        try:
            return cls(select, int(layer) if layer else -1)
        except ValueError:
            raise ComneckError(
                  f"distillation target {text!r} has a layer that is not a number; write e.g. layer-2/patch"
              ) from None

    @property
    def hidden(self) -> bool:
        return self.select in HIDDEN_SELECTS

    def __str__(self) -> str:
        return self.select if self.select in ("pooled", "projected") else f"layer{self.layer}/{self.select}"


class Teacher(nn.Module):
    """C(x) on the uncompressed image: C's preprocessing (:class:`ClipPreprocess`), the tower split at ``head`` /
    ``tail`` run once, and each target's tensor. ``head``/``tail`` may be None where only the preprocessing is
    used. ``clamp`` False leaves the resized image unclamped, as the ComNeck authors' teacher (torchvision's
    ``Resize`` on a float tensor) does."""

    def __init__(self, clip: nn.Module, head: nn.Module | None, tail: nn.Module | None,
                 targets: Target | Sequence[Target], *, clamp: bool = True):
        super().__init__()
        self.preprocess = ClipPreprocess(clip)
        self.preprocess.clamp = clamp
        self.head, self.tail = head, tail
        self.targets = (targets,) if isinstance(targets, Target) else tuple(targets)

    @property
    def size(self) -> tuple[int, int]:
        """C's input (H, W)."""
        return self.preprocess.size

    @torch.no_grad()
    def forward(self, x: Tensor) -> list[Tensor]:
        features = self.tail(self.head(self.preprocess(x)), **tail_request(self.targets))
        return [select_target(features, t) for t in self.targets]


def tail_request(targets: Sequence[Target], embedding: bool = False) -> dict[str, Any]:
    """``ClipTail.forward`` arguments computing every target in one pass: the one hidden state needed (all of
    them when several layers are), the pooled embedding and the projected tokens only where asked for."""
    layers = {t.layer for t in targets if t.hidden}
    return {"layer": layers.pop() if len(layers) == 1 else (None if layers else -1),
            "embedding": embedding or any(t.select == "pooled" for t in targets),
            "projected": any(t.select == "projected" for t in targets)}


def select_target(features: Any, target: Target) -> Tensor:
    """A target's tensor from a ``ClipTail`` output (:class:`comneck_cli.clip.tower.ClipFeatures`)."""
    return features.embedding if target.select == "pooled" else features.select(target.layer, target.select)
