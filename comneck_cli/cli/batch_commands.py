"""``comneck batch``: the Click group over :mod:`comneck_cli.batch` (options, the run, progress and the summary)."""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Callable

import click

from comneck_cli.batch import (CNK_SUFFIX, DECODE_FORMATS, STDIO, DecodeJob, EncodeJob, FeaturesJob,
                               Item, Job, RayOptions, Report, _quiet_imports, _ray_problem, _read_records, chunks, plan_inputs, run_local, run_ray)
from comneck_cli.clip.presets import PRESETS
from comneck_cli.cli.options import CODEC_CHOICE, check_codec_usage, clip_options, guidance_options
from comneck_cli.defaults import DEFAULT_CODEC
from comneck_cli.errors import ComneckError


def batch_options(func: Callable) -> Callable:
    """Options every batch command takes: input, output, engine and Ray settings, and the common ones."""

    @click.option("--input", "input_spec", required=True, type=click.Path(path_type=str, allow_dash=True),
                  help="A folder (searched recursively), a text file listing paths (one a line), or - for such "
                       "a list on stdin.")
    @click.option("--output", required=True, type=click.Path(path_type=Path, file_okay=False),
                  help="Folder for the outputs; they mirror the inputs' relative paths (encode: a/b.png -> "
                       "OUT/a/b.cnk; decode: a/b.cnk -> OUT/a/b.png; features: a/b.cnk -> OUT/a/b.pt).")
    @click.option("--relative-to", type=click.Path(path_type=Path, file_okay=False), default=None,
                  help="For a list: the folder whose relative paths the outputs mirror. Default: the current folder.")
    @click.option("--engine", type=click.Choice(["local", "ray"]), default="local", show_default=True,
                  help="local: this process; ray: a Ray cluster (pip install 'comneck[ray]').")
    @click.option("--address", default=None,
                  help="Ray only: auto (the cluster this machine belongs to), HOST:PORT (its head), or "
                       "ray://HOST:PORT (Ray Client). Default: RAY_ADDRESS, else a Ray instance on this machine.")
    @click.option("--workers", type=click.IntRange(1), default=None,
                  help="Ray only: worker actors. Default: what the cluster holds (GPUs or CPUs per worker).")
    @click.option("--num-gpus-per-worker", "num_gpus", type=click.FloatRange(0), default=None,
                  help="Ray only: GPUs per worker; a fraction (0.25) shares a GPU between workers. [default: 0]")
    @click.option("--num-cpus-per-worker", "num_cpus", type=click.FloatRange(0, min_open=True), default=None,
                  help="Ray only: CPUs per worker (torch threads, entropy coding). [default: 1]")
    @click.option("--batch-size", type=click.IntRange(1, 1024), default=8, show_default=True,
                  help="Inputs per chunk: one g_a / neck forward pass, and the unit of work a worker takes.")
    @click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True,
                  help="Where the models run; with Ray, auto means cuda when the worker has GPUs, else cpu.")
    @click.option("--quiet", is_flag=True, help="No progress bar, no warnings, no summary unless something failed.")
    @click.option("--force", is_flag=True, help="Redo every output, even those already finished and valid.")
    @click.option("--debug", is_flag=True, help="Tracebacks for errors; Ray's own logs.")
    @click.option("--max-pixels", type=click.IntRange(1), default=None,
                  help="Refuse images and records with more pixels than this (decompression-bomb protection). "
                       "[default: $COMNECK_MAX_PIXELS or 89478485]")
    @functools.wraps(func)
    def wrapper(*, input_spec, output, relative_to, engine, address, workers, num_gpus, num_cpus, batch_size,
                device, quiet, force, debug, max_pixels, **kwargs):
        from comneck_cli.cli import Run, _guard, _terminate_as_interrupt

        ray_only = {"--address": address, "--workers": workers, "--num-gpus-per-worker": num_gpus,
                    "--num-cpus-per-worker": num_cpus}
        if engine == "local":
            given = [name for name, value in ray_only.items() if value is not None]
            if given:
                raise click.UsageError(f"{', '.join(given)} only apply to --engine ray")
        options = RayOptions(address=address, workers=workers, num_gpus=num_gpus or 0.0,
                             num_cpus=num_cpus if num_cpus is not None else 1.0)
        if engine == "ray":
            if device == "cuda" and options.num_gpus == 0:
                raise click.UsageError("--device cuda with --engine ray needs --num-gpus-per-worker above 0")
            # Ray hides unassigned GPUs from a worker only when it assigns some: pin CPU workers to the CPU.
            device = "cpu" if options.num_gpus == 0 else ("cuda" if device == "auto" else device)
        run = Run(quiet=quiet, debug=debug, force=force, device=device, max_pixels=max_pixels)
        with _guard(run), _terminate_as_interrupt():
            job = func(run, **kwargs)
            job.output, job.force, job.device = str(Path(os.path.abspath(output))), force, device
            job.debug, job.max_pixels = debug, max_pixels
            _execute(run, job, input_spec, output, relative_to, engine, options, batch_size)
        run.exit()

    return wrapper


