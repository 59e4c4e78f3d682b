"""Training: codecs for people (rate-distortion) and transform-necks for machines (scenarios d1, d2, d3).

One module per concern: ``trainer`` (the one skeleton every run plugs into: step loop, resume, metrics,
checkpoints, export), ``config`` (each run's settings in its config dataclass: defaults and what a resume keeps),
``data`` (ImageFolder crops, reproducible order), ``latents`` (each codec family's training-time path to y_hat and
its likelihoods), ``losses``, ``checkpoint`` (resumable state), ``loop`` (devices, torchrun ranks, metrics),
``export`` (files and registry entries), and the runs: ``codec``, ``vbr``, ``neck``, ``postprocess`` (the paper's
post-processing baseline) and ``adapter``. The Click commands are ``comneck_cli.cli.train_commands``.

Re-exported lazily, so that importing this package (and the CLI) does not import torch::

    from comneck_cli.train import CodecTrainConfig, train_codec
    train_codec(CodecTrainConfig(codec="mbt2018-mean", quality=3, data=Path("photos/"), steps=1000))
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "CodecTrainConfig": "codec",
    "train_codec": "codec",
    "TrainResult": "trainer",
    "Run": "trainer",
    "train": "trainer",
    "setting": "config",
    "RunConfig": "config",
    "NeckTrainConfig": "neck",
    "train_neck": "neck",
    "Stage": "neck",
    "default_stages": "neck",
    "Target": "neck",
    "PostprocessTrainConfig": "postprocess",
    "train_postprocess": "postprocess",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
