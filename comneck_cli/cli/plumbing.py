"""What every command shares: the run state, the one error guard, signals, the progress bar, quiet imports and
``--for`` presets (torch-free: every command module imports it at start-up).

The library raises :class:`comneck_cli.errors.ComneckError` whose messages name parameters in backticks; here they
become flags (:func:`flag`), one line on stderr, and an exit status: 1 for a failure, 2 for a usage error (the
library's :class:`~comneck_cli.errors.UsageError` exits as Click's own do), 130 / 143 for Ctrl-C / SIGTERM.
"""

from __future__ import annotations

import re
import signal
import sys
import traceback
import warnings
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Iterator

import click

from comneck_cli.errors import ComneckError, UsageError

INTERRUPTED = "interrupted; outputs already written are complete, no partial file was left"
FLAGS = {"clip_model": "--clip", "family": "--for"}
"""Parameters whose flag is not ``--`` + their name with dashes, where the running command does not say."""


def flag(param: str) -> str:
    """The command-line spelling of a library parameter named in an error: the running command's option of that
    name (``num_gpus`` -> ``--num-gpus-per-worker``, ``clip_model`` -> ``--clip`` or ``--clip-model``), else
    ``clip_weights`` -> ``--clip-weights``."""
    ctx = click.get_current_context(silent=True)
    for option in ctx.command.params if ctx is not None else ():
        longs = [o for o in option.opts if o.startswith("--")]
        if option.name == param and isinstance(option, click.Option) and longs:
            return longs[0]
    return FLAGS.get(param, "--" + param.replace("_", "-"))


def spell_params(text: str) -> str:
    """A library sentence that reached the CLI as text (eval's skip reasons, per-input failures) with each backticked
    parameter of the running command spelled as its flag; other backticked words stay as they are."""
    ctx = click.get_current_context(silent=True)
    names = {option.name for option in (ctx.command.params if ctx is not None else ())} | set(FLAGS)
    return re.sub(r"`([a-z_]+)`", lambda m: flag(m.group(1)) if m.group(1) in names else m.group(0), text)


def message(exc: BaseException) -> str:
    """The sentence of an error as the command line says it: parameters spelled as flags."""
    return exc.render(flag) if isinstance(exc, ComneckError) else str(exc)


