"""Files in, files out: ``comneck encode`` and ``decode`` over the coding API, and the per-input steps the batch
engines share with them.

Each function takes every input of a run, plans every output name before the first is written
(``outputs.without_clashes``), and then goes input by input: an input that fails is handed to ``report.fail`` and the
others go on; warnings go to ``report.warn``; ``on_progress(done, total)`` follows the inputs. Nothing is printed.
"""

from __future__ import annotations

import io
import sys
import warnings
from pathlib import Path
from typing import Any, BinaryIO, Callable, Sequence

import numpy as np

from comneck_cli.formats import CnkError, Limits, Record, iter_records, pack

from comneck_cli.coding.decoder import CodecCache, decode
from comneck_cli.coding.device import split_on_oom
from comneck_cli.coding.encoder import ImageEncoder
from comneck_cli.errors import ComneckError, InputError
from comneck_cli.io.images import encode_image_bytes, image_format_for, read_image, read_image_stream, size_label
from comneck_cli.io.outputs import (NO_RECORDS, STDIO, Report, decoded_name, is_dir_target, numbered, read_problem,
                                    refuse_existing, refuse_input, without_clashes, write_atomic, write_stdout)

Progress = Callable[[int, int], None]


def _label(name: str) -> str:
    return "stdin" if name == STDIO else name


def _read_bytes(name: str) -> bytes:
    """The bytes of an input file; an unreadable file is an InputError. (Stdin is read as it arrives: see
    :func:`_stdin`.)"""
    try:
        return Path(name).read_bytes()
    except OSError as exc:
        raise InputError(read_problem(exc)) from None


class Prefixed:
    """A binary stream whose first bytes ``head`` were already read from ``stream``: they, then the rest."""

    def __init__(self, head: bytes, stream: BinaryIO) -> None:
        self.head, self.stream = head, stream

    def read(self, size: int = -1) -> bytes:
        if not self.head:
            return self.stream.read(size)
        cut = len(self.head) if size < 0 else size
        part, self.head = self.head[:cut], self.head[cut:]
        return part


def _stdin() -> tuple[bytes, BinaryIO]:
    """(stdin's first bytes, enough to tell a ``.cnk`` stream from an image; all of stdin as a stream, those bytes
    included): stdin is parsed as it arrives, never read whole first (``decode - < /dev/zero`` stops at byte 1)."""
    from comneck_cli.formats import MAGIC

    head = sys.stdin.buffer.read(len(MAGIC))
    return head, Prefixed(head, sys.stdin.buffer)


def stepper(on_progress: Progress | None, total: int) -> Callable[[], None]:
    """``advance()``: one more of ``total`` inputs is finished, told to ``on_progress(done, total)``."""
    done = 0

    def advance() -> None:
        nonlocal done
        done += 1
        if on_progress is not None:
            on_progress(done, total)

    return advance


