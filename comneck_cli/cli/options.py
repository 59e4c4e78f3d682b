"""Option groups several commands take alike, each defined once (torch-free: every command module imports it)."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Callable, Collection, Sequence

import click

from comneck_cli.clip.presets import PRESETS
from comneck_cli.cli.plumbing import Run, flag, guard, message
from comneck_cli.defaults import CODEC_LEVELS, quality_problem, rate_problem
from comneck_cli.errors import ComneckError

SELECT_CHOICE = click.Choice(["patch", "cls", "all", "pooled", "projected"])


def common_options(func: Callable | None = None, *, writes: bool = True) -> Callable:
    """Options every single-machine data command takes; the command gets the :class:`Run` first, inside the guard.
    ``writes=False`` (``@common_options(writes=False)``, a command that writes no files): no ``--force``."""
    if func is None:
        return functools.partial(common_options, writes=writes)

    @click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True,
                  help="Where the networks run (the codec's transforms, the neck, CLIP); entropy coding always runs "
                       "on the CPU.")
    @click.option("--quiet", is_flag=True, help="No progress bar, no warnings; errors still print.")
    @(click.option("--force", is_flag=True, help="Overwrite existing output files.") if writes else (lambda f: f))
    @click.option("--fail-fast", is_flag=True, help="Stop at the first input that fails instead of going on.")
    @click.option("--debug", is_flag=True, help="Show tracebacks for errors.")
    @max_pixels_option
    @functools.wraps(func)
    def wrapper(*args, device, quiet, fail_fast, debug, max_pixels, force=False, **kwargs):
        run = Run(quiet=quiet, debug=debug, fail_fast=fail_fast, force=force, device=device, max_pixels=max_pixels)
        with guard(debug):
            func(run, *args, **kwargs)
        run.exit()

    return wrapper


def max_pixels_option(func: Callable) -> Callable:
    return click.option("--max-pixels", type=click.IntRange(1), default=None,
                        help="Refuse images and records with more pixels than this (decompression-bomb protection). "
                             "[default: $COMNECK_MAX_PIXELS or 89478485]")(func)


def family_options(layer_help: str, select_help: str) -> Callable[[Callable], Callable]:
    """``--for``/``--layer``/``--select``: which MLLM family's features, or which hidden state and tokens
    (``plumbing.apply_preset`` turns ``--for`` into the rest); the help says what the command does with them."""

    def decorate(func: Callable) -> Callable:
        func = click.option("--select", type=SELECT_CHOICE, default="patch", show_default=True,
                            help=select_help)(func)
        func = click.option("--layer", type=int, default=-2, show_default=True, help=layer_help)(func)
        return click.option("--for", "family", type=click.Choice(list(PRESETS)), default=None,
                            help="Exactly what that MLLM family reads: sets --layer/--select, and for the reference "
                                 "paths the CLIP tower, resolution and preprocessing (see the README's table).")(func)

    return decorate


def source_options(func: Callable) -> Callable:
    """``--via``/``--neck``/``--adapter``: where the features come from (``comneck features`` and ``batch features``)."""
    func = click.option("--adapter", default=None, help="With --via adapter: decoder adapter file or registry name "
                        "(`comneck train adapter`). Default: the registry's CODEC-adapter of each record's codec. It "
                        "must have been trained for --clip/--clip-tag.")(func)
    func = click.option("--neck", default=None, help="Neck file or registry name. Default: the registry's "
                        "CODEC-qQUALITY-neck for each record. Its CLIP model, weights tag and split k are used.")(func)
    return click.option("--via", type=click.Choice(["neck", "reconstruction", "uncompressed", "adapter"]),
                        default="neck", show_default=True,
                        help="neck: .cnk latents -> neck -> C' (no image decoding); reconstruction: .cnk -> g_s -> "
                             "full CLIP (baseline); uncompressed: image -> full CLIP, C(x) (upper bound); adapter: "
                             ".cnk -> g_s -> CLIP's embedding, plus the decoder adapter's tokens of the latents -> "
                             "CLIP's blocks (CoTAM).")(func)


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


def guidance_options(func: Callable) -> Callable:
    """``--semantic``/``--semantic-strength`` with their CLIP options, and ``--pre-edit``: what steers or edits an
    image before it is coded (``api.ImageEncoder``), alike for ``encode`` and ``batch encode``."""
    func = click.option(
        "--pre-edit", "pre_edit", default=None, is_flag=False, flag_value="", metavar="[NAME|FILE]",
        help="Edit each image with the pre-editing module P before coding (`comneck train vbr --pre-edit`): the "
             "registry's CODEC-preedit, or --pre-edit=NAME|FILE. P's CLIP comes from its registry entry or "
             "--clip-weights. Records carry P's digest in their metadata (pre_edit).")(func)
    func = clip_options("open_clip model whose attention guides --semantic.",
                        "Local CLIP weights file for --semantic (or P's CLIP) instead of the registry / open_clip "
                        "cache.")(func)
    func = click.option(
        "--semantic-strength", type=click.FloatRange(0, 65.535), default=None, show_default="1.5",
        help="With --semantic: how far the map moves the quantisation step, gain = g_R·2^(S·(m − mean m)).")(func)
    return click.option(
        "--semantic", is_flag=True,
        help="Semantic-guided bit allocation (CoTAM): a shallow CLIP block's attention decides where bits go; the "
             "map travels in the record (counted in bpp). Variable-rate codecs only.")(func)


CODEC_CHOICE = click.Choice(list(CODEC_LEVELS))  # torch-free: `--codec nope` is a usage error at once


def check_codec_usage(codec: str, quality: int | None, rate: float | None = None,
                      bpp_target: float | None = None) -> None:
    """-q, --rate and --bpp-target against the codec's levels, as usage errors (exit 2) before torch is imported
    or any model loads; the library's own checks (``codecs.check_quality``...) say the same in ComneckErrors."""
    problem = rate_problem(codec, rate, bpp_target)
    if problem is None and quality is not None:  # -q 0 and -q 9 alike: one sentence naming the codec's levels
        problem = quality_problem(codec, quality)
    if problem is not None:
        raise click.UsageError(problem.render(flag))


def check_output(output: str | None, force: bool, *, suffixes: Collection[str] | None = None, what: str = "",
                 to_stdout: bool = False, one_file: bool = True, stdout: bool = True,
                 inputs: Sequence[str] = ()) -> None:
    """``-o`` before torch and any model loads: a file type the command cannot write (``-`` too, without
    ``stdout``), or ``what`` to a terminal (``to_stdout``), is a usage error (exit 2); with ``one_file`` (not
    numbered per record) an existing file (without ``--force``) or an unwritable folder is refused too (exit 1).
    Minutes of loading and computing must not end in either. An output that is one of ``inputs`` is refused
    first, since ``--force`` would not help there."""
    from comneck_cli.io.outputs import STDIO, check_target, is_dir_target, refuse_input, refuse_terminal

    if to_stdout:
        try:
            refuse_terminal(what)
        except ComneckError as exc:
            raise click.UsageError(message(exc)) from None
        return
    if output is None or (output == STDIO and stdout) or is_dir_target(output):
        return
    if suffixes is not None and Path(output).suffix.lower() not in suffixes:
        raise click.UsageError(f"cannot write {what} to {output}: use a {', '.join(suffixes)} file, or a "
                               "folder (an existing one, or a name ending in /)")
    if one_file:
        refuse_input(Path(output), inputs)
        check_target(Path(output), force)