@dataclass
class Run:
    """Per-invocation settings shared by the commands, and the tally of failed inputs.

    It is the ``report`` the library's multi-input functions take: ``warn(message)`` and ``fail(label, exc)``.
    """

    quiet: bool = False
    debug: bool = False
    fail_fast: bool = False
    force: bool = False
    device: str = "auto"
    max_pixels: int | None = None
    failures: list[str] = field(default_factory=list)

    def limits(self):
        """The environment's limits with --max-pixels applied: one bound for images, frames, records and features."""
        from comneck_cli.io.images import input_limits

        return input_limits(max_pixels=self.max_pixels)

    def warn(self, text: str) -> None:
        if not self.quiet:
            click.echo(f"comneck: warning: {text}", err=True)

    def fail(self, label: str, exc: BaseException) -> None:
        """Record one failed input; go on unless --fail-fast."""
        text = message(exc)
        text = f"{label}: {text}" if label and not text.startswith(label) else text
        if self.debug:
            traceback.print_exception(exc, file=sys.stderr)
        click.echo(f"comneck: error: {text}", err=True)
        self.failures.append(text)
        if self.fail_fast:
            raise SystemExit(1)

    def exit(self) -> None:
        raise SystemExit(1 if self.failures else 0)


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so that every ``finally`` (temp-file cleanup) runs."""


@contextmanager
def terminate_as_interrupt() -> Iterator[None]:
    """SIGTERM raises :class:`Terminated` while the block runs (only in the main thread: embedded use is left alone)."""
    def handler(signum, frame):
        raise Terminated()

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextmanager
def guard(debug: bool = False, interrupted: str = INTERRUPTED, *, sigterm: bool = True) -> Iterator[None]:
    """The one error guard: a ComneckError becomes one line and exit 1 (a UsageError: Click's usage error, exit 2);
    Ctrl-C says ``interrupted`` and exits 130, SIGTERM (with ``sigterm``) the same with 143."""
    try:
        with terminate_as_interrupt() if sigterm else nullcontext():
            yield
    except UsageError as exc:
        if debug:
            traceback.print_exc()
        raise click.UsageError(message(exc)) from None
    except ComneckError as exc:  # the sentences of the library, the container and the registry
        if debug:
            traceback.print_exc()
        click.echo(f"comneck: error: {message(exc)}", err=True)
        raise SystemExit(1) from None
    except KeyboardInterrupt as exc:
        click.echo(f"comneck: {interrupted}", err=True)
        raise SystemExit(143 if isinstance(exc, Terminated) else 130) from None


SPINNER_AFTER_S = 2.0
"""A step still running after this long gets a spinner with the elapsed time (quick commands never flash one)."""


class Bar:
    """The progress of one command: ``advance()`` one input, or ``bar(done, total)`` as the library's
    ``on_progress`` callback. Does nothing when no bar is shown.

    Until a count of at least ``minimum`` is known, and for a run of one long step (a 3000×2000 decode takes a
    minute), the task is a spinner with the elapsed time, shown once the step has run :data:`SPINNER_AFTER_S`."""

    def __init__(self, progress=None, label: str = "", minimum: int = 2, task=None) -> None:
        self._progress, self._label, self._minimum, self._task = progress, label, minimum, task
        self._counting = False

    def start(self, total: int, done: int = 0) -> None:
        if self._progress is not None and not self._counting and total >= self._minimum:
            self._progress.update(self._task, total=total, completed=done, visible=True)
            self._counting = True

    def advance(self) -> None:
        if self._counting:
            self._progress.advance(self._task)

    def __call__(self, done: int, total: int) -> None:
        self.start(total, done)
        if self._counting:
            self._progress.update(self._task, completed=done, total=total)


@contextmanager
def progress(quiet: bool, label: str, total: int | None = None, *, minimum: int = 2) -> Iterator[Bar]:
    """The one progress bar: rich, on stderr, only on a terminal and without --quiet; a bar for ``minimum`` steps or
    more (``total`` starts it at once; without it the first ``on_progress`` call does), else a spinner with the
    elapsed time once the work has taken :data:`SPINNER_AFTER_S`."""
    if quiet or not sys.stderr.isatty():
        yield Bar()
        return
    import threading

    from rich.console import Console
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn,
                               TimeRemainingColumn)

    with Progress(SpinnerColumn(), TextColumn(label), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TimeRemainingColumn(), console=Console(stderr=True), transient=True) as rich_progress:
        task = rich_progress.add_task(label, total=None, visible=False)
        bar = Bar(rich_progress, label, minimum, task)
        if total is not None:
            bar.start(total)
        timer = threading.Timer(SPINNER_AFTER_S, lambda: rich_progress.update(task, visible=True))
        timer.daemon = True
        timer.start()
        try:
            yield bar
        finally:
            timer.cancel()


def quiet_imports() -> None:
    """Silence the warnings heavy imports print on every start (torch.jit.script decorators in CompressAI)."""
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.jit")
    warnings.filterwarnings("ignore", message=r".*torch\.jit\.script.*")


def apply_preset(family: str | None, layer: int, select: str, clip_model: str | None, clip_tag: str | None
                 ) -> tuple[int, str, str | None, str | None, bool]:
    """``--for FAMILY``: the family's layer, selection, tower and padding; an explicit option that contradicts it is
    a usage error. Returns (layer, select, clip_model, clip_tag, pad_to_square)."""
    if family is None:
        return layer, select, clip_model, clip_tag, False
    from comneck_cli.clip.presets import get_preset

    ctx = click.get_current_context()
    preset = get_preset(family)
    for name, value in (("layer", layer), ("select", select), ("clip_model", clip_model), ("clip_tag", clip_tag)):
        if ctx.get_parameter_source(name) == click.core.ParameterSource.COMMANDLINE and value != getattr(preset, name):
            raise click.UsageError(f"--for {family} sets {flag(name)} {getattr(preset, name)}; "
                                   f"drop {flag(name)} {value}")
    return preset.layer, preset.select, preset.clip_model, preset.clip_tag, preset.pad_to_square
