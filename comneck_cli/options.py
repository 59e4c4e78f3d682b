"""Click options several commands take alike (torch-free: cli.py and batch.py import it at start-up)."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import click


def clip_options(model_help: str, weights_help: str) -> Callable[[Callable], Callable]:
    """``--clip``/``--clip-tag``/``--clip-weights``: the open_clip tower a command loads, ViT-L-14/openai by default;
    the help says what the command loads it for."""

    def decorate(func: Callable) -> Callable:
        func = click.option("--clip-weights", type=click.Path(path_type=Path, exists=True, dir_okay=False),
                            default=None, help=weights_help)(func)
        func = click.option("--clip-tag", default="openai", show_default=True,
                            help="open_clip weights tag for --clip.")(func)
        return click.option("--clip", "clip_model", default="ViT-L-14", show_default=True, help=model_help)(func)

    return decorate
