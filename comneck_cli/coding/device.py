"""Where the networks run: the device chosen once at the edge, and batches that shrink when a GPU runs out of
memory."""

from __future__ import annotations

from typing import Callable, TypeVar

import torch

from comneck_cli.errors import ComneckError

T = TypeVar("T")
R = TypeVar("R")


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when present; asking for CUDA without it is one clear error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ComneckError("`device` cuda was requested but no CUDA device is available; use `device` cpu",
                           params=["device"])
    try:
        return torch.device(name)
    except RuntimeError as exc:
        raise ComneckError(f"unknown device {name!r}; use auto, cpu or cuda") from exc



def split_on_oom(run_batch: Callable[[list[T]], list[R]], items: list[T], describe: Callable[[T], str]) -> list[R]:
    """``run_batch(items)``; when CUDA runs out of memory, free the cache and retry each half.

    A single item that still does not fit raises one ComneckError naming it, so a batch job reports which
    input and which size failed instead of dying on the whole batch.
    """
    try:
        return run_batch(items)
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
        if len(items) == 1:
            raise ComneckError(
                f"out of GPU memory on {describe(items[0])} even alone; use `device` cpu or a smaller image",
                params=["device"]) from None
        half = len(items) // 2
        return split_on_oom(run_batch, items[:half], describe) + split_on_oom(run_batch, items[half:], describe)

