"""Reading comneck's model files: safetensors tensors plus the string metadata that says what they are for.

Codecs, necks and post-processing U-Nets are all stored this way (never as pickles), so one reader gives
them the same checks and the same one-sentence errors.
"""

from __future__ import annotations

from pathlib import Path

from torch import Tensor

from .errors import ComneckError


def read_safetensors(path: Path | str, what: str) -> tuple[dict[str, Tensor], dict[str, str]]:
    """(tensors on the CPU, metadata) of a safetensors file; ``what`` names the kind of file in errors."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise ComneckError(f"{what} file {path} does not exist; pass an existing {what} file")
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
    except (SafetensorError, OSError, ValueError) as exc:
        raise ComneckError(f"{path} is not a comneck {what} file (not a valid safetensors file: {exc})") from exc
