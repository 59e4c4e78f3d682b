"""The ``comneck`` command line: thin Click commands over the library API.

Importing this module must not import torch (``comneck --help`` and ``comneck info`` stay fast):
heavy modules are imported inside the commands that need them.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import signal
import sys
import traceback
import warnings
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence, TypeVar

import click
from comneck_cli.formats import CnkError  # stdlib-only, like the registry: importing the CLI still imports no torch
from comneck_cli.weights import WeightsError

from comneck_cli.defaults import DEFAULT_CODEC
from comneck_cli.errors import ComneckError
from comneck_cli.cli.options import CODEC_CHOICE, check_codec_usage, clip_options, guidance_options
from comneck_cli.io.outputs import clashes, is_dir_target, refuse_terminal
from comneck_cli.clip.presets import PRESETS

STDIO = "-"
NO_RECORDS = "no records in file (empty input)"  # decode, features and info agree on an empty .cnk
T = TypeVar("T")


@dataclass
class Run:
    """Per-invocation settings shared by the commands, and the tally of failed inputs."""

    quiet: bool = False
    debug: bool = False
    fail_fast: bool = False
    force: bool = False
    device: str = "auto"
    max_pixels: int | None = None
    failures: list[str] = field(default_factory=list)

    def limits(self):
        """The environment's limits with --max-pixels applied: one bound for images, frames, records and features."""
        from comneck_cli.io.images import input_limits

        return input_limits(max_pixels=self.max_pixels)

    def warn(self, message: str) -> None:
        if not self.quiet:
            click.echo(f"comneck: warning: {message}", err=True)

    def fail(self, label: str, exc: BaseException) -> None:
        """Record one failed input; go on unless --fail-fast."""
        message = f"{label}: {exc}" if label and not str(exc).startswith(label) else str(exc)
        if self.debug:
            traceback.print_exception(exc, file=sys.stderr)
        click.echo(f"comneck: error: {message}", err=True)
        self.failures.append(message)
        if self.fail_fast:
            raise SystemExit(1)

    def exit(self) -> None:
        raise SystemExit(1 if self.failures else 0)


