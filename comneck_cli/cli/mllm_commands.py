"""``comneck ask``: options and printing over :mod:`comneck_cli.mllm` (which is imported only when it runs)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from comneck_cli.cli.options import common_options
from comneck_cli.cli.plumbing import Run, quiet_imports
from comneck_cli.errors import ComneckError, UsageError
from comneck_cli.mllm import MAX_NEW_TOKENS

VIAS = ("neck", "adapter", "reconstruction", "uncompressed")  # comneck_cli.mllm.VIAS, without importing torch here


@click.command("ask")
@click.argument("inputs", nargs=-1, required=True, type=click.Path(path_type=str, allow_dash=True))
@click.option("--prompt", required=True, help="The question. It goes through the model's chat template when its "
              "processor has one; else it is used as written, with the image placeholder put first if it has none.")
@click.option("--mllm", "model", required=True,
              help="A LlavaForConditionalGeneration checkpoint with a CLIP vision tower: its folder, or a hub id "
                   "already in the Hugging Face cache (HF_HOME); nothing is downloaded.")
@click.option("--via", type=click.Choice(VIAS), default="neck", show_default=True,
              help="neck: .cnk latents -> neck -> the model's tower from block k+1 (no image decoding); adapter: "
                   "decoded image + the decoder adapter's tokens -> the tower; reconstruction: .cnk -> g_s -> the "
                   "model's processor and tower; uncompressed: an image through the model's processor and tower.")
@click.option("--neck", default=None, help="With --via neck: neck file or registry name, trained for this model's "
              "tower. Default: the registry's neck of each record's codec.")
@click.option("--adapter", default=None, help="With --via adapter: decoder adapter file or registry name.")
@click.option("--weights", default=None,
              help="Codec weights file or registry name for decoding the records (checked by digest). Default: "
                   "the registered file of each record's weights digest, else the codec's default.")
@click.option("--max-new-tokens", type=click.IntRange(1, MAX_NEW_TOKENS), default=64, show_default=True,
              help="Longest answer, in tokens (greedy decoding).")
@click.option("--dtype", type=click.Choice(["bf16", "fp16", "fp32"]), default=None,
              show_default="bf16 on CUDA, fp32 on the CPU", help="The model's weights and activations.")
@click.option("--json", "as_json", is_flag=True,
              help="One JSON object a line: {input, via, answer, bpp}.")
@common_options(writes=False)  # ask prints answers and writes no files: a --force would do nothing
def ask(run: Run, inputs: tuple[str, ...], prompt: str, model: str, via: str, neck: str | None, adapter: str | None,
        weights: str | None, max_new_tokens: int, dtype: str | None, as_json: bool) -> None:
    """Ask a LLaVA-family MLLM about INPUTS (.cnk files or streams, images with --via uncompressed, - for stdin).

    \b
    Prints the greedy answer: alone for one input, one "NAME: answer" line each for several.
    Example:
      comneck ask photo.cnk --prompt "What is in the picture?" --mllm llava-hf/llava-1.5-7b-hf --via reconstruction
    """
    if neck is not None and via != "neck":
        raise click.UsageError(f"--neck applies to --via neck only, not {via}")
    if adapter is not None and via != "adapter":
        raise click.UsageError(f"--adapter applies to --via adapter only, not {via}")
    if weights is not None and via == "uncompressed":
        raise click.UsageError("--weights decode .cnk records; --via uncompressed takes images")
    if inputs.count("-") > 1:
        raise click.UsageError("stdin (-) can be read only once")
    quiet_imports()
    from comneck_cli.mllm.model import load_mllm, require_transformers

    require_transformers()
    quiet_transformers()
    mllm = load_mllm(model, device=run.device, dtype=dtype)  # one line and exit 1 for a folder that is not there
    mllm.limits = run.limits()
    for name in inputs:
        try:
            source = sys.stdin.buffer if name == "-" else Path(name)  # stdin parsed as it arrives
            answers = mllm.ask([source], prompt, via=via, max_new_tokens=max_new_tokens, neck=neck, adapter=adapter,
                               weights=weights)
        except UsageError:
            raise  # the prompt or the options, not this input: exit 2 at once
        except ComneckError as exc:
            run.fail(name, exc)
            continue
        for answer in answers:
            if name == "-":  # the library names bytes by their position
                answer.input = "stdin" + answer.input.removeprefix("input 1")
            if as_json:
                click.echo(json.dumps(answer.to_json()))
            elif len(inputs) > 1 or len(answers) > 1:
                click.echo(f"{answer.input}: {answer.answer}")
            else:
                click.echo(answer.answer)


def quiet_transformers() -> None:
    """transformers' weight-loading progress bars and advice stay off stderr, which holds comneck's own lines."""
    from transformers.utils import logging

    logging.disable_progress_bar()
    logging.set_verbosity_error()
