"""``comneck batch encode|decode|features``: the Click layer over :mod:`comneck_cli.batch` (its options, the run,
progress and the messages)."""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Callable

import click

from comneck_cli import hub
from comneck_cli.batch import DECODE_FORMATS, DecodeJob, EncodeJob, FeaturesJob, Job, RayOptions, Report, execute
from comneck_cli.cli.options import (CODEC_CHOICE, check_codec_usage, clip_options, family_options, source_options,
                                     guidance_options, max_pixels_option)
from comneck_cli.cli.plumbing import Run, apply_preset, flag, guard, progress, quiet_imports
from comneck_cli.defaults import DEFAULT_CODEC


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
    @max_pixels_option
    @functools.wraps(func)
    def wrapper(*, input_spec, output, relative_to, engine, address, workers, num_gpus, num_cpus, batch_size,
                device, quiet, force, debug, max_pixels, **kwargs):
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
        with guard(debug):
            job = func(run, **kwargs)
            job.output, job.force, job.device = str(Path(os.path.abspath(output))), force, device
            job.debug, job.max_pixels = debug, max_pixels
            _execute(run, job, input_spec, output, relative_to, engine, options, batch_size)
        run.exit()

    return wrapper


def _execute(run: Run, job: Job, input_spec: str, output: Path, relative_to: Path | None, engine: str,
             options: RayOptions, batch_size: int) -> None:
    """:func:`comneck_cli.batch.execute` with a progress bar, one line per failure and the summary (also when
    interrupted: what failed so far is recorded, and finished outputs are complete and will be skipped)."""

    def failed(path: str, reason: str, traceback: str) -> None:
        if traceback:
            click.echo(traceback, err=True, nl=False)
        click.echo(f"comneck: error: {path}: {reason}", err=True)
        run.failures.append(path)

    def finish() -> None:
        summary = report.finish()
        if report.errors or not run.quiet:
            click.echo(f"comneck: {summary}", err=True)

    with progress(run.quiet, job.label) as bar:
        report = Report(output, job.command, spell=flag, on_warning=run.warn, on_failure=failed, on_progress=bar)
        try:
            execute(job, input_spec, output, report, relative_to=relative_to, engine=engine, options=options,
                    batch_size=batch_size)
        except KeyboardInterrupt:
            if report.total:  # interrupted after planning
                finish()
            raise
    # A setup error (models that do not load) propagated above without a summary: no input was tried.
    finish()


@click.group("batch", context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
def batch() -> None:
    """Whole folders or path lists: one output per input under --output, resumable, locally or on Ray.

    Finished outputs are checked and skipped, stale or truncated ones redone; failures go to
    OUTPUT/errors.jsonl and the rest goes on. Exit status 1 if any input failed.
    """


@batch.command("encode")
@click.option("-q", "--quality", type=int, default=3, show_default=True,
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
    quiet_imports()
    from comneck_cli.coding import check_guidance
    from comneck_cli.codecs import get_spec

    check_guidance(get_spec(codec), semantic, semantic_strength, pre_edit)
    return EncodeJob(output="", codec=codec, quality=quality, weights=hub.portable(weights), rate=rate,
                     bpp_target=bpp_target, semantic=semantic, semantic_strength=semantic_strength,
                     clip_model=clip_model, clip_tag=clip_tag, clip_weights=hub.portable(clip_weights),
                     pre_edit=hub.portable(pre_edit) if pre_edit else pre_edit)


@batch.command("decode")
@click.option("--weights", default=None,
              help="Codec weights file or registry name; must be what encoded the records (checked by digest).")
@click.option("--format", "fmt", type=click.Choice(list(DECODE_FORMATS)), default="png", show_default=True,
              help="Image file type of the reconstructions.")
@batch_options
def batch_decode(run, weights: str | None, fmt: str) -> Job:
    """Reconstruct every .cnk through g_s into OUTPUT/<relative path>.png (name_0001.png... for streams)."""
    return DecodeJob(output="", weights=hub.portable(weights), fmt=fmt)


@batch.command("features")
@source_options
@family_options("Hidden state, Hugging Face numbering (-2 = penultimate block, what LLaVA reads).",
                "patch tokens, cls, all tokens, pooled (projected embedding), or projected (every last-layer token "
                "after ln_post and the projection).")
@click.option("--format", "fmt", type=click.Choice(["pt", "safetensors", "npy"]), default="pt", show_default=True,
              help="File type of each input's features.")
@click.option("--weights", default=None,
              help="Codec weights file or registry name for decoding the records (checked by digest).")
@clip_options("open_clip model for --via reconstruction/uncompressed/adapter when no neck is given.",
              "Local CLIP weights file instead of the registry / open_clip cache.")
@batch_options
def batch_features(run, via: str, neck: str | None, adapter: str | None, family: str | None, layer: int, select: str, fmt: str,
                   weights: str | None, clip_model: str, clip_tag: str, clip_weights: Path | None) -> Job:
    """CLIP features of every .cnk (images with --via uncompressed) into OUTPUT/<relative path>.<format>."""
    layer, select, clip_model, clip_tag, pad_to_square = apply_preset(family, layer, select, clip_model, clip_tag)
    return FeaturesJob(output="", via=via, neck=hub.portable(neck), adapter=hub.portable(adapter), layer=layer, select=select, fmt=fmt,
                       weights=hub.portable(weights), clip_model=clip_model, clip_tag=clip_tag,
                       clip_weights=hub.portable(clip_weights), family=family, pad_to_square=pad_to_square)