def _execute(run, job: Job, input_spec: str, output: Path, relative_to: Path | None, engine: str,
             options: RayOptions, batch_size: int) -> None:
    from comneck_cli.cli import progress
    from comneck_cli.io.outputs import make_folder

    if relative_to is not None and (input_spec != STDIO and Path(input_spec).is_dir()):
        raise click.UsageError("--relative-to applies to a list of paths; a folder --input is mirrored from itself")
    items, refused = plan_inputs(input_spec, job.suffixes, output, relative_to)
    items, clashes = _without_clashes(job, items)
    refused += clashes
    if not items and not refused:
        raise ComneckError(f"no inputs: {input_spec} holds no {' / '.join(job.suffixes)} files")
    if engine == "ray" and (problem := _ray_problem()) is not None:
        raise ComneckError(problem)
    make_folder(output)
    plan = chunks(items, batch_size)
    report = Report(run, output, job.command)
    try:
        with progress(run, len(items) + len(refused), job.label) as advance:
            report.advance = advance
            for entry in refused:
                report.add({"path": entry["path"], "status": "failed", "reason": entry["reason"]})
            if plan:
                outcomes = run_local(job, plan) if engine == "local" else run_ray(job, plan, options, run.debug)
                for outcome in outcomes:
                    report.add(outcome)
    except KeyboardInterrupt:
        report.finish()  # what failed so far is recorded; finished outputs are complete and will be skipped
        raise
    # A setup error (models that do not load) propagates without a summary: no input was tried.
    report.finish()
    run.failures.extend(e["path"] for e in report.errors)


def _without_clashes(job: Job, items: list[Item]) -> tuple[list[Item], list[dict[str, str]]]:
    """Every input's outputs, planned before any is written (``outputs.clashes``): an input that would write what an
    earlier one writes is refused -- a/b.png and a/b.jpg (both OUT/a/b.cnk), or a stream's numbered outputs and
    another input's (a.cnk's record 1 and a_0001.cnk, both OUT/a_0001.png)."""
    from comneck_cli.io.outputs import clashes

    counts = _stream_counts(job, items)
    refused = clashes([(item.label, job.targets(item, counts.get(item, 1))) for item in items])
    kept = [item for index, item in enumerate(items) if index not in refused]
    return kept, [{"path": items[index].label, "reason": reason} for index, reason in refused.items()]


def _stream_counts(job: Job, items: list[Item]) -> dict[Item, int]:
    """The records in each ``.cnk`` input whose numbered outputs could meet another input's: ``a.cnk`` beside
    ``a_0001.cnk`` (read, both of them). Other inputs are not read while planning: their outputs can only meet
    by sharing a stem, whatever their record counts."""
    if CNK_SUFFIX not in job.suffixes:
        return {}
    by_stem = {Path(item.relative).with_suffix("").as_posix().casefold(): item for item in items}
    counts: dict[Item, int] = {}
    for item in items:
        stem, underscore, number = Path(item.relative).with_suffix("").as_posix().casefold().rpartition("_")
        parent = by_stem.get(stem) if underscore and len(number) >= 4 and number.isdigit() else None
        if parent is not None:
            for each in (parent, item):
                if each not in counts:
                    try:
                        counts[each] = max(1, len(_read_records(each, job.limits())))
                    except (ComneckError, OSError):  # its worker reports the damage
                        counts[each] = 1
    return counts


