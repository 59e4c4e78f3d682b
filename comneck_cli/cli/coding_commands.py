"""``comneck encode``, ``decode`` and ``info``: options and messages over :mod:`comneck_cli.coding.files`."""

from __future__ import annotations

import functools
import json
import sys
from contextlib import nullcontext
from pathlib import Path

import click

from comneck_cli.cli.options import CODEC_CHOICE, check_codec_usage, check_output, common_options, guidance_options
from comneck_cli.cli.plumbing import Run, flag, progress, quiet_imports
from comneck_cli.defaults import DEFAULT_CODEC
from comneck_cli.errors import ComneckError
from comneck_cli.io.outputs import NO_RECORDS, STDIO, read_problem


@click.command()
@click.argument("images", nargs=-1, required=True, type=click.Path(path_type=str, allow_dash=True))
@click.option("-q", "--quality", type=int, default=3, show_default=True,
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
    limits = run.limits()  # a malformed COMNECK_MAX_PIXELS fails the run once, not each input
    check_output(output, run.force, what=".cnk records",
                 to_stdout=output == STDIO or (output is None and STDIO in images), inputs=images)
    quiet_imports()
    from comneck_cli import coding as api
    from comneck_cli.codecs import get_spec
    from comneck_cli.coding.files import encode_files

    api.check_guidance(get_spec(codec), semantic, semantic_strength, pre_edit)  # before any model loads
    device = api.resolve_device(run.device)

    @functools.cache
    def encoder() -> api.ImageEncoder:
        loaded = api.load_codec(codec, quality, weights=weights, device=device)
        return api.ImageEncoder.load(loaded if rate is None else loaded.at_rate(rate), bpp_target=bpp_target,
                                     semantic=semantic, semantic_strength=semantic_strength, clip_model=clip_model,
                                     clip_tag=clip_tag, clip_weights=clip_weights, pre_edit=pre_edit, device=device,
                                     limits=limits)

    with progress(run.quiet, "encoding") as bar:
        encode_files(images, output, encoder, run, force=run.force, limits=limits, batch_size=batch_size,
                     on_progress=bar)


@click.command()
@click.argument("files", nargs=-1, required=True, type=click.Path(path_type=str, allow_dash=True))
@click.option("-o", "--output", default=None, type=click.Path(path_type=str, allow_dash=True),
              help="Output image (format from the extension: .png .jpg .webp .tif), a folder, or - for PNG on "
                   "stdout. Several records to one name are numbered name_0001.png... Default: NAME.decoded.png "
                   "beside each NAME.cnk (never the name of the image it was coded from).")
@click.option("--weights", default=None,
              help="Codec weights file or registry name; must be what encoded the records (checked by digest).")
@common_options
def decode(run: Run, files: tuple[str, ...], output: str | None, weights: str | None) -> None:
    """Reconstruct images from .cnk FILES (or - for stdin) through the synthesis transform g_s."""
    from comneck_cli.io.images import WRITE_FORMATS

    to_stdout = output == STDIO or (output is None and STDIO in files)
    check_output(output, run.force, suffixes=WRITE_FORMATS, what="PNG images" if to_stdout else "images",
                 to_stdout=to_stdout, one_file=False)  # a stream's records get numbered names: checked as written
    quiet_imports()
    from comneck_cli import coding as api
    from comneck_cli.coding.files import decode_files

    cache = api.CodecCache(api.resolve_device(run.device), weights)
    with progress(run.quiet, "decoding") as bar:
        decode_files(files, output, cache, run, force=run.force, limits=run.limits(), on_progress=bar)


@click.command()
@click.argument("files", nargs=-1, required=True, type=click.Path(path_type=str, allow_dash=True))
@click.option("--json", "as_json", is_flag=True, help="Print one JSON list of records instead of a table.")
@click.option("--debug", is_flag=True, help="Show tracebacks for errors.")
def info(files: tuple[str, ...], as_json: bool, debug: bool) -> None:
    """Show the header of each record in .cnk FILES: codec, size, strings, payload, overhead, bpp."""
    from comneck_cli import weights as registry
    from comneck_cli.formats import CnkError, iter_records, pack

    run = Run(debug=debug)
    rows = []
    for source in files:
        number = 0  # records of the stream read so far, damaged ones included, so that numbers match decode's

        def damaged(exc: CnkError, source: str = source) -> None:
            nonlocal number
            number += 1
            run.fail(source, exc)  # as decode reports it ("record 2 (at byte N): ..."), and the others go on

        try:
            with nullcontext(sys.stdin.buffer) if source == STDIO else open(source, "rb") as f:
                for record in iter_records(f, on_damaged=damaged):
                    number += 1
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
                    if (old := registry.retired_codec(record.weights_digest.hex())) is not None:  # issue #34
                        restore = old.restore().replace("`weights`", flag("weights"))
                        run.warn(f"{source} record {number} was coded with codec weights "
                                 f"{record.weights_digest.hex()}, {restore}")
            if not number:
                raise CnkError(NO_RECORDS)
        except (CnkError, OSError, ComneckError) as exc:  # ComneckError: a damaged table of shipped codecs
            msg = read_problem(exc) if isinstance(exc, OSError) else str(exc)
            run.fail(source, ComneckError(msg, params=getattr(exc, "params", ())))  # --max-pixels, not `max_pixels`
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
                      str(r["quality"] if r["rate"] is None else f"{r['rate']:g}"), f"{r['width']}×{r['height']}",
                      str(len(r["strings"])), str(r["payload_bytes"]), str(r["overhead_bytes"]), f"{r['bpp']:.4f}",
                      r["weights_digest"])
    console = Console()
    if not console.is_terminal:  # pipes and files get every column in full, not squeezed to 80
        console.width = 200
    console.print(table)
