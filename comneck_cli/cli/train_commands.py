"""``comneck train codec``, ``train neck``, ``train postprocess`` and ``train adapter``: thin Click commands over ``train_codec`` /
``train_neck`` / ``train_postprocess``.

Importing this module imports neither torch nor compressai: the commands import the training code when
they run.
"""

from __future__ import annotations

import json
import os
from functools import wraps
from pathlib import Path
from typing import Any, Callable

import click

from comneck_cli.cli.options import check_codec_usage
from comneck_cli.cli.plumbing import guard, progress, quiet_imports
from comneck_cli.defaults import CODEC_LEVELS

_FILE = click.Path(path_type=Path, exists=True, dir_okay=False)
_DIR = click.Path(path_type=Path, exists=True, file_okay=False)
_OUT = click.Path(path_type=Path, dir_okay=False)


def _quality_option(help_text: str) -> Callable:
    """``-q``, checked against ``--codec``'s levels before anything loads, in encode's words: ``-q 0`` and ``-q 9``
    alike are "codec C has quality levels 1..8, not Q" (exit 2)."""

    def wrap(func: Callable) -> Callable:
        @wraps(func)
        def checked(*args: Any, **kwargs: Any) -> None:
            if kwargs.get("codec") in CODEC_LEVELS:  # else the run names the codec problem, or resumes a run's codec
                check_codec_usage(kwargs["codec"], kwargs["quality"])
            func(*args, **kwargs)

        return click.option("-q", "--quality", type=int, default=None, help=help_text)(checked)

    return wrap


