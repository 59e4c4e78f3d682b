"""``comneck features``: options and messages over :func:`comneck_cli.batch.features.extract_features`."""

from __future__ import annotations

from pathlib import Path

import click

from comneck_cli.cli.options import check_output, clip_options, common_options, family_options, source_options
from comneck_cli.cli.plumbing import Run, apply_preset, progress, quiet_imports
from comneck_cli.defaults import FEATURE_SUFFIXES


@click.command()
@click.argument("inputs", nargs=-1, required=True, type=click.Path(path_type=str, allow_dash=True))
@click.option("-o", "--output", required=True, type=click.Path(path_type=str),
              help="A .pt, .safetensors or .npy file (all inputs stacked along dim 0), or a folder (one file "
                   "per input, in --format).")
@source_options
@family_options("Hidden state to return, Hugging Face numbering (0 = after ln_pre, i = output of block i, "
                "-2 = penultimate block, what LLaVA reads).",
                "patch: tokens without CLS; cls; all tokens; pooled: the projected image embedding; projected: "
                "every last-layer token after ln_post and the projection (the last two ignore --layer).")
@click.option("--batch-size", type=click.IntRange(1, 4096), default=8, show_default=True,
              help="Inputs per forward pass through the neck and CLIP.")
@click.option("--format", "fmt", type=click.Choice(["pt", "safetensors", "npy"]), default="pt", show_default=True,
              help="File type when -o is a folder.")
@click.option("--weights", default=None,
              help="Codec weights file or registry name for decoding the records (checked by digest).")
@clip_options("open_clip model for --via reconstruction/uncompressed/adapter when no neck is given.",
              "Local CLIP weights file instead of the registry / open_clip cache.")
@common_options
def features(run: Run, inputs: tuple[str, ...], output: str, via: str, neck: str | None, adapter: str | None,
             family: str | None, layer: int, select: str, batch_size: int, fmt: str, weights: str | None,
             clip_model: str, clip_tag: str, clip_weights: Path | None) -> None:
    """CLIP features of INPUTS (.cnk files, images with --via uncompressed, or - for stdin) for MLLMs.

    The default is what LLaVA-style MLLMs read: the penultimate hidden state's patch tokens, (N, 256, 1024)
    for ViT-L/14 at 224, straight from the compressed latents without decoding the image.
    """
    check_output(output, run.force, suffixes=FEATURE_SUFFIXES, what="features", stdout=False,
                 inputs=inputs)  # before the models
    layer, select, clip_model, clip_tag, pad_to_square = apply_preset(family, layer, select, clip_model, clip_tag)
    quiet_imports()
    from comneck_cli import coding as api
    from comneck_cli.batch.features import extract_features
    from comneck_cli.features import FeatureRunner

    runner = FeatureRunner(via=via, neck=neck, adapter=adapter, layer=layer, select=select, clip_model=clip_model,
                           clip_tag=clip_tag, clip_weights=clip_weights, weights=weights,
                           device=api.resolve_device(run.device), family=family, pad_to_square=pad_to_square)
    with progress(run.quiet, "features") as bar:
        extract_features(inputs, output, runner, run, fmt=fmt, force=run.force, batch_size=batch_size,
                         limits=run.limits(), on_progress=bar)
