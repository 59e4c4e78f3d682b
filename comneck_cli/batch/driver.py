"""The batch driver: plan every input and its outputs (clashes refused before anything is written), run the chunks
on an engine, and tally the outcomes (:class:`Report`, ``OUTPUT/errors.jsonl``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

from comneck_cli.errors import ComneckError, InputError, UsageError
from comneck_cli.io.outputs import STDIO
from comneck_cli.batch.engines import RayOptions, ray_problem, run_local, run_ray
from comneck_cli.batch.jobs import CNK_SUFFIX, Job
from comneck_cli.batch.plan import Item, chunks, plan_inputs, records_of

ERRORS_FILE = "errors.jsonl"


def _backticks(param: str) -> str:
    return f"`{param}`"


class Report:
    """Tallies outcomes and keeps the failures for ``errors.jsonl``; prints nothing. ``spell`` writes the parameters
    a reason names (``ComneckError.render``: the CLI passes its flags); ``on_warning(note)`` gets each distinct
    warning once per job, ``on_failure(path, reason, traceback)`` each failed input, ``on_progress(done, total)``
    follows the inputs."""

    def __init__(self, output: Path, command: str, *, spell: Callable[[str], str] = _backticks,
                 on_warning: Callable[[str], None] | None = None,
                 on_failure: Callable[[str, str, str], None] | None = None,
                 on_progress: Callable[[int, int], None] | None = None) -> None:
        self.output, self.command, self.spell = output, command, spell
        self.on_warning, self.on_failure, self.on_progress = on_warning, on_failure, on_progress
        self.counts = {"done": 0, "skipped": 0, "failed": 0}
        self.total = 0  # set by :func:`execute` once the plan is made
        self.errors: list[dict[str, str]] = []
        self._warned: set[str] = set()  # a warning about the models (not one input) is said once per job

    def add(self, outcome: dict) -> None:
        status = outcome["status"]
        self.counts[status] += 1
        for note in outcome.get("warnings", ()):
            if note not in self._warned:
                self._warned.add(note)
                if self.on_warning is not None:
                    self.on_warning(note)
        if status == "failed":
            reason = ComneckError(outcome["reason"], params=outcome.get("params", ())).render(self.spell)
            self.errors.append({"path": outcome["path"], "reason": reason})
            if self.on_failure is not None:
                self.on_failure(outcome["path"], reason, outcome.get("traceback", ""))
        if self.on_progress is not None:
            self.on_progress(sum(self.counts.values()), self.total)

    def finish(self) -> str:
        """Write (or, after a clean run, remove) errors.jsonl; returns the summary line."""
        from comneck_cli.io.outputs import write_atomic

        path = self.output / ERRORS_FILE
        if self.errors:
            text = "".join(json.dumps(e, ensure_ascii=False) + "\n" for e in self.errors)
            write_atomic(path, text.encode(), force=True)
        else:
            path.unlink(missing_ok=True)
        c = self.counts
        line = f"batch {self.command}: {c['done']} done, {c['skipped']} skipped, {c['failed']} failed"
        return line + (f"; see {path}" if self.errors else "")


def execute(job: Job, spec: str, output: Path, report: Report, *, relative_to: Path | None = None,
            engine: str = "local", options: RayOptions | None = None, batch_size: int = 8) -> None:
    """Plan every input of ``spec`` (:func:`plan_inputs`) and its outputs, then run the chunks through ``job``
    on ``engine`` (local or ray), adding each outcome to ``report``. The caller calls ``report.finish()``, also
    after an interrupt; a setup error (models that do not load) propagates: no input was tried."""
    from comneck_cli.io.outputs import make_folder

    if relative_to is not None and (spec != STDIO and Path(spec).is_dir()):
        raise UsageError("`relative_to` applies to a list of paths; a folder `input` is mirrored from itself",
                         params=["relative_to", "input"])
    items, refused = plan_inputs(spec, job.suffixes, output, relative_to)
    items, clashing = _without_clashes(job, items)
    refused += clashing
    if not items and not refused:
        raise InputError(f"no inputs: {spec} holds no {' / '.join(job.suffixes)} files")
    if engine == "ray" and (problem := ray_problem()) is not None:
        raise problem
    make_folder(output)
    plan = chunks(items, batch_size)
    report.total = len(items) + len(refused)
    for entry in refused:
        report.add({"path": entry["path"], "status": "failed", "reason": entry["reason"],
                    "params": entry.get("params", [])})
    if plan:
        outcomes = run_local(job, plan) if engine == "local" else run_ray(job, plan, options or RayOptions(),
                                                                          job.debug)
        for outcome in outcomes:
            report.add(outcome)


def _without_clashes(job: Job, items: list[Item]) -> tuple[list[Item], list[dict[str, str]]]:
    """Every input's outputs, planned before any is written (``outputs.clashes``): an input that would write what an
    earlier one writes is refused -- a/b.png and a/b.jpg (both OUT/a/b.cnk), or a stream's numbered outputs and
    another input's (a.cnk's record 1 and a_0001.cnk, both OUT/a_0001.png), or an output that is an input of the run."""
    from comneck_cli.io.outputs import clashes

    counts = _stream_counts(job, items)
    refused = clashes([(item.label, job.targets(item, counts.get(item, 1))) for item in items],
                      inputs=[(item.label, item.source) for item in items])
    kept = [item for index, item in enumerate(items) if index not in refused]
    return kept, [{"path": items[index].label, "reason": reason} for index, reason in refused.items()]


def _stream_counts(job: Job, items: list[Item]) -> dict[Item, int]:
    """The records in each ``.cnk`` input whose numbered outputs could meet another input's: ``a.cnk`` beside
    ``a_0001.cnk`` (read, both of them). Other inputs are not read while planning: their outputs can only meet
    by sharing a stem, whatever their record counts."""
    if CNK_SUFFIX not in job.suffixes:
        return {}
    by_stem = {Path(item.relative).with_suffix("").as_posix().casefold(): item for item in items}
    counts: dict[Item, int] = {}
    for item in items:
        stem, underscore, number = Path(item.relative).with_suffix("").as_posix().casefold().rpartition("_")
        parent = by_stem.get(stem) if underscore and len(number) >= 4 and number.isdigit() else None
        if parent is not None:
            for each in (parent, item):
                if each not in counts:
                    try:
                        counts[each] = max(1, len(records_of(each, job.limits())))
                    except (ComneckError, OSError):  # its worker reports the damage
                        counts[each] = 1
    return counts

