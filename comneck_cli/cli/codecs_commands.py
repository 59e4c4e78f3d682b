"""``comneck codecs`` and ``comneck complexity``: what the codecs are, and what their parts cost."""

from __future__ import annotations

import json

import click

from comneck_cli.cli.options import CODEC_CHOICE, check_codec_usage
from comneck_cli.cli.plumbing import guard, quiet_imports
from comneck_cli.defaults import DEFAULT_CODEC


@click.command("codecs")
def codecs_command() -> None:
    """List the codecs comneck can use, their quality levels and sizes (N, and M = latent channels): those of the
    registered file where one is registered (its metadata), else CompressAI's zoo table."""
    quiet_imports()
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


@click.command()
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
    quiet_imports()
    with guard():
        from comneck_cli.eval.complexity import measure

        rows, sized = measure(codec, quality, clip_model, size, k)
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
