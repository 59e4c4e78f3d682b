"""The ``comneck`` command line: thin Click commands over the library API.

Importing this module must not import torch (``comneck --help`` and ``comneck info`` stay fast):
heavy modules are imported inside the commands that need them.
"""

from __future__ import annotations

import functools
import json
import sys
import traceback
import warnings
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import click

from .errors import ComneckError

STDIO = "-"


@dataclass
class Run:
    """Per-invocation settings shared by the commands, and the tally of failed inputs."""

    quiet: bool = False
    debug: bool = False
    fail_fast: bool = False
    force: bool = False
    device: str = "auto"
    failures: list[str] = field(default_factory=list)

    def warn(self, message: str) -> None:
        if not self.quiet:
            click.echo(f"comneck: warning: {message}", err=True)

    def fail(self, label: str, exc: BaseException) -> None:
        """Record one failed input; go on unless --fail-fast."""
        message = f"{label}: {exc}" if label and not str(exc).startswith(label) else str(exc)
        if self.debug:
            traceback.print_exception(exc, file=sys.stderr)
        click.echo(f"comneck: error: {message}", err=True)
        self.failures.append(message)
        if self.fail_fast:
            raise SystemExit(1)

    def exit(self) -> None:
        raise SystemExit(1 if self.failures else 0)


def common_options(func: Callable) -> Callable:
    """Options every data command takes."""

    @click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True,
                  help="Where g_a / g_s (and later the neck and CLIP) run; entropy coding always runs on the CPU.")
    @click.option("--quiet", is_flag=True, help="No progress bar, no warnings; errors still print.")
    @click.option("--force", is_flag=True, help="Overwrite existing output files.")
    @click.option("--fail-fast", is_flag=True, help="Stop at the first input that fails instead of going on.")
    @click.option("--debug", is_flag=True, help="Show tracebacks for errors.")
    @functools.wraps(func)
    def wrapper(*args, device, quiet, force, fail_fast, debug, **kwargs):
        run = Run(quiet=quiet, debug=debug, fail_fast=fail_fast, force=force, device=device)
        with _guard(run):
            func(run, *args, **kwargs)
        run.exit()

    return wrapper


@contextmanager
def _guard(run: Run) -> Iterator[None]:
    """Turn user-facing errors into one line and exit 1; Ctrl-C into a clear message and exit 130."""
    try:
        yield
    except ComneckError as exc:
        if run.debug:
            traceback.print_exc()
        click.echo(f"comneck: error: {exc}", err=True)
        raise SystemExit(1) from None
    except KeyboardInterrupt:
        click.echo("comneck: interrupted; finished outputs are complete, no partial file was left", err=True)
        raise SystemExit(130) from None