def _run_options(func: Callable | None = None, *, batch_size: int = 8) -> Callable:
    """Options every training command takes (``batch_size``: the default the command's config has)."""
    if func is None:
        return lambda f: _run_options(f, batch_size=batch_size)
    options = [
        click.option("--data", type=_DIR, default=None,
                     help="Training images: class sub-folders (ImageFolder layout) or, without cross-entropy, "
                          "a flat folder."),
        click.option("--classes", type=_FILE, default=None,
                     help="Class names: one per line in sorted folder order, or 'FOLDER NAME' lines. "
                          "Default: folder names."),
        click.option("--batch-size", type=click.IntRange(1), default=None, show_default=str(batch_size),
                     help="Images per step (per process)."),
        click.option("--crop", type=click.IntRange(64), default=None, show_default="256",
                     help="Side of the random square crops, a multiple of 64 (small images are padded as for coding)."),
        click.option("--seed", type=int, default=None, show_default="0",
                     help="Seed for initialisation, data order, crops and noise."),
        click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True,
                     help="Where to train; under torchrun each rank takes cuda:LOCAL_RANK."),
        click.option("--precision", type=click.Choice(["auto", "fp32", "bf16"]), default="auto", show_default=True,
                     help="Arithmetic of the networks: bf16 autocast (entropy models and rates stay float32), or "
                          "float32. auto: bf16 on CUDA, float32 on CPU (exact and reproducible). bf16 also about "
                          "halves a CPU step where the CPU has AVX-512 BF16."),
        click.option("--resume", type=_FILE, default=None,
                     help="Continue the run of this checkpoint.pt (its settings apply; --steps/--epochs may "
                          "extend it)."),
        click.option("--run-dir", type=click.Path(path_type=Path, file_okay=False), default=None,
                     help="Folder for checkpoint.pt and metrics.jsonl. Default: OUTPUT_STEM.run beside -o, "
                          "else the registry's runs/ folder."),
        click.option("--checkpoint-every", type=click.IntRange(1), default=500, show_default=True,
                     help="Write the checkpoint every N steps (and at the end)."),
        click.option("--minutes", type=click.FloatRange(0, min_open=True), default=None,
                     help="Stop after this much wall time (e.g. a GPU lent for an hour): write the checkpoint and "
                          "export what is trained so far; --resume goes on to --steps/--epochs."),
        click.option("--log-every", type=click.IntRange(1), default=10, show_default=True,
                     help="Append the mean losses of every N steps to metrics.jsonl."),
        click.option("--workers", type=click.IntRange(0), default=min(4, os.cpu_count() or 1), show_default=True,
                     help="Data-loading processes (default: up to 4, no more than the CPU count)."),
        click.option("--quiet", is_flag=True, help="No progress bar and no summary; errors still print."),
        click.option("--debug", is_flag=True, help="Show tracebacks for errors."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def _clip_options(model_help: str, weights_help: str = "Local CLIP weights file instead of the registry / download."
                  ) -> Callable[[Callable], Callable]:
    """--clip-model/--clip-tag/--clip-weights/--clip-config: the CLIP tower a training run loads."""
    options = [
        click.option("--clip-model", default=None, show_default="ViT-L-14", help=model_help),
        click.option("--clip-tag", default=None, show_default="openai",
                     help="open_clip weights tag ('none': random weights)."),
        click.option("--clip-weights", type=_FILE, default=None, help=weights_help),
        click.option("--clip-config", type=click.Path(path_type=Path, exists=True), default=None,
                     help="An open_clip model config JSON (or folder of them) to add before loading, for custom "
                          "models."),
    ]

    def decorate(func: Callable) -> Callable:
        for option in reversed(options):
            func = option(func)
        return func

    return decorate


def _guarded(func: Callable) -> Callable:
    """The guard (one-line errors, exit 1), with Ctrl-C saying how to resume (exit 130)."""

    @wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> None:
        with guard(kwargs.get("debug", False), RESUME_HINT, sigterm=False):
            func(*args, **kwargs)

    return wrapper


RESUME_HINT = "interrupted; continue from the last checkpoint with --resume RUN_DIR/checkpoint.pt"


def _trained(train_function: Callable, cfg: Any) -> Any:
    """Run ``train_function(cfg, on_progress)`` under the progress bar (on a terminal, without --quiet)."""
    with progress(cfg.quiet, "training", minimum=1) as bar:
        return train_function(cfg, bar)


def _add_clip_config(clip_config: Path | None) -> None:
    """Quiet the heavy imports, then add ``--clip-config``'s open_clip model configs before any model is built."""
    quiet_imports()
    if clip_config is not None:
        import open_clip

        open_clip.add_model_config(clip_config)


def _ce_dist(text: str | None) -> tuple | None:
    """``--ce-dist CE:DIST``: the two weights of a stage with both losses."""
    weights = _numbers(text, float, "--ce-dist")
    if weights is not None and len(weights) != 2:
        raise click.BadParameter("give two weights, e.g. 1:100", param_hint="--ce-dist")
    return weights


def _numbers(text: str | None, kind: type, what: str) -> tuple | None:
    """``"20"`` or ``"20,20,10"`` -> a tuple of numbers."""
    if text is None:
        return None
    try:
        return tuple(kind(part) for part in text.replace(":", ",").split(",") if part.strip())
    except ValueError:
        raise click.BadParameter(f"{text!r} is not a comma-separated list of numbers", param_hint=what) from None


def _json_config(text: str | None) -> dict | None:
    if text is None:
        return None
    source = Path(text).read_text(encoding="utf-8") if Path(text).is_file() else text
    try:
        value = json.loads(source)
    except ValueError as exc:
        raise click.BadParameter(f"not a JSON object or a JSON file ({exc})", param_hint="--config") from None
    if not isinstance(value, dict):
        raise click.BadParameter("must be a JSON object of constructor arguments", param_hint="--config")
    return value


def _rates(codec: str, quality: int | None) -> str:
    """What a run trained for, as its summary says it: ``mbt2018-mean q3``, or a variable-rate codec's
    ``mbt2018-mean-vbr (every rate)`` (no quality: one model serves them all), never ``qNone``."""
    return f"{codec} (every rate)" if quality is None else f"{codec} q{quality}"


def _summary(quiet: bool, what: str, result: Any) -> None:
    if quiet:
        return
    losses = " ".join(f"{k}={v:.4g}" for k, v in result.final.items())
    click.echo(f"comneck: trained {what}: {result.steps} steps, {losses}", err=True)
    if result.output:
        click.echo(f"comneck: wrote {result.output}", err=True)
    if result.registered:
        click.echo(f"comneck: registered {result.registered}", err=True)
    extra = result.extra or {}
    if extra.get("prompts"):
        click.echo(f"comneck: zero-shot prompts: {extra['prompts']}", err=True)
    if extra.get("codec_output"):
        click.echo(f"comneck: wrote retrained codec {extra['codec_output']}", err=True)
    if extra.get("codec_registered"):
        click.echo(f"comneck: registered retrained codec {extra['codec_registered']}", err=True)
    click.echo(f"comneck: checkpoint and metrics.jsonl in {result.run_dir}", err=True)


@click.group("train", context_settings={"help_option_names": ["-h", "--help"]})
def train() -> None:
    """Train codecs (rate-distortion), transform-necks (scenarios d1, d2, d3), the post-processing U-Net and the
    variable-rate codec with its pre-editing module for LVLMs."""


def _gain_map_options(default_fraction: str, default_source: str, sources: tuple[str, ...]) -> Callable:
    """--gain-maps / --gain-map-strength / --gain-map-source: variable-rate training at spatially varying gains."""
    def wrap(command: Callable) -> Callable:
        for option in reversed((
            click.option("--gain-maps", type=click.FloatRange(0, 1), default=None, show_default=default_fraction,
                         help="Share of steps coded at a gain that varies over the image, as --semantic encodes "
                              "(each pixel's distortion weighed by its position's λ)."),
            click.option("--gain-map-strength", type=click.FloatRange(0, 65.535, min_open=True), default=None,
                         show_default="3", help="Largest strength S of those maps (each image draws S ~ U[0, S])."),
            click.option("--gain-map-source", type=click.Choice(sources), default=None, show_default=default_source,
                         help="random: smooth random maps; clip: the training CLIP's attention maps, as --semantic "
                              "computes them; both: each image draws one."),
        )):
            command = option(command)
        return command
    return wrap


@train.command("codec")
@click.option("--codec", default=None, help="Codec name (see `comneck codecs`).")
@_quality_option("Quality level (selects λ and the architecture size). Omit for variable-rate codecs, which "
                 "train every level.")
@click.option("--steps", type=click.IntRange(0), default=None, help="Optimizer steps to train (or --epochs).")
@click.option("--epochs", type=click.IntRange(0), default=None, help="Passes over the data (or --steps).")
@click.option("--lr", type=float, default=None, show_default="1e-4", help="Adam learning rate of the codec.")
@click.option("--aux-lr", type=float, default=None, show_default="1e-3",
              help="Adam learning rate of the bottleneck quantiles (aux loss).")
@click.option("--clip-max-norm", type=float, default=None, show_default="1.0", help="Gradient-norm clipping (0: off).")
@click.option("--lmbda", type=float, default=None,
              help="λ of R + λ·255²·MSE. Default: ELIC 0.004/0.008/0.016/0.032, others CompressAI's zoo table.")
@click.option("--config", "config_json", default=None,
              help="Constructor arguments as JSON (or a JSON file) overriding the quality's, "
                   "e.g. '{\"N\": 8, \"M\": 12}'. With --init, only a larger M: widens the codec's latent y "
                   "(mean-scale hyperprior codecs), keeping what it computes.")
@click.option("--init", type=_FILE, default=None, help="Start from this codec file instead of random weights.")
@click.option("--init-pca", type=_DIR, default=None,
              help="lapped-pca-vbr: start g_a/g_s's linear paths at the principal components of the 16×16 blocks "
                   "of the photos in this folder (the residual branches start at zero).")
@click.option("--warmup-steps", "warmup", type=click.IntRange(0), default=None,
              help="Variable-rate codecs: train the first N steps single-rate at the top level's λ (Kamisli et "
                   "al.'s stage 1), then every level.  [default: 0]")
@_gain_map_options("0.5 (variable-rate codecs)", "random", ("random",))
@click.option("--freeze", multiple=True, metavar="PREFIX",
              help="Hold the parameters under this name fixed (repeatable), e.g. g_a and g_s to train the entropy "
                   "model alone, or g_a.linear and g_s.linear to keep lapped-pca-vbr's linear paths.")
@click.option("-o", "--output", type=_OUT, default=None, help="Write the trained codec (.safetensors) here.")
@click.option("--register", default="{codec}-q{quality}", show_default=True,
              help="Registry name for the trained codec (encode/decode find CODEC-qQUALITY; a variable-rate "
                   "codec is registered as CODEC).")
@click.option("--no-register", is_flag=True, help="Do not add the codec to the registry (then -o is needed).")
@_run_options
@_guarded
def train_codec_command(codec, quality, steps, epochs, lr, aux_lr, clip_max_norm, lmbda, config_json, init, init_pca,
                        warmup, gain_maps, gain_map_strength, gain_map_source, freeze, output, register, no_register,
                        debug,
                        **run) -> None:
    """Rate-distortion training for human perception: R + λ·255²·MSE, CompressAI style.

    \b
    Example:
      comneck train codec --codec elic2022-official -q 2 --data imagenet8k/ --epochs 100
    """
    quiet_imports()
    from comneck_cli.train.codec import CodecTrainConfig, train_codec

    cfg = CodecTrainConfig(codec=codec, quality=quality, steps=steps, epochs=epochs, lr=lr, aux_lr=aux_lr,
                           clip_max_norm=clip_max_norm, lmbda=lmbda, config=_json_config(config_json), init=init,
                           init_pca=init_pca, warmup=warmup,
                           gain_maps=gain_maps, gain_map_strength=gain_map_strength, gain_map_source=gain_map_source,
                           freeze=list(freeze) or None, output=output, register=None if no_register else register,
                           **run)
    result = _trained(train_codec, cfg)
    _summary(run["quiet"], _rates(cfg.codec, cfg.quality), result)


@train.command("neck")
@click.option("--scenario", type=click.Choice(["d1", "d2", "d3"]), default=None, show_default="d1",
              help="d1: codec frozen; d2: codec retrained for people and machines; d3: encoder retrained for "
                   "machines only.")
@click.option("--codec", default=None, help="Codec whose y_hat the neck reads.")
@_quality_option("Codec quality level.")
@click.option("--codec-weights", type=_FILE, default=None,
              help="Codec file to start from. Default: registry entry CODEC-qQUALITY, else the CompressAI zoo.")
@_clip_options("open_clip model name of the CLIP tower.")
@click.option("--clip-from-mllm", default=None, metavar="DIR|HUB_ID",
              help="Train for a LLaVA checkpoint's own vision tower (folder or cached hub id, as `comneck ask "
                   "--mllm`), so `ask --via neck` takes the neck: distillation only (d1: one --steps or --epochs "
                   "value N is stage 3's, 0,0,N), target by default what the model reads.")
@click.option("-k", "--k", "k", type=click.IntRange(0), default=None, show_default="2",
              help="The neck's tokens enter CLIP block k+1.")
@click.option("--target", default=None, show_default="pooled",
              help="CLIP output L_dist compares: pooled (projected embedding), projected (all tokens after ln_post "
                   "and proj), layerN/patch|cls|all (e.g. layer-2/patch; also patch:-2) or an MLLM family (llava).")
@click.option("--targets", default=None,
              help="Several CLIP outputs, L_dist their weighted sum of MSEs: NAME:WEIGHT,... with NAME as for "
                   "--target, e.g. 'pooled:1,layer-2/patch:1' or 'llava:1,llama-adapter:0.5,clip-embedding:1'.")
@click.option("--template", "templates", multiple=True,
              help="Prompt template for class names (repeatable; d1). [default: open_clip's 80 OpenAI ImageNet "
                   "templates for WordNet-id folders, else 'a photo of a {}.']")
@click.option("--crops", type=click.Choice(["resize", "random"]), default=None, show_default="resize",
              help="resize: short side to --crop, then the centre square (the authors' protocol); random: random "
                   "squares at native resolution.")
@click.option("--steps", default=None,
              help="Steps per stage: one number or three, e.g. 66720,66720,66720 (the paper's 20 epochs of 1/12 "
                   "ImageNet at --batch-size 32; or --epochs).")
@click.option("--epochs", default=None, help="Passes over --data per stage: one number or three.")
@click.option("--lr", default=None,
              help="Learning rate per stage, one or three numbers. [default: d1 1e-4,1e-5,1e-5; d2/d3 1e-4,1e-4,1e-5]")
@click.option("--ce-dist", default=None, show_default="1:100",
              help="d1 stage 2 weights of cross-entropy : distillation (d1 only).")
@click.option("--lmbda", type=float, default=None,
              help="λ of the joint loss (d2/d3 only). Default: the codec quality's λ.")
@click.option("--gamma", type=float, default=None, show_default="255²",
              help="γ, weight of MSE(x, x̂) in d2's joint loss (d2 only).")
@click.option("--beta", type=float, default=None, show_default="255²/60",
              help="β, weight of L_dist in d2/d3's joint loss (d2/d3 only).")
@click.option("--aux-lr", type=float, default=None, show_default="1e-3",
              help="Learning rate of the bottleneck quantiles in joint training.")
@click.option("--clip-max-norm", type=float, default=None, show_default="1.0",
              help="Codec gradient-norm clipping in joint training (0: off).")
@click.option("--neck-width", type=click.IntRange(1), default=None, help="Neck width. Default: the CLIP tower's width.")
@click.option("--neck-heads", type=click.IntRange(1), default=None,
              help="Neck attention heads. Default: the CLIP tower's.")
@click.option("--neck-init", type=_FILE, default=None,
              help="Start from this neck file. d2/d3 start from a d1 neck: by default the registry's "
                   "CODEC-qQUALITY-neck.")
@click.option("-o", "--output", type=_OUT, default=None, help="Write the trained neck (.safetensors) here.")
@click.option("--register", default="{codec}-q{quality}-neck{suffix}", show_default=True,
              help="Registry name for the neck; {suffix} is empty for d1 (where `features` looks) and -d2/-d3 else.")
@click.option("--no-register", is_flag=True,
              help="Do not add the neck (or d2/d3's codec) to the registry (then -o is needed).")
@click.option("--codec-output", type=_OUT, default=None,
              help="d2/d3: write the retrained codec here. Default: OUTPUT_STEM.codec.safetensors beside -o.")
@click.option("--codec-register", default="{codec}-q{quality}-{scenario}", show_default=True,
              help="d2/d3: registry name for the retrained codec.")
@click.option("--recipe", type=click.Choice(["release", "paper"]), default=None, show_default="release",
              help="release: what the authors' code does, which made their released necks (raw dot-product "
                   "cross-entropy, ln_post twice in C' and the target, bilinear resize, d1 losses ×1152); paper: "
                   "the paper's forms (logit_scale × cosine, ln_post once, bicubic). Default: release, or the "
                   "--neck-init neck's.")
@_run_options(batch_size=32)
@_guarded
def train_neck_command(scenario, codec, quality, codec_weights, clip_model, clip_tag, clip_weights, clip_config,
                       clip_from_mllm, k, target, targets, templates, crops, recipe, steps, epochs, lr, ce_dist, lmbda, gamma, beta, aux_lr,
                       clip_max_norm, neck_width, neck_heads, neck_init, output, register, no_register,
                       codec_output, codec_register, debug, **run) -> None:
    """Train a transform-neck so that C'(T(y_hat)) matches C(x), in three stages (paper §3.4-3.5, A.1).

    \b
    Examples:
      comneck train neck --scenario d1 --codec elic2022-official -q 2 --data imagenet/train --epochs 20
      comneck train neck --scenario d3 --codec elic2022-official -q 2 --data imagenet/train --epochs 5 -o d3.safetensors
    """
    if clip_from_mllm is not None and (clip_model or clip_tag or clip_weights or clip_config):
        raise click.UsageError("--clip-from-mllm takes the tower from the MLLM: drop --clip-model, --clip-tag, "
                               "--clip-weights and --clip-config")
    _add_clip_config(clip_config)
    from comneck_cli.train.neck import NeckTrainConfig, train_neck

    cfg = NeckTrainConfig(
        scenario=scenario, codec=codec, quality=quality, codec_weights=codec_weights, clip_model=clip_model,
        clip_tag=clip_tag, clip_weights=clip_weights, k=k, target=target, targets=targets,
        templates=tuple(templates) or None, crops=crops, recipe=recipe, steps=_numbers(steps, int, "--steps"),
        epochs=_numbers(epochs, int, "--epochs"), lr=_numbers(lr, float, "--lr"),
        ce_dist=_ce_dist(ce_dist), lmbda=lmbda, gamma=gamma, beta=beta, aux_lr=aux_lr,
        clip_max_norm=clip_max_norm, neck_width=neck_width, neck_heads=neck_heads, neck_init=neck_init,
        output=output, register=None if no_register else register, codec_output=codec_output,
        codec_register=None if no_register else codec_register, clip_from_mllm=clip_from_mllm, **run)
    result = _trained(train_neck, cfg)
    _summary(run["quiet"], f"neck {cfg.scenario} for {_rates(cfg.codec, cfg.quality)}", result)


@train.command("vbr")
@click.option("--codec", default=None, show_default="mbt2018-mean-vbr", help="Variable-rate codec to train.")
@click.option("--pre-edit", "pre_edit", is_flag=True,
              help="Train the pre-editing module P with the codec (P edits the image before coding).")
@click.option("--init", type=_FILE, default=None, help="Start the codec from this file instead of random weights.")
@click.option("--config", "config_json", default=None,
              help="Codec constructor arguments as JSON (or a JSON file), e.g. '{\"N\": 16, \"M\": 24}'.")
@click.option("--steps", type=click.IntRange(0), default=None, help="Optimizer steps to train (or --epochs).")
@click.option("--epochs", type=click.IntRange(0), default=None, help="Passes over the data (or --steps).")
@click.option("--lr", type=float, default=None, show_default="1e-4", help="Adam learning rate of the codec.")
@click.option("--pre-edit-lr", type=float, default=None, show_default="1e-4", help="Adam learning rate of P.")
@click.option("--aux-lr", type=float, default=None, show_default="1e-3",
              help="Adam learning rate of the bottleneck quantiles (aux loss).")
@click.option("--clip-max-norm", type=float, default=None, show_default="1.0",
              help="Codec gradient-norm clipping (0: off).")
@click.option("--gamma", type=float, default=None, show_default="255²",
              help="γ, weight of the pixel distortion MSE(x̂, x) in R + λ_R(γ·MSE + β(L_sem + ρ·L_rank)); 0: for the "
                   "LVLM alone.")
@click.option("--beta", type=float, default=None, show_default="255²/60",
              help="β, weight of the token distortion: the token MSE L_sem plus ρ times the rank term.")
@click.option("--rank-weight", type=float, default=None, show_default="1",
              help="ρ, weight of L_rank, the gap between the log effective ranks of the decoded image's CLIP tokens "
                   "and the original's (eigenvalues of the token matrix); 0: token MSE only.")
@_clip_options("open_clip model whose tokens are compared.", "Local CLIP weights file instead of the registry.")
@click.option("--guide-layers", default=None,
              help="CLIP layers guiding P (1..depth, e.g. 6,12). [default: 1/4 and 1/2 of the tower's depth]")
@click.option("--token-layers", default=None,
              help="CLIP layers L_sem compares (e.g. 6,12,18,23). [default: 1/4, 1/2, 3/4 of the depth and depth-1]")
@click.option("--pre-edit-channels", type=click.IntRange(1), default=None, show_default="32", help="P's width.")
@_gain_map_options("0.5", "both", ("random", "clip", "both"))
@click.option("-o", "--output", type=_OUT, default=None, help="Write the trained codec (.safetensors) here.")
@click.option("--register", default="{codec}", show_default=True,
              help="Registry name for the codec (encode finds a variable-rate codec under its bare name).")
@click.option("--pre-edit-output", type=_OUT, default=None,
              help="Write P here. Default: OUTPUT_STEM.preedit.safetensors beside -o.")
@click.option("--pre-edit-register", default="{codec}-preedit", show_default=True,
              help="Registry name for P (where `encode --pre-edit` looks).")
@click.option("--no-register", is_flag=True, help="Register neither the codec nor P (then -o is needed).")
@_run_options
@_guarded
def train_vbr_command(codec, pre_edit, init, config_json, steps, epochs, lr, pre_edit_lr, aux_lr, clip_max_norm, gamma,
                      beta, rank_weight, clip_model, clip_tag, clip_weights, clip_config, guide_layers, token_layers,
                      pre_edit_channels, gain_maps, gain_map_strength, gain_map_source, output, register,
                      pre_edit_output, pre_edit_register, no_register, debug, **run) -> None:
    """The variable-rate codec (and with --pre-edit the pre-editing module P) for LVLMs: R + λ_R(γ·MSE + β(L_sem +
    ρ·L_rank)) over every rate, L_sem the MSE of CLIP tokens of the decoded image against the original's at several
    layers and L_rank the gap between their log effective ranks (arXiv 2407.17060).

    \b
    Example:
      comneck train vbr --pre-edit --init mbt2018-mean-vbr.safetensors --data photos/ --steps 20000
    """
    _add_clip_config(clip_config)
    from comneck_cli.train.vbr import VbrTrainConfig, train_vbr

    cfg = VbrTrainConfig(
        codec=codec, pre_edit=pre_edit or None, init=init, config=_json_config(config_json), steps=steps,
        epochs=epochs, lr=lr, pre_edit_lr=pre_edit_lr, aux_lr=aux_lr, clip_max_norm=clip_max_norm, beta=beta,
        gamma=gamma, rank_weight=rank_weight, clip_model=clip_model, clip_tag=clip_tag, clip_weights=clip_weights,
        guide_layers=_numbers(guide_layers, int, "--guide-layers"),
        token_layers=_numbers(token_layers, int, "--token-layers"), pre_edit_channels=pre_edit_channels,
        gain_maps=gain_maps, gain_map_strength=gain_map_strength, gain_map_source=gain_map_source, output=output, register=None if no_register else register, pre_edit_output=pre_edit_output,
        pre_edit_register=None if no_register else pre_edit_register, **run)
    result = _trained(train_vbr, cfg)
    _summary(run["quiet"], f"{cfg.codec}{' and pre-editing module' if cfg.pre_edit else ''}", result)
    extra = result.extra or {}
    if not run["quiet"] and extra.get("pre_edit_output"):
        click.echo(f"comneck: wrote pre-editing module {extra['pre_edit_output']}", err=True)
    if not run["quiet"] and extra.get("pre_edit_registered"):
        click.echo(f"comneck: registered pre-editing module {extra['pre_edit_registered']}", err=True)


@train.command("postprocess")
@click.option("--codec", default=None, help="Codec whose reconstructions x_hat the U-Net reads (frozen).")
@_quality_option("Codec quality level.")
@click.option("--weights", "--codec-weights", "weights", type=_FILE, default=None,
              help="Codec file (as `eval --weights`). Default: registry entry CODEC-qQUALITY, else the CompressAI zoo.")
@_clip_options("open_clip model name of the CLIP tower.")
@click.option("--target", default=None, show_default="pooled",
              help="CLIP output L_dist compares, as for `train neck --target` (pooled, projected, patch:-2, ...).")
@click.option("--template", "templates", multiple=True,
              help="Prompt template for class names (repeatable). [default: 'a photo of a {}.']")
@click.option("--steps", default=None, help="Steps per stage: one number or three, e.g. 5000,5000,5000 (or --epochs).")
@click.option("--epochs", default=None, help="Epochs per stage: one number or three.")
@click.option("--lr", default=None, show_default="1e-4,1e-5,1e-5",
              help="Learning rate per stage, one or three numbers.")
@click.option("--ce-dist", default=None, show_default="1:100", help="Stage 2 weights of cross-entropy : distillation.")
@click.option("--base", type=click.IntRange(1), default=None, show_default="64",
              help="U-Net channels at the top level.")
@click.option("--depth", type=click.IntRange(1), default=None, show_default="4", help="U-Net down/up-sampling levels.")
@click.option("-o", "--output", type=_OUT, default=None, help="Write the trained U-Net (.safetensors) here.")
@click.option("--register", default="{codec}-q{quality}-postprocess", show_default=True,
              help="Registry name for the U-Net (`eval --methods postprocess` finds CODEC-qQUALITY-postprocess).")
@click.option("--no-register", is_flag=True, help="Do not add the U-Net to the registry (then -o is needed).")
@_run_options
@_guarded
def train_postprocess_command(codec, quality, weights, clip_model, clip_tag, clip_weights, clip_config, target,
                              templates, steps, epochs, lr, ce_dist, base, depth, output, register, no_register, debug,
                              **run) -> None:
    """Train the Post-processing baseline: x_hat -> U-Net -> CLIP, the neck's d1 loss and stages (paper §4.1).

    \b
    Example:
      comneck train postprocess --codec elic2022-official -q 2 --data imagenet/train --epochs 20,20,20
    """
    _add_clip_config(clip_config)
    from comneck_cli.train.postprocess import PostprocessTrainConfig, train_postprocess

    cfg = PostprocessTrainConfig(
        codec=codec, quality=quality, weights=weights, clip_model=clip_model, clip_tag=clip_tag,
        clip_weights=clip_weights, target=target, templates=tuple(templates) or None,
        steps=_numbers(steps, int, "--steps"), epochs=_numbers(epochs, int, "--epochs"), lr=_numbers(lr, float, "--lr"),
        ce_dist=_ce_dist(ce_dist), base=base, depth=depth, output=output,
        register=None if no_register else register, **run)
    result = _trained(train_postprocess, cfg)
    _summary(run["quiet"], f"post-processing U-Net for {_rates(cfg.codec, cfg.quality)}", result)


@train.command("adapter")
@click.option("--codec", default=None, help="Codec whose y_hat and x_hat the adapter reads (frozen).")
@_quality_option("Codec quality level (fixed-rate codecs; a variable-rate codec draws R from --rates each step).")
@click.option("--weights", "--codec-weights", "weights", type=_FILE, default=None,
              help="Codec file. Default: the registry entry (CODEC or CODEC-qQUALITY), else the CompressAI zoo.")
@_clip_options("open_clip model whose layer-0 tokens the adapter corrects (frozen).")
@click.option("--rates", default=None, show_default="1,8", help="Variable-rate codecs: the range R is drawn from.")
@click.option("--shallow-layer", type=int, default=None, show_default="0",
              help="Hidden state of the importance-weighted term (Hugging Face numbering; 0: the layer-0 tokens).")
@click.option("--loss-weights", default=None, show_default="0.1,1",
              help="Weights of the importance-weighted shallow MSE and of the final-embedding MSE (CoTAM's).")
@click.option("--warmup-epochs", type=click.FloatRange(0), default=None, show_default="5",
              help="Epochs trained on the shallow term alone before the final-embedding term joins (CoTAM's).")
@click.option("--semantic-strength", type=click.FloatRange(0, 65.535), default=None, show_default="0",
              help="Train on --semantic records of this strength (guided by the same CLIP); 0: plain records.")
@click.option("--gain-maps", type=click.FloatRange(0, 1), default=None, show_default="1; 0.5 with --semantic-strength",
              help="Share of steps whose batch is coded at one random quality mask (CoTAM's uniform / patch / "
                   "gradient masks, as --semantic records carry them); the mask weighs the shallow term's tokens.")
@click.option("--gain-map-strength", type=click.FloatRange(0, 65.535, min_open=True), default=None, show_default="3",
              help="Largest strength S of those masks (each batch draws S ~ U[0, S]).")
@click.option("--steps", type=click.IntRange(0), default=None, help="Optimizer steps (or --epochs).")
@click.option("--epochs", type=click.IntRange(0), default=None, help="Passes over the data (or --steps).")
@click.option("--lr", type=float, default=None, show_default="5e-4", help="Adam learning rate.")
@click.option("-o", "--output", type=_OUT, default=None, help="Write the trained adapter (.safetensors) here.")
@click.option("--register", default="{name}", show_default=True,
              help="Registry name; {name} is CODEC-adapter (variable rate) or CODEC-qQUALITY-adapter, where "
                   "`eval --methods semantic-adapter` looks.")
@click.option("--no-register", is_flag=True, help="Do not add the adapter to the registry (then -o is needed).")
@_run_options
@_guarded
def train_adapter_command(codec, quality, weights, clip_model, clip_tag, clip_weights, clip_config, rates,
                          shallow_layer, loss_weights, warmup_epochs, semantic_strength, gain_maps, gain_map_strength,
                          steps, epochs, lr, output, register, no_register, debug, **run) -> None:
    """Train the CoTAM decoder adapter A: CLIP reads E(x_hat) + A(y_hat), its layer-0 tokens corrected from y_hat.

    Loss: importance-weighted shallow-token MSE (x0.1) + final-embedding MSE, the latter after the warm-up epochs.
    --crop defaults to 16 pixels per CLIP token (ViT-L-14: 256).

    \b
    Example:
      comneck train adapter --codec mbt2018-mean-vbr --data imagenet/train --epochs 20 --semantic-strength 1.5
    """
    _add_clip_config(clip_config)
    from comneck_cli.train.adapter import AdapterTrainConfig, train_adapter

    cfg = AdapterTrainConfig(
        codec=codec, quality=quality, weights=weights, clip_model=clip_model, clip_tag=clip_tag,
        clip_weights=clip_weights, rates=_numbers(rates, float, "--rates"), shallow_layer=shallow_layer,
        loss_weights=_numbers(loss_weights, float, "--loss-weights"), warmup_epochs=warmup_epochs,
        semantic_strength=semantic_strength, gain_maps=gain_maps, gain_map_strength=gain_map_strength, steps=steps,
        epochs=epochs, lr=lr, output=output, register=None if no_register else register, **run)
    result = train_adapter(cfg)
    _summary(run["quiet"], f"decoder adapter for {cfg.codec}", result)


if __name__ == "__main__":  # `python -m comneck_cli.cli.train_commands ...`, e.g. under torchrun
    train()
