"""``comneck weights list|import|import-comneck|fetch``: the registry of named, sha256-checked model files (the
last two, the ComNeck release and CompressAI's zoo, are in ``release_commands``)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import click

from comneck_cli.cli.plumbing import guard, quiet_imports
from comneck_cli.cli.release_commands import fetch, import_comneck

KINDS = ["codec", "neck", "clip", "postprocess", "adapter", "preedit"]


@click.group("weights")
def weights_group() -> None:
    """The registry of named model files (codecs, necks, CLIP), sha256-checked."""


@weights_group.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def weights_list(as_json: bool) -> None:
    """List registered model files: name, kind, origin, sha256 and what they were made for."""
    from comneck_cli import weights as registry

    with guard():  # a damaged manifest
        entries = registry.entries()
    if as_json:
        click.echo(json.dumps([{"name": e.name, "kind": e.kind, "origin": e.origin, "sha256": e.sha256,
                                "path": str(e.path()), "info": e.info} for e in entries.values()], indent=2))
        return
    if not entries:
        click.echo(f"no weights registered (user registry: {registry.user_dir()})", err=True)
    for e in entries.values():
        # an unset setting (d1's λ, a variable-rate neck's quality: every rate) is left out, not shown as None
        details = ", ".join(f"{k}={v if isinstance(v, str) else json.dumps(v, ensure_ascii=False)}"
                            for k, v in e.info.items() if v is not None)
        click.echo(f"{e.name}\t{e.kind}\t{e.origin}\t{e.sha256[:12]}\t{details}")


@weights_group.command("import")
@click.argument("name")
@click.argument("file", type=click.Path(path_type=Path, exists=True, dir_okay=False))
@click.option("--kind", type=click.Choice(KINDS), default=None,
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
    elif kind == "codec" and (variant := re.fullmatch(r"(.+?)-q(\d+)-.+", name)) and variant[1] in CODEC_IDS:
        info = {"codec": variant[1], "quality": int(variant[2])}  # a named variant, e.g. elic-comneck-q2-d2
    if kind is None:
        raise click.UsageError("cannot guess what NAME is: pass --kind codec|neck|clip")
    if kind == "codec" and not info:  # encode and decode look codecs up by these names only: any other is never found
        raise click.UsageError(f"a codec is registered as CODEC-qQUALITY (e.g. mbt2018-mean-q3, or a variant such as "
                               f"elic-comneck-q2-d2), or a variable-rate codec under its bare name (e.g. "
                               f"mbt2018-mean-vbr), not as {name!r}")
    if half and kind != "codec":
        raise click.UsageError("--half applies to codec files only")
    with guard(sigterm=False):
        if info.get("codec") is not None:  # refuse notes.txt or another codec's file now, not at first use
            quiet_imports()
            from comneck_cli.codecs import check_codec_file

            check_codec_file(file, info["codec"], info.get("quality"))
        if half:
            import tempfile

            quiet_imports()
            from comneck_cli.codecs import half_codec_file

            with tempfile.TemporaryDirectory(prefix="comneck-half-") as folder:
                halved = Path(folder) / f"{name}.safetensors"
                half_codec_file(file, halved)
                entry = registry.import_file(name, halved, kind, {**info, "dtype": "float16"}, move=True)
        else:
            entry = registry.import_file(name, file, kind, info)
    click.echo(f"imported {name} ({kind}) sha256 {entry.sha256[:12]}… -> {entry.path()}", err=True)


weights_group.add_command(import_comneck)
weights_group.add_command(fetch)
