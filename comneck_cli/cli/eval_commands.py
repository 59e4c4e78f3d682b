"""``comneck eval``: a thin Click command over :func:`comneck_cli.eval.run.run_eval`.

Importing this module imports neither torch nor compressai: the command imports the evaluation code when it
runs.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import click

from comneck_cli.cli.options import CODEC_CHOICE, family_options, max_pixels_option
from comneck_cli.cli.plumbing import apply_preset, guard, progress, quiet_imports, spell_params
from comneck_cli.defaults import DEFAULT_CODEC, quality_problem
from comneck_cli.eval import DEFAULT_METHODS, DEFAULT_PROMPT, METHOD_NAMES
from comneck_cli.mllm import MAX_NEW_TOKENS

_FILE = click.Path(path_type=Path, exists=True, dir_okay=False)


def parse_spec(value: str | None, option: str) -> dict:
    """``FILE`` (every quality) or ``q1=FILE,q2=NAME`` (``1=FILE`` also) -> ``{quality or None: value}``."""
    result: dict = {}
    for part in (value or "").split(","):
        part = part.strip()
        if not part:
            continue
        key, sep, rest = part.partition("=")
        number = key.strip().lower().removeprefix("q")
        if sep and number.isdigit():
            if not rest.strip():
                raise click.BadParameter(f"{part!r} names no file; use q{number}=FILE", param_hint=option)
            result[int(number)] = rest.strip()
        elif None in result:
            raise click.BadParameter(f"{part!r}: give one FILE for every quality, or qQ=FILE for each",
                                     param_hint=option)
        else:
            result[None] = part
    return result


def _qualities(ctx, param, value: str) -> tuple[int, ...]:
    try:
        qualities = sorted({int(q) for q in value.split(",") if q.strip()})
    except ValueError:
        raise click.BadParameter(f"{value!r}: use comma-separated integers such as 1,2,3,4") from None
    if not qualities or qualities[0] < 1:
        raise click.BadParameter(f"{value!r}: use comma-separated qualities from 1 up")
    return tuple(qualities)


def _methods(ctx, param, value: str | None) -> tuple[str, ...] | None:
    if value is None:
        return None
    names = tuple(dict.fromkeys(n.strip() for n in value.split(",") if n.strip()))
    unknown = [n for n in names if n not in METHOD_NAMES]
    if unknown or not names:
        raise click.BadParameter(f"unknown method {unknown[0] if unknown else value!r}; use some of "
                                 f"{', '.join(METHOD_NAMES)}")
    return names


@click.command("eval")
@click.option("--data", required=True, type=click.Path(path_type=Path, exists=True, file_okay=False),
              help="Images: one sub-folder per class (ImageFolder; enables zero-shot accuracy) or a flat folder.")
@click.option("-o", "--output", required=True, type=click.Path(path_type=Path, file_okay=False),
              help="REPORT_DIR for points.csv/json, summary.md, one PNG per metric and the points.jsonl log.")
@click.option("--codec", type=CODEC_CHOICE, default=DEFAULT_CODEC, show_default=True,
              help="Learned codec (see `comneck codecs`); the default's weights ship with comneck.")
@click.option("--qualities", default="1,2,3,4", show_default=True, callback=_qualities,
              help="Codec qualities: one curve point each.")
@click.option("--methods", default=None, callback=_methods,
              show_default=f"{','.join(DEFAULT_METHODS)}, plus postprocess with --postprocess",
              help=f"Comma-separated methods among {', '.join(METHOD_NAMES)}.")
@click.option("--weights", default=None,
              help="Codec weights: FILE or registry NAME, or q1=FILE,q2=NAME,... per quality. "
                   "Default: the registry's CODEC-qQ, else the CompressAI zoo.")
@click.option("--neck", default=None,
              help="Neck per quality: FILE or NAME, or q1=FILE,q2=NAME,... Default: the registry's CODEC-qQ-neck.")
@click.option("--neck-weights", default=None,
              help="Codec weights a d2/d3 neck was trained with (its records are coded with them), as --weights. "
                   "Default: --weights if the neck was trained on them, else a registered codec with the neck's "
                   "digest.")
@click.option("--postprocess", default=None,
              help="Post-processing U-Net per quality (FILE, or q1=FILE,...) for the postprocess method.")
@click.option("--adapter", default=None,
              help="Decoder adapter FILE or registry name for semantic-adapter. Default: the registry's CODEC-adapter.")
@click.option("--pre-edit", "pre_edit", default=None,
              help="Pre-editing module P (FILE or registry name) for vbr-preedit. Default: the registry's "
                   "CODEC-preedit.")
@click.option("--limit", type=click.IntRange(1), default=None,
              help="Evaluate only the first N images (round-robin over the classes).")
@click.option("--size", type=click.IntRange(0), default=256, show_default=True,
              help="Resize the short side to S (bicubic) and centre-crop S×S before coding, as the paper's 256×256; "
                   "0 codes images as they are.")
@family_options("Hidden state compared with C(x), Hugging Face numbering (-2: what LLaVA reads).",
                "Tokens compared with C(x): patch (no CLS), cls, all, pooled (the projected embedding) or projected "
                "(every last-layer token after ln_post and the projection).")
@click.option("--clip", "clip_model", default=None, show_default="the necks' CLIP, else ViT-L-14",
              help="open_clip model of the reference tower C and the zero-shot text encoder.")
@click.option("--clip-tag", default=None, show_default="the necks' tag, else openai", help="open_clip weights tag.")
@click.option("--clip-weights", type=_FILE, default=None,
              help="Local CLIP weights file instead of the registry / open_clip cache.")
@click.option("--classes", type=_FILE, default=None,
              help="Class names: one per line in sorted folder order, or 'FOLDER NAME' lines. Default: folder names.")
@click.option("--prompt", default=DEFAULT_PROMPT, show_default=True, help="Zero-shot prompt; {} is the class name.")
@click.option("--mllm", "mllm", default=None,
              help="Also ask this LLaVA checkpoint (folder or cached hub id, as `comneck ask --mllm`) every prompt "
                   "of --prompts about each image and each method's result: answer agreement and next-token KL "
                   "against its answers about the original image.")
@click.option("--prompts", type=_FILE, default=None,
              help="With --mllm: a text file of prompts, one a line (blank lines skipped).")
@click.option("--max-new-tokens", type=click.IntRange(1, MAX_NEW_TOKENS), default=32, show_default=True,
              help="With --mllm: longest greedy answer, in tokens.")
@click.option("--dtype", "mllm_dtype", type=click.Choice(["bf16", "fp16", "fp32"]), default=None,
              show_default="bf16 on CUDA, fp32 on the CPU", help="With --mllm: the MLLM's weights and activations.")
@click.option("--batch-size", type=click.IntRange(1, 4096), default=8, show_default=True,
              help="Images per chunk (CLIP runs batched over a chunk).")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True,
              help="Where the codec transforms, the neck, the U-Net and CLIP run; entropy coding stays on the CPU.")
@max_pixels_option
@click.option("--resume", is_flag=True,
              help="Continue the evaluation in REPORT_DIR: finished points are not recomputed.")
@click.option("--force", is_flag=True, help="Start over, discarding the evaluation already in REPORT_DIR.")
@click.option("--quiet", is_flag=True, help="No progress bar and no notes; errors still print.")
@click.option("--debug", is_flag=True, help="Show tracebacks for errors.")
def eval_command(data: Path, output: Path, codec: str, qualities: tuple[int, ...], methods: tuple[str, ...] | None,
                 weights: str | None, neck: str | None, neck_weights: str | None, postprocess: str | None,
                 adapter: str | None, pre_edit: str | None, limit: int | None, size: int, family: str | None,
                 layer: int, select: str, clip_model: str | None, clip_tag: str | None,
                 clip_weights: Path | None, classes: Path | None, prompt: str, mllm: str | None,
                 prompts: Path | None, max_new_tokens: int, mllm_dtype: str | None, batch_size: int, device: str,
                 max_pixels: int | None, resume: bool, force: bool, quiet: bool, debug: bool) -> None:
    """Compare the neck with the paper's baselines and traditional codecs: rate against PSNR, MS-SSIM, feature
    fidelity to C(x) and CLIP zero-shot accuracy, with BD-rates against reconstruction.

    Methods: neck (latents -> neck -> C'), reconstruction (g_s -> CLIP), postprocess (g_s -> U-Net -> CLIP),
    uncompressed (C(x), the upper bound), and jpeg/webp/avif/jxl bpp-matched to the codec image by image.
    A method that cannot run here is reported as skipped with the reason.
    """
    if (mllm is None) != (prompts is None):
        raise click.UsageError("--mllm and --prompts go together: the prompts are asked of the MLLM")
    for quality in qualities:  # usage errors before torch is imported
        problem = quality_problem(codec, quality)
        if problem is not None:
            raise click.BadParameter(str(problem), param_hint="--qualities")
    quiet_imports()
    if methods is None:
        methods = DEFAULT_METHODS + (("postprocess",) if postprocess else ())
    layer, select, clip_model, clip_tag, pad_to_square = apply_preset(family, layer, select, clip_model, clip_tag)

    def say(message: str) -> None:
        if not quiet or message.startswith("error:"):
            click.echo(f"comneck: {spell_params(message)}", err=True)

    @contextmanager
    def bar(total: int) -> Iterator[Callable[[], None]]:
        with progress(quiet, "evaluating", total, minimum=1) as shown:
            yield shown.advance

    interrupted = (f"interrupted; finished points are kept in {output / 'points.jsonl'}: rerun with --resume to "
                   "continue")
    with guard(debug, interrupted):
        from comneck_cli.eval.run import EvalConfig, run_eval

        if mllm is not None:
            from comneck_cli.cli.mllm_commands import quiet_transformers
            from comneck_cli.mllm.model import require_transformers

            require_transformers()
            quiet_transformers()

        cfg = EvalConfig(
            data=data, output=output, codec=codec, qualities=qualities, methods=methods,
            weights=parse_spec(weights, "--weights"), necks=parse_spec(neck, "--neck"),
            neck_weights=parse_spec(neck_weights, "--neck-weights"),
            postprocess=parse_spec(postprocess, "--postprocess"), adapter=adapter, pre_edit=pre_edit,
            limit=limit, size=size, layer=layer, select=select, pad_to_square=pad_to_square,
            clip_model=clip_model, clip_tag=clip_tag,
            clip_weights=clip_weights, classes=classes, prompt=prompt, batch_size=batch_size, device=device,
            resume=resume, force=force, max_pixels=max_pixels,
            mllm=mllm, prompts=prompts, mllm_dtype=mllm_dtype, max_new_tokens=max_new_tokens,
        )
        result = run_eval(cfg, progress=bar, echo=say, spell=spell_params)  # the report says flags, as stderr does
    say(f"wrote {output / 'summary.md'}: {result.computed} point(s) computed, {result.reused} taken from the log, "
        f"{len(result.skips)} skipped, {len(result.failures)} failed")
    raise SystemExit(1 if result.failures else 0)