# --------------------------------------------------------------------------- per-input steps
def read_image_file(source: str | Path | bytes, name: str, max_pixels: int | None = None, limits: Limits | None = None
                    ) -> tuple[np.ndarray, list[str]]:
    """``images.read_image`` with its conversion warnings returned as messages instead of printed."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        image = read_image(source, name=name, max_pixels=max_pixels, limits=limits)
    return image, [str(w.message) for w in caught]


def encode_images(images: Sequence[np.ndarray], encoder: ImageEncoder, names: Sequence[str] | None = None
                  ) -> list[bytes]:
    """Packed ``.cnk`` records of uint8 H×W×3 images by ``encoder`` (plain images share a g_a pass per padded size);
    a batch that runs out of GPU memory is split (``split_on_oom``; ``names`` label the one that fails)."""
    if not images:
        return []
    labelled = list(zip(names or [f"image {i + 1}" for i in range(len(images))], images))
    records = split_on_oom(lambda part: encoder([im for _, im in part]), labelled,
                           lambda item: f"{item[0]} ({size_label(item[1])})")
    return [pack(record) for record in records]


def decode_record_bytes(record: Record, cache: CodecCache, fmt: str) -> bytes:
    """One record -> ``g_s`` -> image file bytes in Pillow format ``fmt`` (``PNG``, ``WEBP``...)."""
    return encode_image_bytes(decode(record, cache.for_record(record)), fmt)


def parse_records(source: str, data: bytes | BinaryIO, report: Report, limits: Limits | None = None
                  ) -> list[tuple[str, str, int, int, Record]]:
    """Every good record of one input (bytes, or a stream read one record at a time) as (label, source, record
    number, records in source, Record). A damaged record is reported failed and the others are kept; damage to the
    framing ends the input there; an empty input is reported failed."""
    found: list[Record | CnkError] = []  # in stream order, so that records keep their numbers
    try:
        found.extend(iter_records(io.BytesIO(data) if isinstance(data, bytes) else data, limits,
                                  on_damaged=found.append))
        if not found:
            raise CnkError(NO_RECORDS)
    except CnkError as exc:  # a ComneckError already, its `max_pixels` kept for the flag
        found.append(exc)
    jobs = []
    for n, record in enumerate(found, start=1):
        if isinstance(record, CnkError):
            report.fail(source, record)  # the message names the record and its byte offset
        else:
            jobs.append((source if len(found) == 1 else f"{source} record {n}", source, n, len(found), record))
    return jobs


def read_records(sources: Sequence[str], report: Report, limits: Limits | None = None
                 ) -> list[tuple[str, str, int, int, Record]]:
    """:func:`parse_records` of every input file (``-``: stdin), in order; a file that cannot be read fails alone."""
    jobs = []
    for source in sources:
        try:
            data = _stdin()[1] if source == STDIO else _read_bytes(source)
        except ComneckError as exc:
            report.fail(source, exc)
            continue
        jobs.extend(parse_records(source, data, report, limits))
    return jobs


# --------------------------------------------------------------------------- encode
def encode_target(name: str, output: str | None) -> Path | None:
    """Where ``comneck encode`` writes input ``name``: beside it, into the folder ``output``, or (None) into the one
    stream of ``output`` (a file, or stdout)."""
    if output is None and name != STDIO:
        return Path(name).with_suffix(".cnk")
    if is_dir_target(output):
        return Path(output) / f"{'stdin' if name == STDIO else Path(name).stem}.cnk"
    return None


def encode_files(images: Sequence[str], output: str | None, encoder: Callable[[], ImageEncoder], report: Report, *,
                 force: bool = False, limits: Limits | None = None, batch_size: int = 1,
                 on_progress: Progress | None = None) -> None:
    """Compress image files (``-``: stdin), frame folders and videos into ``.cnk`` records (see
    :func:`encode_target`); a frame folder or video becomes one stream, written after the images.

    ``encoder()`` gives the :class:`ImageEncoder`; it is called for the first image that could be read, so an input
    that every reader refuses loads no model. Up to ``batch_size`` images share a g_a pass. ``limits`` bound the
    images and frames read (default: the environment's).
    """
    from comneck_cli.codecs import bpp_out_of_reach
    from comneck_cli.io.video import frames, is_video_source

    def encode_part(part: list) -> list:
        return encoder()([image for _, image in part])

    if output not in (None, STDIO) and not is_dir_target(output):
        refuse_input(Path(output), images)  # the one stream file must not take an input's place
    images = without_clashes(images, lambda name: (_label(name), [encode_target(name, output)]), report,
                             inputs=images)
    videos = [name for name in images if name != STDIO and is_video_source(name)]  # one stream per video
    images = [name for name in images if name not in videos]
    gathered: list[bytes] = []  # for a single output stream (file or stdout)
    advance = stepper(on_progress, len(images))
    for start in range(0, len(images), batch_size):
        batch = []  # (name, image) of this chunk that could be read
        for name in images[start : start + batch_size]:
            try:
                refuse_existing(encode_target(name, output), force)
                image, notes = read_image_file(read_image_stream(sys.stdin.buffer, _label(name), limits)
                                               if name == STDIO else Path(name),
                                               _label(name), limits=limits)
                for note in notes:
                    report.warn(note)
                batch.append((name, image))
            except ComneckError as exc:
                report.fail(_label(name), exc)
                advance()
        records = split_on_oom(encode_part, batch, lambda item: f"{item[0]} ({size_label(item[1])})") if batch else []
        for (name, _), record in zip(batch, records):
            target_encoder = encoder()
            if target_encoder.bpp_target:
                missed = bpp_out_of_reach(target_encoder.codec.spec, record.rate, record.bits_per_pixel,
                                          target_encoder.bpp_target)
                if missed:
                    report.warn(f"{name}: {missed}; wrote that record")
            try:
                target = encode_target(name, output)
                if target is None:
                    gathered.append(pack(record))
                else:
                    write_atomic(target, pack(record), force=force)
            except ComneckError as exc:
                report.fail(name, exc)
            advance()
    for name in videos:  # after the images: a video's records stay together, in frame order
        try:
            target = encode_target(name, output)
            refuse_existing(target, force)
            packed = [pack(encode_part([(name, frame)])[0]) for frame in frames(name, limits=limits)]
            if target is None:
                gathered.extend(packed)
            else:
                write_atomic(target, b"".join(packed), force=force)
        except ComneckError as exc:
            report.fail(name, exc)
    if gathered:
        if output in (None, STDIO):
            write_stdout(b"".join(gathered))
        else:
            write_atomic(Path(output), b"".join(gathered), force=force)


# --------------------------------------------------------------------------- decode
def decode_files(files: Sequence[str], output: str | None, cache: CodecCache, report: Report, *,
                 force: bool = False, limits: Limits | None = None, on_progress: Progress | None = None) -> None:
    """Reconstruct the records of ``.cnk`` files (``-``: stdin) through g_s into images: ``NAME.decoded.png`` beside
    each input, into the folder ``output``, to the file ``output`` (numbered when there are several), or to stdout.
    """
    to_dir = is_dir_target(output)
    jobs = read_records(files, report, limits)
    many = len(jobs) > 1

    def target_for(index: int, source: str, record_no: int, count: int) -> Path | None:
        if output is None and source != STDIO:
            target = decoded_name(Path(source))
            return numbered(target, record_no) if count > 1 else target
        if to_dir:
            stem = "stdin" if source == STDIO else Path(source).stem
            return Path(output) / (f"{stem}_{record_no:04d}.png" if count > 1 else f"{stem}.png")
        if output in (None, STDIO):
            return None
        return numbered(Path(output), index) if many else Path(output)

    def claim(entry: tuple) -> tuple[str, list[Path | None]]:
        index, (label, source, record_no, count, _) = entry
        return label, [target_for(index, source, record_no, count)]

    # Every record's name is planned before the first is written: a stream's numbered outputs must not
    # replace those of another input (a.cnk's second record and a_0002.cnk, both -> OUT/a_0002.png).
    planned = without_clashes(list(enumerate(jobs, start=1)), claim, report, inputs=files)
    for done, (index, (label, source, record_no, count, record)) in enumerate(planned, start=1):
        try:
            target = target_for(index, source, record_no, count)
            fmt = image_format_for(target)
            codec = cache.for_record(record)
            image = decode(record, codec)
            data = encode_image_bytes(image, fmt)
            if target is None:
                write_stdout(data)
            else:
                write_atomic(target, data, force=force)
        except ComneckError as exc:
            report.fail(label, exc)
        if on_progress is not None:
            on_progress(done, len(planned))


def read_inputs(sources: Sequence[str], report: Report, *, images: bool, limits: Limits | None = None
                ) -> list[tuple[str, str, str, Any]]:
    """(label, output stem, kind, Record or image array) per record of each ``.cnk`` input, or with ``images``
    per image input; an input of the other kind, or unreadable, fails alone."""
    from comneck_cli.formats import MAGIC

    items = []
    for source in sources:
        stem = "stdin" if source == STDIO else Path(source).stem
        try:
            data = _stdin() if source == STDIO else _read_bytes(source)
            is_cnk = (data[0] if isinstance(data, tuple) else data).startswith(MAGIC)
            if isinstance(data, tuple):  # stdin: a .cnk stream is parsed as it arrives, an image read with a bound
                data = data[1] if is_cnk or not images else read_image_stream(data[1], source, limits)
            if images and is_cnk:
                raise InputError("`via` uncompressed needs an image, not a .cnk file", params=["via"])
            if not images and not is_cnk:
                raise InputError("not a .cnk file; to get features of an image use `via` uncompressed",
                                 params=["via"])
            if images:
                image, notes = read_image_file(data, source, limits=limits)
                for note in notes:
                    report.warn(note)
                items.append((source, stem, "image", image))
                continue
        except ComneckError as exc:
            report.fail(source, exc)
            continue
        for label, _, number, count, record in parse_records(source, data, report, limits):
            items.append((label, f"{stem}_{number:04d}" if count > 1 else stem, "record", record))
    return items
