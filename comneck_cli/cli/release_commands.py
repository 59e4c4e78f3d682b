"""``comneck weights import-comneck`` and ``comneck weights fetch``: the ComNeck authors' released models and
CompressAI's zoo codecs into the registry (issue #18).

Two ``click.Command`` objects for the ``weights`` group (``weights_group.add_command(import_comneck)`` and
``(fetch)``). Importing this module imports neither torch nor compressai: the commands import the library when
they run (:mod:`comneck_cli.models.release`).
"""

from __future__ import annotations

from pathlib import Path

import click

from comneck_cli.cli.plumbing import guard, progress, quiet_imports


def _report(imported) -> None:
    click.echo(f"imported {imported.source} ({imported.scenario}, quality {imported.quality}): codec "
               f"{imported.codec.name} sha256 {imported.codec.sha256[:12]}…, neck {imported.neck.name}", err=True)


@click.command("import-comneck")
@click.argument("files", nargs=-1, required=True, type=click.Path(path_type=Path, exists=True, dir_okay=False))
@click.option("--scenario", type=click.Choice(["d1", "d2", "d3"]), default=None,
              help="The release's scenario, for one FILE not named d{S}_{Q}.pth.tar.")
@click.option("--quality", type=click.IntRange(1, 4), default=None,
              help="The release's quality, for one FILE not named d{S}_{Q}.pth.tar.")
@click.option("--debug", is_flag=True, help="Show tracebacks.")
def import_comneck(files: tuple[Path, ...], scenario: str | None, quality: int | None, debug: bool) -> None:
    """Register the ComNeck authors' released FILES (d1_1.pth.tar ... d3_4.pth.tar): each one's codec weights and
    the neck trained on them.

    d1 is the base codec, what `--codec elic-comneck -q Q` uses; d2 and d3 register as elic-comneck-qQ-d2|d3, used
    with --weights (d3 records are for machines only). `comneck features` picks each record's neck by itself.
    Every file is checked before anything is registered.
    """
    with guard(debug):
        quiet_imports()
        from comneck_cli.models.release import import_releases

        import_releases(files, scenario, quality, done=_report)


@click.command("fetch")
@click.argument("name")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@click.option("--debug", is_flag=True, help="Show tracebacks.")
def fetch(name: str, quiet: bool, debug: bool) -> None:
    """Download and register NAME: `comneck` (the authors' twelve released files, then import-comneck) or a
    CompressAI zoo codec CODEC-qQ (e.g. mbt2018-mean-q3).

    An interrupted download resumes where it stopped; the sha256 of every file is recorded. Offline, it says which
    URL to fetch by hand and which import command to run then.
    """
    with guard(debug):
        quiet_imports()
        from comneck_cli.models import release

        if name == "comneck":
            with progress(quiet, "downloading", minimum=1) as bar:
                release.fetch_release(progress=lambda file: _bytes(bar), done=_report)
            return
        with progress(quiet, f"downloading {name}", minimum=1) as bar:
            entry = release.fetch_zoo(name, progress=_bytes(bar))
        click.echo(f"imported {name} (codec) sha256 {entry.sha256[:12]}… -> {entry.path()}", err=True)


def _bytes(bar):
    """The download callback (bytes so far, total or None) for the progress bar, which needs a total."""
    return lambda done, total: bar(done, total) if total else None