def common_options(func: Callable) -> Callable:
    """Options every data command takes."""

    @click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True,
                  help="Where the networks run (the codec's transforms, the neck, CLIP); entropy coding always runs "
                       "on the CPU.")
    @click.option("--quiet", is_flag=True, help="No progress bar, no warnings; errors still print.")
    @click.option("--force", is_flag=True, help="Overwrite existing output files.")
    @click.option("--fail-fast", is_flag=True, help="Stop at the first input that fails instead of going on.")
    @click.option("--debug", is_flag=True, help="Show tracebacks for errors.")
    @click.option("--max-pixels", type=click.IntRange(1), default=None,
                  help="Refuse images and records with more pixels than this (decompression-bomb protection). "
                       "[default: $COMNECK_MAX_PIXELS or 89478485]")
    @functools.wraps(func)
    def wrapper(*args, device, quiet, force, fail_fast, debug, max_pixels, **kwargs):
        run = Run(quiet=quiet, debug=debug, fail_fast=fail_fast, force=force, device=device, max_pixels=max_pixels)
        with _guard(run), _terminate_as_interrupt():
            func(run, *args, **kwargs)
        run.exit()

    return wrapper


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so that every ``finally`` (temp-file cleanup) runs."""


@contextmanager
def _terminate_as_interrupt() -> Iterator[None]:
    def handler(signum, frame):
        raise Terminated()

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread (embedded use): leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextmanager
def _guard(run: Run) -> Iterator[None]:
    """Turn user-facing errors into one line and exit 1; Ctrl-C / SIGTERM into a clear message and 130 / 143."""
    try:
        yield
    except (ComneckError, CnkError, WeightsError) as exc:  # the sentences of the library, the container, the registry
        if run.debug:
            traceback.print_exc()
        click.echo(f"comneck: error: {exc}", err=True)
        raise SystemExit(1) from None
    except KeyboardInterrupt as exc:
        click.echo("comneck: interrupted; outputs already written are complete, no partial file was left",
                   err=True)
        raise SystemExit(143 if isinstance(exc, Terminated) else 130) from None


@contextmanager
def progress(run: Run, total: int, label: str) -> Iterator[Callable[[], None]]:
    """A rich progress bar on stderr, only on a terminal and without --quiet; yields ``advance()``."""
    if run.quiet or total < 2 or not sys.stderr.isatty():
        yield lambda: None
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    with Progress(TextColumn(label), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                  console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task(label, total=total)
        yield lambda: bar.advance(task)


def _quiet_imports() -> None:
    # compressai imports torch.jit.script decorators that warn on every start: noise for users.
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.jit")
    warnings.filterwarnings("ignore", message=r".*torch\.jit\.script.*")


@click.group(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.version_option(package_name="comneck")
def main() -> None:
    """Compress images for multimodal LLMs: learned codecs, .cnk files, CLIP features from latents."""


# --------------------------------------------------------------------------- encode
@main.command()
@click.argument("images", nargs=-1, required=True, type=click.Path(path_type=str, allow_dash=True))
@click.option("-q", "--quality", type=click.IntRange(1, 255), default=3, show_default=True,
              help="Codec quality level (higher = more bits); the codec's range is checked.")
@click.option("--codec", type=CODEC_CHOICE, default=DEFAULT_CODEC, show_default=True,
              help="Codec name (see `comneck codecs`).")
@click.option("--weights", default=None,
              help="Codec weights file or registry name (e.g. mbt2018-mean-q3-d2) instead of CODEC-qQ / the zoo.")
@click.option("--rate", type=float, default=None,
              help="Variable-rate codecs: any rate R between the lowest and highest level (e.g. 3.4); overrides -q.")
@click.option("--bpp-target", type=float, default=None,
              help="Variable-rate codecs: search each image's rate so the record has this many bits per pixel "
                   "(within 5%; the container is counted). A target beyond the codec's highest (or lowest) rate "
                   "writes that rate's record and warns with the bpp reached.")
@guidance_options
@click.option("--batch-size", type=click.IntRange(1, 1024), default=1, show_default=True,
              help="Images per g_a forward pass (same-size images batch; entropy coding stays per image).")
@click.option("-o", "--output", default=None, type=click.Path(path_type=str, allow_dash=True),
              help="Output .cnk file (all records in one stream), a folder (one file per image), or - for stdout. "
                   "Default: beside each image.")
@common_options
def encode(run: Run, images: tuple[str, ...], quality: int, codec: str, weights: str | None, rate: float | None,
           bpp_target: float | None, semantic: bool, semantic_strength: float | None, clip_model: str, clip_tag: str,
           clip_weights: Path | None, pre_edit: str | None, batch_size: int, output: str | None) -> None:
    """Compress IMAGES (PNG, JPEG, WebP, TIFF, or - for stdin) into .cnk records.

    A folder of frames or a video file (.mp4 .mkv .avi .mov .webm ...) becomes one stream with a record per frame.
    """
    check_codec_usage(codec, quality, rate, bpp_target)
    if output not in (None, STDIO) and not is_dir_target(output):
        check_target(Path(output), run.force)  # before torch and the model, not after them
    if output == STDIO or (output is None and STDIO in images):
        refuse_terminal(".cnk records")
    _quiet_imports()
    from comneck_cli import coding as api
    from comneck_cli.codecs import bpp_out_of_reach, get_spec
    from comneck_cli.io.images import read_image, size_label
    from comneck_cli.io.outputs import write_atomic, write_stdout

    spec = get_spec(codec)
    api.check_guidance(spec, semantic, semantic_strength, pre_edit)  # before any model loads
    device = api.resolve_device(run.device)
    from comneck_cli.formats import pack

    @functools.cache
    def encoder() -> api.ImageEncoder:
        # Loaded for the first image that passed the size limits: an input every reader would refuse loads no model.
        loaded = api.load_codec(codec, quality, weights=weights, device=device)
        return api.ImageEncoder.load(loaded if rate is None else loaded.at_rate(rate), bpp_target=bpp_target,
                                     semantic=semantic, semantic_strength=semantic_strength, clip_model=clip_model,
                                     clip_tag=clip_tag, clip_weights=clip_weights, pre_edit=pre_edit, device=device,
                                     limits=run.limits())

    def encode_part(part: list) -> list:
        return encoder()([image for _, image in part])

    to_dir = is_dir_target(output)
    gathered: list[bytes] = []  # for a single output stream (file or stdout)

    def target_for(name: str) -> Path | None:
        if output is None and name != STDIO:
            return Path(name).with_suffix(".cnk")
        if to_dir:
            return Path(output) / f"{'stdin' if name == STDIO else Path(name).stem}.cnk"
        return None

    images = tuple(_without_clashes(run, images, lambda name: ("stdin" if name == STDIO else name,
                                                                [target_for(name)])))
    from comneck_cli.io.video import is_video_source

    videos = [name for name in images if name != STDIO and is_video_source(name)]  # one stream per video
    images = tuple(name for name in images if name not in videos)
    with progress(run, len(images), "encoding") as advance:
        for start in range(0, len(images), batch_size):
            batch = []  # (name, image) of this chunk that could be read
            for name in images[start : start + batch_size]:
                try:
                    target = target_for(name)
                    if target is not None and target.exists() and not run.force:
                        raise ComneckError(f"{target} already exists; pass --force to overwrite it")
                    with warnings.catch_warnings(record=True) as caught:
                        warnings.simplefilter("always")
                        image = read_image(sys.stdin.buffer.read() if name == STDIO else Path(name),
                                           name="stdin" if name == STDIO else name, max_pixels=run.max_pixels)
                    for w in caught:
                        run.warn(str(w.message))
                    batch.append((name, image))
                except ComneckError as exc:
                    run.fail("stdin" if name == STDIO else name, exc)
                    advance()
            records = api.split_on_oom(
                encode_part, batch,
                lambda item: f"{item[0]} ({size_label(item[1])})",
            ) if batch else []
            for (name, _), record in zip(batch, records):
                missed = bpp_target and bpp_out_of_reach(spec, record.rate, record.bits_per_pixel, bpp_target)
                if missed:
                    run.warn(f"{name}: {missed}; wrote that record")
                try:
                    target = target_for(name)
                    if target is None:
                        gathered.append(pack(record))
                    else:
                        write_atomic(target, pack(record), force=run.force)
                except ComneckError as exc:
                    run.fail(name, exc)
                advance()
    for name in videos:  # after the images: a video's records stay together, in frame order
        try:
            _encode_video(run, name, target_for(name), encode_part, gathered)
        except ComneckError as exc:
            run.fail(name, exc)
    if gathered:
        if output in (None, STDIO):
            write_stdout(b"".join(gathered))
        else:
            write_atomic(Path(output), b"".join(gathered), force=run.force)


def _without_clashes(run: Run, entries: Sequence[T], claim: Callable[[T], tuple[str, list[Path | None]]]
                     ) -> list[T]:
    """``entries`` (inputs, or decode's records) less those that would write an output that an earlier entry of
    this run writes (``outputs.clashes``): each refused one fails, naming the other. ``claim(entry)`` gives its
    label and output paths (None: stdout or the one shared stream, which cannot clash)."""
    claims = [(label, [t for t in targets if t is not None]) for label, targets in map(claim, entries)]
    refused = clashes(claims)
    for index, reason in refused.items():
        run.fail(claims[index][0], ComneckError(reason))
    return [entry for index, entry in enumerate(entries) if index not in refused]


def check_target(target: Path, force: bool) -> None:
    """Refuse an output file that exists (without --force) or whose folder cannot be written, before any model
    loads: the same refusal after minutes of loading and coding would waste them."""
    if target.exists() and not force:
        raise ComneckError(f"{target} already exists; pass --force to overwrite it")
    folder = next((p for p in target.absolute().parents if p.exists()), Path("/"))
    if not folder.is_dir() or not os.access(folder, os.W_OK | os.X_OK):
        raise ComneckError(f"cannot write {target}: {folder} is not a writable folder")


def _encode_video(run: Run, name: str, target: Path | None, encode_part: Callable, gathered: list[bytes]) -> None:
    """A frame folder or video file -> one record per frame, frame by frame, to ``target`` or the shared stream."""
    from comneck_cli.formats import pack

    from comneck_cli.io.outputs import write_atomic
    from comneck_cli.io.video import frames

    if target is not None and target.exists() and not run.force:
        raise ComneckError(f"{target} already exists; pass --force to overwrite it")
    packed = [pack(encode_part([(name, frame)])[0]) for frame in frames(name, max_pixels=run.max_pixels)]
    if target is None:
        gathered.extend(packed)
    else:
        write_atomic(target, b"".join(packed), force=run.force)


# --------------------------------------------------------------------------- decode
@main.command()
@click.argument("files", nargs=-1, required=True, type=click.Path(path_type=str, allow_dash=True))
@click.option("-o", "--output", default=None, type=click.Path(path_type=str, allow_dash=True),
              help="Output image (format from the extension: .png .jpg .webp .tif), a folder, or - for PNG on "
                   "stdout. Several records to one name are numbered name_0001.png... Default: NAME.decoded.png "
                   "beside each NAME.cnk (never the name of the image it was coded from).")
@click.option("--weights", default=None,
              help="Codec weights file or registry name; must be what encoded the records (checked by digest).")
@click.option("--for", "audience", type=click.Choice(["human", "mllm"]), default="human", show_default=True,
              help="human: g_s's reconstruction; mllm: repaired for MLLMs by the decoder adapter (CoTAM).")
@click.option("--adapter", default=None,
              help="With --for mllm: adapter file or registry name. Default: CODEC-adapter / CODEC-qQUALITY-adapter.")
@common_options
def decode(run: Run, files: tuple[str, ...], output: str | None, weights: str | None, audience: str,
           adapter: str | None) -> None:
    """Reconstruct images from .cnk FILES (or - for stdin) through the synthesis transform g_s."""
    if output == STDIO or (output is None and STDIO in files):
        refuse_terminal("PNG images")  # before torch and the models load
    _quiet_imports()
    from comneck_cli import coding as api
    from comneck_cli.io.images import encode_image_bytes, image_format_for
    from comneck_cli.io.outputs import decoded_name, numbered, write_atomic, write_stdout

    cache = api.CodecCache(api.resolve_device(run.device), weights)
    if adapter is not None and audience != "mllm":
        raise ComneckError("--adapter needs --for mllm")
    adapters: dict = {}  # adapter file -> (model, info), loaded once

    def adapted(image, codec):
        from comneck_cli.models.adapter import adapt, load_adapter, resolve_adapter

        path = resolve_adapter(adapter, codec)
        if path not in adapters:
            adapters[path] = load_adapter(path, cache.device)
        model, info = adapters[path]
        info.check_codec(codec, path)
        return adapt(model, image)

    to_dir = is_dir_target(output)
    jobs = _records(run, files)
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
    planned = _without_clashes(run, list(enumerate(jobs, start=1)), claim)
    with progress(run, len(planned), "decoding") as advance:
        for index, (label, source, record_no, count, record) in planned:
            try:
                target = target_for(index, source, record_no, count)
                fmt = image_format_for(target)
                codec = cache.for_record(record)
                image = api.decode(record, codec)
                if audience == "mllm":
                    image = adapted(image, codec)
                data = encode_image_bytes(image, fmt)
                if target is None:
                    write_stdout(data)
                else:
                    write_atomic(target, data, force=run.force)
            except ComneckError as exc:
                run.fail(label, exc)
            advance()


def _records(run: Run, files: tuple[str, ...]) -> list[tuple[str, str, int, int, object]]:
    """Parse every input into (label, source, record number, records in source, Record); a bad file fails alone."""
    jobs = []
    for source in files:
        try:
            data = sys.stdin.buffer.read() if source == STDIO else Path(source).read_bytes()
        except OSError as exc:
            run.fail(source, ComneckError(exc.strerror or str(exc)))
            continue
        jobs.extend(_parse_records(run, source, data))
    return jobs


def _parse_records(run: Run, source: str, data: bytes) -> list[tuple[str, str, int, int, object]]:
    import io

    from comneck_cli.formats import CnkError, iter_records

    try:
        found = list(iter_records(io.BytesIO(data), run.limits()))
        if not found:
            raise CnkError(NO_RECORDS)
    except CnkError as exc:
        run.fail(source, ComneckError(str(exc)))
        return []
    return [(source if len(found) == 1 else f"{source} record {n}", source, n, len(found), record)
            for n, record in enumerate(found, start=1)]


# --------------------------------------------------------------------------- features
@main.command()
@click.argument("inputs", nargs=-1, required=True, type=click.Path(path_type=str, allow_dash=True))
@click.option("-o", "--output", required=True, type=click.Path(path_type=str),
              help="A .pt, .safetensors or .npy file (all inputs stacked along dim 0), or a folder (one file "
                   "per input, in --format).")
@click.option("--via", type=click.Choice(["neck", "reconstruction", "uncompressed"]), default="neck",
              show_default=True, help="neck: .cnk latents -> neck -> C' (no image decoding); reconstruction: "
              ".cnk -> g_s -> full CLIP (baseline); uncompressed: image -> full CLIP, C(x) (upper bound).")
@click.option("--neck", default=None, help="Neck file or registry name. Default: the registry's "
              "CODEC-qQUALITY-neck for each record. Its CLIP model, weights tag and split k are used.")
@click.option("--for", "family", type=click.Choice(list(PRESETS)), default=None,
              help="Exactly what that MLLM family reads: sets --layer/--select, and for the reference paths the "
                   "CLIP tower, resolution and preprocessing (see the README's table).")
@click.option("--layer", type=int, default=-2, show_default=True,
              help="Hidden state to return, Hugging Face numbering (0 = after ln_pre, i = output of block i, "
                   "-2 = penultimate block, what LLaVA reads).")
@click.option("--select", type=click.Choice(["patch", "cls", "all", "pooled", "projected"]), default="patch",
              show_default=True, help="patch: tokens without CLS; cls; all tokens; pooled: the projected image "
              "embedding; projected: every last-layer token after ln_post and the projection (the last two "
              "ignore --layer).")
@click.option("--batch-size", type=click.IntRange(1, 4096), default=8, show_default=True,
              help="Inputs per forward pass through the neck and CLIP.")
@click.option("--format", "fmt", type=click.Choice(["pt", "safetensors", "npy"]), default="pt", show_default=True,
              help="File type when -o is a folder.")
@click.option("--weights", default=None,
              help="Codec weights file or registry name for decoding the records (checked by digest).")
@clip_options("open_clip model for --via reconstruction/uncompressed when no neck is given.",
              "Local CLIP weights file instead of the registry / open_clip cache.")
@common_options
def features(run: Run, inputs: tuple[str, ...], output: str, via: str, neck: str | None, family: str | None,
             layer: int, select: str, batch_size: int, fmt: str, weights: str | None, clip_model: str, clip_tag: str,
             clip_weights: Path | None) -> None:
    """CLIP features of INPUTS (.cnk files, images with --via uncompressed, or - for stdin) for MLLMs.

    The default is what LLaVA-style MLLMs read: the penultimate hidden state's patch tokens, (N, 256, 1024)
    for ViT-L/14 at 224, straight from the compressed latents without decoding the image.
    """
    if not is_dir_target(output):
        check_target(Path(output), run.force)  # before torch, CLIP and the neck
    _quiet_imports()
    from comneck_cli import coding as api
    from comneck_cli.features import FeatureExtractor, metadata, resolve_neck, save_features
    from comneck_cli.io.images import size_label

    layer, select, clip_model, clip_tag, pad_to_square = apply_preset(family, layer, select, clip_model, clip_tag)
    device = api.resolve_device(run.device)
    items = _feature_inputs(run, inputs, want_images=via == "uncompressed")
    if is_dir_target(output):
        items = _without_clashes(run, items, lambda item: (item[0], [Path(output) / f"{item[1]}.{fmt}"]))
    if not items:
        return
    cache = api.CodecCache(device, weights)
    extractors: dict[object, FeatureExtractor] = {}

    def extractor_for(record) -> FeatureExtractor:
        if via == "neck" or neck is not None:
            path = resolve_neck(neck, record)
            if path not in extractors:
                extractors[path] = FeatureExtractor.for_neck(path, clip_weights=clip_weights, device=device)
                info = extractors[path].info
                if family is not None and info.clip_model != clip_model:
                    raise ComneckError(f"neck {path} was trained for CLIP {info.clip_model}, but --for {family} "
                                       f"reads {clip_model}; use a neck trained for {clip_model}")
            extractors[path].pad_to_square = pad_to_square
            return extractors[path]
        if None not in extractors:
            extractors[None] = FeatureExtractor.for_clip(clip_model, clip_tag, clip_weights=clip_weights,
                                                         device=device)
            extractors[None].pad_to_square = pad_to_square
        return extractors[None]

    to_dir = is_dir_target(output)
    results: list = []  # (label, target or None, tensor, meta) in input order
    with progress(run, len(items), "features") as advance:
        for start in range(0, len(items), batch_size):
            batch = items[start : start + batch_size]
            prepared = []  # (position, item, extractor, y_hat or image)
            for position, item in enumerate(batch, start=start):
                label, _, _, payload = item
                try:
                    if via == "uncompressed":
                        prepared.append((position, item, extractor_for(None), payload))
                        continue
                    codec = cache.for_record(payload)
                    ex = extractor_for(payload)
                    if via == "neck":
                        ex.check(payload, codec)
                        prepared.append((position, item, ex, api.decode_latents(payload, codec)))
                    else:
                        prepared.append((position, item, ex, api.decode(payload, codec)))
                except ComneckError as exc:
                    run.fail(label, exc)
                    advance()
            # One forward pass per (extractor, latent grid) group.
            groups: dict[tuple, list] = {}
            for entry in prepared:
                key = (id(entry[2]), tuple(entry[3].shape[-2:]) if via == "neck" else ())
                groups.setdefault(key, []).append(entry)
            for group in groups.values():
                ex = group[0][2]
                forward = ex.from_latents if via == "neck" else ex.from_images
                try:
                    with warnings.catch_warnings(record=True) as caught:  # e.g. the neck interpolating positions
                        warnings.simplefilter("always")
                        feats = api.split_on_oom(
                            lambda part: list(forward([e[3] for e in part], layer, select)), group,
                            lambda e: f"{e[1][0]} ({size_label(e[3])})",
                        )
                    for w in caught:
                        run.warn(str(w.message))
                except ComneckError as exc:
                    for e in group:
                        run.fail(e[1][0], exc)
                        advance()
                    continue
                for (position, (label, stem, _, _), _, _), f in zip(group, feats):
                    results.append((position, label, stem, f, metadata(ex, via, layer, select, label)))
                    advance()
    results.sort(key=lambda r: r[0])
    if to_dir:
        for _, label, stem, tensor, meta in results:
            try:
                save_features(tensor.unsqueeze(0), Path(output) / f"{stem}.{fmt}", meta, force=run.force)
            except ComneckError as exc:
                run.fail(label, exc)
    elif results:
        shapes = {tuple(r[3].shape) for r in results}
        if len(shapes) > 1:
            raise ComneckError(
                f"inputs give features of different shapes {sorted(shapes)}; write them to a folder (-o DIR/)"
            )
        import torch

        meta = dict(results[0][4], source=",".join(r[1] for r in results))
        save_features(torch.stack([r[3] for r in results]), Path(output), meta, force=run.force)


def apply_preset(family: str | None, layer: int, select: str, clip_model: str, clip_tag: str
                 ) -> tuple[int, str, str, str, bool]:
    """``--for FAMILY``: the family's layer, selection, tower and padding; a contradicting explicit option is a
    usage error. Returns (layer, select, clip_model, clip_tag, pad_to_square)."""
    if family is None:
        return layer, select, clip_model, clip_tag, False
    from comneck_cli.clip.presets import get_preset

    ctx = click.get_current_context()
    preset = get_preset(family)
    for name, value in (("layer", layer), ("select", select), ("clip_model", clip_model), ("clip_tag", clip_tag)):
        if ctx.get_parameter_source(name) == click.core.ParameterSource.COMMANDLINE and value != getattr(preset, name):
            flag = "--" + name.replace("_", "-")
            raise click.UsageError(f"--for {family} sets {flag} {getattr(preset, name)}; drop {flag} {value}")
    return preset.layer, preset.select, preset.clip_model, preset.clip_tag, preset.pad_to_square


def _feature_inputs(run: Run, inputs: tuple[str, ...], *, want_images: bool) -> list[tuple[str, str, str, object]]:
    """(label, output stem, kind, Record or image array) per record or image; unreadable inputs fail alone."""
    from comneck_cli.formats import MAGIC

    from comneck_cli.io.images import read_image

    items = []
    for source in inputs:
        stem = "stdin" if source == STDIO else Path(source).stem
        try:
            data = sys.stdin.buffer.read() if source == STDIO else Path(source).read_bytes()
        except OSError as exc:
            run.fail(source, ComneckError(exc.strerror or str(exc)))
            continue
        is_cnk = data.startswith(MAGIC)
        if want_images:
            if is_cnk:
                run.fail(source, ComneckError("--via uncompressed needs an image, not a .cnk file"))
                continue
            try:
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    image = read_image(data, name=source, max_pixels=run.max_pixels)
                for w in caught:
                    run.warn(str(w.message))
            except ComneckError as exc:
                run.fail(source, exc)
                continue
            items.append((source, stem, "image", image))
            continue
        if not is_cnk:
            run.fail(source, ComneckError("not a .cnk file; to get features of an image use --via uncompressed"))
            continue
        for label, _, number, count, record in _parse_records(run, source, data):
            items.append((label, f"{stem}_{number:04d}" if count > 1 else stem, "record", record))
    return items


# --------------------------------------------------------------------------- info
@main.command()
@click.argument("files", nargs=-1, required=True, type=click.Path(path_type=str, allow_dash=True))
@click.option("--json", "as_json", is_flag=True, help="Print one JSON list of records instead of a table.")
@click.option("--debug", is_flag=True, help="Show tracebacks for errors.")
def info(files: tuple[str, ...], as_json: bool, debug: bool) -> None:
    """Show the header of each record in .cnk FILES: codec, size, strings, payload, overhead, bpp."""
    from comneck_cli.formats import CnkError, iter_records, pack

    run = Run(debug=debug)
    rows = []
    for source in files:
        before = len(rows)
        try:
            with nullcontext(sys.stdin.buffer) if source == STDIO else open(source, "rb") as f:
                for number, record in enumerate(iter_records(f), start=1):
                    total = len(pack(record))
                    rows.append({
                        "file": source,
                        "record": number,
                        "codec": record.codec_name or f"unknown ({record.codec_id})",
                        "codec_id": record.codec_id,
                        "quality": record.quality,
                        "rate": None if record.rate is None else record.rate / 1000,
                        "weights_digest": record.weights_digest.hex(),
                        "height": record.height,
                        "width": record.width,
                        "strings": [len(s) for s in record.strings],
                        "payload_bytes": record.payload_bytes,
                        "overhead_bytes": total - record.payload_bytes,
                        "total_bytes": total,
                        "bpp": 8 * total / (record.height * record.width),
                        "machine_only": record.machine_only,
                        "version": ".".join(map(str, record.version)),
                        "metadata": record.metadata,
                        "importance_map_bytes": len(record.importance_map or b""),
                    })
            if len(rows) == before:
                raise CnkError(NO_RECORDS)
        except (CnkError, OSError) as exc:
            msg = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            run.fail(source, ComneckError(msg))
    if as_json:
        click.echo(json.dumps(rows, indent=2))
    elif rows:
        _print_info_table(rows)
    run.exit()


def _print_info_table(rows: list[dict]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(show_edge=False)
    for col in ("file", "rec", "codec", "q", "size", "strings", "payload B", "overhead B", "bpp", "weights"):
        table.add_column(col, justify="right" if col not in ("file", "codec") else "left")
    for r in rows:
        table.add_row(r["file"], str(r["record"]), r["codec"] + (" (machine)" if r["machine_only"] else ""),
                      str(r["quality"] if r["rate"] is None else f"{r['rate']:g}"), f"{r['width']}×{r['height']}", str(len(r["strings"])),
                      str(r["payload_bytes"]), str(r["overhead_bytes"]), f"{r['bpp']:.4f}", r["weights_digest"])
    console = Console()
    if not console.is_terminal:  # pipes and files get every column in full, not squeezed to 80
        console.width = 200
    console.print(table)


# --------------------------------------------------------------------------- complexity
@main.command()
@click.option("--codec", type=CODEC_CHOICE, default="elic2022-official", show_default=True,
              help="Codec whose g_s is counted, sized as the file `encode` would load (registered, else the zoo's).")
@click.option("-q", "--quality", type=int, default=None, help="Codec quality (sets N, M). Default: the highest.")
@click.option("--clip", "clip_model", default="ViT-L-14", show_default=True, help="open_clip model name.")
@click.option("--size", type=click.IntRange(64, 4096), default=256, show_default=True,
              help="Image side in pixels; kMAC/pixel is per pixel of this image.")
@click.option("-k", "--split", "k", type=click.IntRange(0, 64), default=2, show_default=True,
              help="CLIP blocks the neck replaces.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def complexity(codec: str, quality: int | None, clip_model: str, size: int, k: int, as_json: bool) -> None:
    """Parameters and kMAC/pixel of the neck, g_s and CLIP's first k blocks, counted by torch's FlopCounterMode.

    Random weights (counts do not depend on them), so nothing is downloaded.
    """
    if quality is not None:
        check_codec_usage(codec, quality)
    _quiet_imports()
    run = Run()
    with _guard(run):
        rows, sized = complexity_rows(codec, quality, clip_model, size, k)
    if as_json:
        click.echo(json.dumps([{"component": r.name, "params": r.params, "kmac_per_px": r.kmac_per_px}
                               for r in rows], indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{codec} ({sized}) + {clip_model}, {size}×{size}, k={k}")
    table.add_column("component")
    table.add_column("params (M)", justify="right")
    table.add_column("kMAC/pixel", justify="right")
    for r in rows:
        table.add_row(r.name, f"{r.params / 1e6:.2f}", f"{r.kmac_per_px:.2f}")
    Console().print(table)


def complexity_rows(codec: str, quality: int | None, clip_model: str, size: int, k: int) -> tuple[list, str]:
    """Build the three models with random weights and count them (see comneck_cli.eval.complexity). Returns the rows
    and the codec's size and where it comes from (``codecs.file_config``)."""
    import open_clip

    from comneck_cli.codecs import check_quality, file_config, get_spec, latent_channels
    from comneck_cli.eval.complexity import component_costs
    from comneck_cli.models.neck import TransformNeck

    spec = get_spec(codec)
    quality = max(spec.qualities) if quality is None else quality
    check_quality(spec, quality)
    if clip_model not in open_clip.list_models():
        raise ComneckError(f"unknown CLIP model {clip_model!r}; use an open_clip model name such as ViT-L-14")
    if size % 64:
        raise ComneckError(f"--size must be a multiple of 64 (the codec's padding), not {size}")
    config, source = file_config(spec, quality)
    codec_model = spec.constructor()(**config)
    logging.disable(logging.WARNING)  # open_clip logs "initialized randomly", which is the point here
    try:
        clip = open_clip.create_model(clip_model, pretrained=None)
    finally:
        logging.disable(logging.NOTSET)
    visual = clip.visual
    grid = size // 16
    neck = TransformNeck(
        latent_channels=latent_channels(config), width=visual.transformer.width,
        heads=visual.transformer.resblocks[0].attn.num_heads, grid=(grid, grid),
    )
    sized = ", ".join(f"{key}={value}" for key, value in config.items())
    return component_costs(codec_model, clip, neck, image_size=size, k=k), f"q{quality}, {sized}: {source}"


# --------------------------------------------------------------------------- codecs & weights
@main.command("codecs")
def codecs_command() -> None:
    """List the codecs comneck can use, their quality levels and sizes (N, and M = latent channels): those of the
    registered file where one is registered (its metadata), else CompressAI's zoo table."""
    _quiet_imports()
    from comneck_cli.codecs import CODECS, file_config, latent_channels

    for spec in CODECS.values():
        qs = sorted(spec.qualities)
        configs = [file_config(spec, q) for q in qs]
        ns = "/".join(dict.fromkeys(str(config["N"]) for config, _ in configs))
        ms = "/".join(dict.fromkeys(str(latent_channels(config)) for config, _ in configs))
        registered = "; size from the registered file" if any(s.startswith("registered") for _, s in configs) else ""
        default = "; the default codec (weights shipped)" if spec.name == DEFAULT_CODEC else ""
        click.echo(f"{spec.name:22s} q{qs[0]}-{qs[-1]}  N={ns:8s} M={ms:8s} "
                   f"zoo={'yes' if spec.zoo else 'no ':3s} {spec.notes}{registered}{default}")


@main.group("weights")
def weights_group() -> None:
    """The registry of named model files (codecs, necks, CLIP), sha256-checked."""


@weights_group.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def weights_list(as_json: bool) -> None:
    """List registered model files: name, kind, origin, sha256 and what they were made for."""
    from comneck_cli import weights as registry

    with _guard(Run()):  # a damaged manifest
        entries = registry.entries()
    if as_json:
        click.echo(json.dumps([{"name": e.name, "kind": e.kind, "origin": e.origin, "sha256": e.sha256,
                                "path": str(e.path()), "info": e.info} for e in entries.values()], indent=2))
        return
    if not entries:
        click.echo(f"no weights registered (user registry: {registry.user_dir()})", err=True)
    for e in entries.values():
        details = ", ".join(f"{k}={v}" for k, v in e.info.items())
        click.echo(f"{e.name}\t{e.kind}\t{e.origin}\t{e.sha256[:12]}\t{details}")


@weights_group.command("import")
@click.argument("name")
@click.argument("file", type=click.Path(path_type=Path, exists=True, dir_okay=False))
@click.option("--kind", type=click.Choice(["codec", "neck", "clip", "postprocess", "adapter", "preedit"]), default=None,
              help="What the file is; guessed from NAME (a codec name followed by -qN means codec).")
@click.option("--half", is_flag=True,
              help="Codecs: store the transforms' weights (g_a, g_s, h_a, h_s) as float16, halving the file; "
                   "entropy models stay float32. Records need the imported file's digest.")
def weights_import(name: str, file: Path, kind: str | None, half: bool) -> None:
    """Copy FILE into the user registry as NAME, recording its sha256.

    A codec is found by `encode`/`decode` under the name CODEC-qQUALITY, e.g. mbt2018-mean-q3, and a
    variable-rate codec (one file for every rate) under its bare name, e.g. mbt2018-mean-vbr.
    """
    from comneck_cli import weights as registry
    from comneck_cli.formats import CODEC_IDS

    info = {}
    codec, _, q = name.rpartition("-q")
    if kind in (None, "codec") and codec and q.isdigit():
        kind, info = "codec", {"codec": codec, "quality": int(q)}
    elif kind in (None, "codec") and name in CODEC_IDS:
        kind, info = "codec", {"codec": name}
    if kind is None:
        raise click.UsageError("cannot guess what NAME is: pass --kind codec|neck|clip")
    if half and kind != "codec":
        raise click.UsageError("--half applies to codec files only")
    try:
        if info.get("codec") is not None:  # refuse notes.txt or another codec's file now, not at first use
            _quiet_imports()
            from comneck_cli.codecs import check_codec_file

            check_codec_file(file, info["codec"], info.get("quality"))
        if half:
            import tempfile

            _quiet_imports()
            from comneck_cli.codecs import half_codec_file

            with tempfile.TemporaryDirectory(prefix="comneck-half-") as folder:
                halved = Path(folder) / f"{name}.safetensors"
                half_codec_file(file, halved)
                entry = registry.import_file(name, halved, kind, {**info, "dtype": "float16"}, move=True)
        else:
            entry = registry.import_file(name, file, kind, info)
    except (registry.WeightsError, ComneckError) as exc:
        click.echo(f"comneck: error: {exc}", err=True)
        raise SystemExit(1) from None
    click.echo(f"imported {name} ({kind}) sha256 {entry.sha256[:12]}… -> {entry.path()}", err=True)


from comneck_cli.cli.train_commands import train  # noqa: E402  (the group imports torch only inside its commands)

main.add_command(train)

from comneck_cli.cli.eval_commands import eval_command  # noqa: E402  (torch-free: imports the evaluation code when it runs)

main.add_command(eval_command)

from comneck_cli.cli.batch_commands import batch as batch_group  # noqa: E402  (torch-free: imports models inside the workers)

main.add_command(batch_group)


if __name__ == "__main__":  # pragma: no cover
    main()
