"""Resuming a batch job: whether an existing output is ours (:class:`Written`), and if so finished work of the same
settings (skipped) or stale or truncated (redone), judged by its content."""

from __future__ import annotations

import json
import os
from pathlib import Path

from comneck_cli.errors import ComneckError
from comneck_cli.io.outputs import refuse_special


def _image_size(path: str) -> tuple[int, int]:
    """(height, width) after EXIF orientation, from the header only."""
    from PIL import Image

    with Image.open(path) as img:
        width, height = img.size
        if img.getexif().get(0x0112, 1) in (5, 6, 7, 8):
            width, height = height, width
    return height, width


def cnk_output_ok(target: Path, encoder, source: str) -> bool:
    """One record, written as ``encoder`` (``api.ImageEncoder``) writes: its codec, quality (or rate), weights and
    guidance (semantic map, pre-editing P), for an image of the source's size.

    With a bpp target the record's rate is whatever met the target: its bpp must be within 5% of it, or the target
    must be out of the codec's reach and the record at the rate closest to it (else every rerun would redo it).
    """
    from comneck_cli.formats import CnkError, read_file

    if not target.is_file():
        return False
    try:
        records = read_file(target)
        size = _image_size(source)
    except (CnkError, OSError, ValueError, SyntaxError):
        return False
    if len(records) != 1:
        return False
    r, codec = records[0], encoder.codec
    if (r.codec_id, r.weights_digest) != (codec.spec.codec_id, codec.digest) or (r.height, r.width) != size:
        return False
    if not encoder.made(r):
        return False
    if encoder.bpp_target is not None:
        from comneck_cli.codecs import bpp_out_of_reach

        return (abs(r.bits_per_pixel - encoder.bpp_target) <= 0.05 * encoder.bpp_target
                or bpp_out_of_reach(codec.spec, r.rate, r.bits_per_pixel, encoder.bpp_target) is not None)
    return (r.quality, r.rate) == (codec.quality, codec.stored_rate)


def image_output_ok(target: Path, height: int, width: int) -> bool:
    """Decodes completely (a truncated file does not) at the record's size."""
    from PIL import Image

    if not target.is_file():
        return False
    try:
        with Image.open(target) as img:
            img.load()
            return img.size == (width, height)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        return False


def features_output_ok(target: Path, expected: dict[str, str]) -> bool:
    """Loads completely, holds one input's features, and (for .pt / .safetensors) was made with the same
    settings: every metadata field but ``source`` equal. ``.npy`` carries no metadata: loading is all."""
    if not target.is_file():
        return False
    want = {k: v for k, v in expected.items() if k != "source"}
    try:
        suffix = target.suffix.lower()
        if suffix == ".pt":
            import torch

            saved = torch.load(target, weights_only=True, map_location="cpu")
            tensor, meta = saved["features"], saved["metadata"]
        elif suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(target), framework="pt") as f:
                meta = f.metadata() or {}
                tensor = f.get_tensor("features")
        else:
            import numpy as np

            tensor, meta = np.load(target, allow_pickle=False), want
    except Exception:  # any unreadable, truncated or foreign file is simply redone  # noqa: BLE001
        return False
    return tuple(tensor.shape[:1]) == (1,) and {k: meta.get(k) for k in want} == want



WRITTEN_FILE = ".comneck-batch-written"  # hidden: a folder walk never takes it for an input


class Written:
    """The outputs that batch jobs wrote into the folder ``output``: ``OUTPUT/.comneck-batch-written``, one JSON
    string a line (the path relative to ``output``), appended before each output is moved into place. A file at a
    path that is not listed is someone else's (the user's photo beside its ``.cnk``), never an output to skip or
    redo. Workers append short lines to one file opened for appending; a torn line is ignored, which can only turn
    an output of ours into a refusal, never a foreign file into ours."""

    def __init__(self, output: Path) -> None:
        self.output = Path(output)
        self.path = self.output / WRITTEN_FILE
        self._known: set[str] | None = None

    def _key(self, target: Path) -> str:
        return Path(target).relative_to(self.output).as_posix()

    def owns(self, target: Path) -> bool:
        """Whether a batch job wrote (or was about to write) ``target``."""
        if self._known is None:
            self._known = set()
            try:
                with open(self.path, encoding="utf-8", errors="replace") as f:
                    for line in f:
                        try:
                            self._known.add(json.loads(line))
                        except ValueError:  # a torn line: that output counts as foreign
                            continue
            except FileNotFoundError:
                pass
            except OSError as exc:
                raise ComneckError(f"cannot read {self.path}: {exc.strerror or exc}") from None
        return self._key(target) in self._known

    def add(self, target: Path) -> None:
        """Record ``target`` as ours, before it is written: a job killed in between leaves only a listed name."""
        key = self._key(target)
        if self._known is not None and key in self._known:
            return
        line = (json.dumps(key, ensure_ascii=False) + "\n").encode("utf-8")
        try:
            self.output.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
            try:
                os.write(fd, line)  # one write of one line: appends from several workers do not interleave
            finally:
                os.close(fd)
        except OSError as exc:
            raise ComneckError(f"cannot write {self.path}: {exc.strerror or exc}") from None
        if self._known is not None:
            self._known.add(key)


def check_replaceable(target: Path, written: Written, force: bool) -> None:
    """Refuse, before an input's work, an output this job must not touch: one that is not a regular file (with or
    without ``force``), or, without ``force``, an existing file that no batch job wrote: a clash, not finished work."""
    refuse_special(target)
    if not force and target.exists() and not written.owns(target):
        raise ComneckError(f"{target} exists and was not written by a batch job; move it away, or pass `force` to "
                           "replace it", params=["force"])