@contextmanager
def progress(run: Run, total: int, label: str) -> Iterator[Callable[[], None]]:
    """A rich progress bar on stderr, only on a terminal and without --quiet; yields ``advance()``."""
    if run.quiet or total < 2 or not sys.stderr.isatty():
        yield lambda: None
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    with Progress(TextColumn(label), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                  console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task(label, total=total)
        yield lambda: bar.advance(task)


def _quiet_imports() -> None:
    # compressai imports torch.jit.script decorators that warn on every start: noise for users.
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.jit")
    warnings.filterwarnings("ignore", message=r".*torch\.jit\.script.*")


@click.group(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.version_option(package_name="comneck")
def main() -> None:
    """Compress images for multimodal LLMs: learned codecs, .cnk files, CLIP features from latents."""


# --------------------------------------------------------------------------- encode
@main.command()
@click.argument("images", nargs=-1, required=True, type=click.Path(path_type=str, allow_dash=True))
@click.option("-q", "--quality", type=click.IntRange(1, 255), default=3, show_default=True,
              help="Codec quality level (higher = more bits); the codec's range is checked.")
@click.option("--codec", default="mbt2018-mean", show_default=True, help="Codec name (see `comneck codecs`).")
@click.option("--weights", type=click.Path(path_type=Path, exists=True, dir_okay=False), default=None,
              help="Codec weights file to use instead of the registry / CompressAI zoo.")
@click.option("-o", "--output", default=None, type=click.Path(path_type=str, allow_dash=True),
              help="Output .cnk file (all records in one stream), a folder (one file per image), or - for stdout. "
                   "Default: beside each image.")
@common_options
def encode(run: Run, images: tuple[str, ...], quality: int, codec: str, weights: Path | None, output: str | None) -> None:
    """Compress IMAGES (PNG, JPEG, WebP, TIFF, or - for stdin) into .cnk records."""
    _quiet_imports()
    from . import api
    from .codecs import get_spec, check_quality
    from .images import read_image
    from .outputs import is_dir_target, write_atomic, write_stdout

    spec = get_spec(codec)
    check_quality(spec, quality)
    device = api.resolve_device(run.device)
    loaded = api.load_codec(codec, quality, weights=weights, device=device)
    from formats import pack

    to_dir = is_dir_target(output)
    gathered: list[bytes] = []  # for a single output stream (file or stdout)
    with progress(run, len(images), "encoding") as advance:
        for name in images:
            try:
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    image = read_image(sys.stdin.buffer.read() if name == STDIO else Path(name),
                                       name="stdin" if name == STDIO else name)
                for w in caught:
                    run.warn(str(w.message))
                data = pack(api.encode(image, loaded))
                if output is None and name != STDIO:
                    write_atomic(Path(name).with_suffix(".cnk"), data, force=run.force)
                elif to_dir:
                    stem = "stdin" if name == STDIO else Path(name).stem
                    write_atomic(Path(output) / f"{stem}.cnk", data, force=run.force)
                else:
                    gathered.append(data)
            except ComneckError as exc:
                run.fail(name, exc)
            advance()
    if gathered:
        if output in (None, STDIO):
            write_stdout(b"".join(gathered))
        else:
            write_atomic(Path(output), b"".join(gathered), force=run.force)


# --------------------------------------------------------------------------- decode
@main.command()
@click.argument("files", nargs=-1, required=True, type=click.Path(path_type=str, allow_dash=True))
@click.option("-o", "--output", default=None, type=click.Path(path_type=str, allow_dash=True),
              help="Output image (format from the extension: .png .jpg .webp .tif), a folder, or - for PNG on "
                   "stdout. Several records to one name are numbered name_0001.png... Default: beside each file.")
@click.option("--weights", type=click.Path(path_type=Path, exists=True, dir_okay=False), default=None,
              help="Codec weights file; must be the one that encoded the records (checked by digest).")
@common_options
def decode(run: Run, files: tuple[str, ...], output: str | None, weights: Path | None) -> None:
    """Reconstruct images from .cnk FILES (or - for stdin) through the synthesis transform g_s."""
    _quiet_imports()
    from . import api
    from .images import encode_image_bytes, image_format_for
    from .outputs import is_dir_target, numbered, write_atomic, write_stdout

    cache = api.CodecCache(api.resolve_device(run.device), weights)
    to_dir = is_dir_target(output)
    jobs = _records(run, files)
    many = len(jobs) > 1
    with progress(run, len(jobs), "decoding") as advance:
        for index, (label, source, record_no, count, record) in enumerate(jobs, start=1):
            try:
                if output is None and source != STDIO:
                    target = Path(source).with_suffix(".png")
                    target = numbered(target, record_no) if count > 1 else target
                elif to_dir:
                    stem = "stdin" if source == STDIO else Path(source).stem
                    target = Path(output) / (f"{stem}_{record_no:04d}.png" if count > 1 else f"{stem}.png")
                elif output in (None, STDIO):
                    target = None
                else:
                    target = numbered(Path(output), index) if many else Path(output)
                fmt = image_format_for(target)
                image = api.decode(record, cache.for_record(record))
                data = encode_image_bytes(image, fmt)
                if target is None:
                    write_stdout(data)
                else:
                    write_atomic(target, data, force=run.force)
            except ComneckError as exc:
                run.fail(label, exc)
            advance()


def _records(run: Run, files: tuple[str, ...]) -> list[tuple[str, str, int, int, object]]:
    """Parse every input into (label, source, record number, records in source, Record); a bad file fails alone."""
    from formats import CnkError, iter_records

    jobs = []
    for source in files:
        found = []
        try:
            if source == STDIO:
                found = list(iter_records(sys.stdin.buffer))
            else:
                with open(source, "rb") as f:
                    found = list(iter_records(f))
            if not found:
                raise CnkError("no records in file (empty input)")
        except (CnkError, OSError) as exc:
            msg = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            run.fail(source, ComneckError(msg))
            continue
        for number, record in enumerate(found, start=1):
            label = source if len(found) == 1 else f"{source} record {number}"
            jobs.append((label, source, number, len(found), record))
    return jobs


# --------------------------------------------------------------------------- info
@main.command()
@click.argument("files", nargs=-1, required=True, type=click.Path(path_type=str, allow_dash=True))
@click.option("--json", "as_json", is_flag=True, help="Print one JSON list of records instead of a table.")
@click.option("--debug", is_flag=True, help="Show tracebacks for errors.")
def info(files: tuple[str, ...], as_json: bool, debug: bool) -> None:
    """Show the header of each record in .cnk FILES: codec, size, strings, payload, overhead, bpp."""
    from formats import CnkError, iter_records, pack

    run = Run(debug=debug)
    rows = []
    for source in files:
        try:
            with nullcontext(sys.stdin.buffer) if source == STDIO else open(source, "rb") as f:
                for number, record in enumerate(iter_records(f), start=1):
                    total = len(pack(record))
                    rows.append({
                        "file": source,
                        "record": number,
                        "codec": record.codec_name or f"unknown ({record.codec_id})",
                        "codec_id": record.codec_id,
                        "quality": record.quality,
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
        except (CnkError, OSError) as exc:
            msg = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            run.fail(source, ComneckError(msg))
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
                      str(r["quality"]), f"{r['width']}×{r['height']}", str(len(r["strings"])),
                      str(r["payload_bytes"]), str(r["overhead_bytes"]), f"{r['bpp']:.4f}", r["weights_digest"])
    console = Console()
    if not console.is_terminal:  # pipes and files get every column in full, not squeezed to 80
        console.width = 200
    console.print(table)


# --------------------------------------------------------------------------- codecs & weights
@main.command("codecs")
def codecs_command() -> None:
    """List the codecs comneck can use, their quality levels and latent channels."""
    _quiet_imports()
    from .codecs import CODECS

    for spec in CODECS.values():
        qs = sorted(spec.qualities)
        chans = sorted({spec.latent_channels(q) for q in qs})
        click.echo(f"{spec.name:22s} q{qs[0]}-{qs[-1]}  M={'/'.join(map(str, chans)):8s} "
                   f"zoo={'yes' if spec.zoo else 'no ':3s} {spec.notes}")


@main.group("weights")
def weights_group() -> None:
    """The registry of named model files (codecs, necks, CLIP), sha256-checked."""


@weights_group.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def weights_list(as_json: bool) -> None:
    """List registered model files: name, kind, origin, sha256 and what they were made for."""
    import weights as registry

    entries = registry.entries()
    if as_json:
        click.echo(json.dumps([{"name": e.name, "kind": e.kind, "origin": e.origin, "sha256": e.sha256,
                                "path": str(e.path()), "info": e.info} for e in entries.values()], indent=2))
        return
    if not entries:
        click.echo(f"no weights registered (user registry: {registry.user_dir()})", err=True)
    for e in entries.values():
        details = ", ".join(f"{k}={v}" for k, v in e.info.items())
        click.echo(f"{e.name}\t{e.kind}\t{e.origin}\t{e.sha256[:12]}\t{details}")


@weights_group.command("import")
@click.argument("name")
@click.argument("file", type=click.Path(path_type=Path, exists=True, dir_okay=False))
@click.option("--kind", type=click.Choice(["codec", "neck", "clip"]), default=None,
              help="What the file is; guessed from NAME (a codec name followed by -qN means codec).")
def weights_import(name: str, file: Path, kind: str | None) -> None:
    """Copy FILE into the user registry as NAME, recording its sha256.

    A codec is found by `encode`/`decode` under the name CODEC-qQUALITY, e.g. mbt2018-mean-q3.
    """
    import weights as registry

    info = {}
    codec, _, q = name.rpartition("-q")
    if kind in (None, "codec") and codec and q.isdigit():
        kind, info = "codec", {"codec": codec, "quality": int(q)}
    if kind is None:
        raise click.UsageError("cannot guess what NAME is: pass --kind codec|neck|clip")
    try:
        entry = registry.import_file(name, file, kind, info)
    except registry.WeightsError as exc:
        click.echo(f"comneck: error: {exc}", err=True)
        raise SystemExit(1) from None
    click.echo(f"imported {name} ({kind}) sha256 {entry.sha256[:12]}… -> {entry.path()}", err=True)


if __name__ == "__main__":  # pragma: no cover
    main()