@click.group("batch", context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
def batch() -> None:
    """Whole folders or path lists: one output per input under --output, resumable, locally or on Ray.

    Finished outputs are checked and skipped, stale or truncated ones redone; failures go to
    OUTPUT/errors.jsonl and the rest goes on. Exit status 1 if any input failed.
    """


@batch.command("encode")
@click.option("-q", "--quality", type=click.IntRange(1, 255), default=3, show_default=True,
              help="Codec quality level (higher = more bits); the codec's range is checked.")
@click.option("--codec", type=CODEC_CHOICE, default=DEFAULT_CODEC, show_default=True,
              help="Codec name (see `comneck codecs`).")
@click.option("--weights", default=None,
              help="Codec weights file or registry name instead of CODEC-qQ / the zoo (on Ray: a file every "
                   "worker can read, or a name in every worker's registry).")
@click.option("--rate", type=float, default=None,
              help="Variable-rate codecs: any rate R between the lowest and highest level; overrides -q.")
@click.option("--bpp-target", type=float, default=None,
              help="Variable-rate codecs: each image at the rate whose record has this many bits per pixel (±5%); "
                   "beyond the codec's reach, at its closest rate.")
@guidance_options
@batch_options
def batch_encode(run, quality: int, codec: str, weights: str | None, rate: float | None, bpp_target: float | None,
                 semantic: bool, semantic_strength: float | None, clip_model: str, clip_tag: str,
                 clip_weights: Path | None, pre_edit: str | None) -> Job:
    """Compress every image (PNG, JPEG, WebP, TIFF) into OUTPUT/<relative path>.cnk."""
    check_codec_usage(codec, quality, rate, bpp_target)
    _quiet_imports()
    from comneck_cli.coding import check_guidance
    from comneck_cli.codecs import get_spec

    check_guidance(get_spec(codec), semantic, semantic_strength, pre_edit)
    return EncodeJob(output="", codec=codec, quality=quality, weights=_file_or_name(weights), rate=rate,
                     bpp_target=bpp_target, semantic=semantic, semantic_strength=semantic_strength,
                     clip_model=clip_model, clip_tag=clip_tag, clip_weights=_file_or_name(clip_weights),
                     pre_edit=_file_or_name(pre_edit) if pre_edit else pre_edit)


@batch.command("decode")
@click.option("--weights", default=None,
              help="Codec weights file or registry name; must be what encoded the records (checked by digest).")
@click.option("--format", "fmt", type=click.Choice(list(DECODE_FORMATS)), default="png", show_default=True,
              help="Image file type of the reconstructions.")
@batch_options
def batch_decode(run, weights: str | None, fmt: str) -> Job:
    """Reconstruct every .cnk through g_s into OUTPUT/<relative path>.png (name_0001.png... for streams)."""
    return DecodeJob(output="", weights=_file_or_name(weights), fmt=fmt)


@batch.command("features")
@click.option("--via", type=click.Choice(["neck", "reconstruction", "uncompressed"]), default="neck",
              show_default=True, help="neck: .cnk latents -> neck -> C'; reconstruction: .cnk -> g_s -> full CLIP; "
                                      "uncompressed: images -> full CLIP.")
@click.option("--neck", default=None, help="Neck file or registry name. Default: the registry's "
                                           "CODEC-qQUALITY-neck for each record.")
@click.option("--for", "family", type=click.Choice(list(PRESETS)), default=None,
              help="Exactly what that MLLM family reads: sets --layer/--select, and for the reference paths the "
                   "CLIP tower, resolution and preprocessing (as `comneck features --for`).")
@click.option("--layer", type=int, default=-2, show_default=True,
              help="Hidden state, Hugging Face numbering (-2 = penultimate block, what LLaVA reads).")
@click.option("--select", type=click.Choice(["patch", "cls", "all", "pooled", "projected"]), default="patch",
              show_default=True, help="patch tokens, cls, all tokens, pooled (projected embedding), or projected "
                                      "(every last-layer token after ln_post and the projection).")
@click.option("--format", "fmt", type=click.Choice(["pt", "safetensors", "npy"]), default="pt", show_default=True,
              help="File type of each input's features.")
@click.option("--weights", default=None,
              help="Codec weights file or registry name for decoding the records (checked by digest).")
@clip_options("open_clip model for --via reconstruction/uncompressed when no neck is given.",
              "Local CLIP weights file instead of the registry / open_clip cache.")
@batch_options
def batch_features(run, via: str, neck: str | None, family: str | None, layer: int, select: str, fmt: str,
                   weights: str | None, clip_model: str, clip_tag: str, clip_weights: Path | None) -> Job:
    """CLIP features of every .cnk (images with --via uncompressed) into OUTPUT/<relative path>.<format>."""
    from comneck_cli.cli import apply_preset

    layer, select, clip_model, clip_tag, pad_to_square = apply_preset(family, layer, select, clip_model, clip_tag)
    return FeaturesJob(output="", via=via, neck=_file_or_name(neck), layer=layer, select=select, fmt=fmt,
                       weights=_file_or_name(weights), clip_model=clip_model, clip_tag=clip_tag,
                       clip_weights=_file_or_name(clip_weights), family=family, pad_to_square=pad_to_square)


def _file_or_name(value: str | Path | None) -> str | None:
    """A path that exists becomes absolute (Ray workers may run in another folder); a registry name stays."""
    if value is None:
        return None
    return os.path.abspath(value) if Path(value).exists() else str(value)
