"""What the server computes, through the library functions the CLI calls, so an endpoint answers byte for byte what
``comneck features - -o F``, ``comneck decode - -o F.png`` and ``comneck ask`` write for the same record on stdin.

:meth:`Service.parse` checks a request body on the event loop (the CLI's record limits); :meth:`Service.process`
runs a batch of jobs on the model thread: features requests with the same options share one
:meth:`FeatureRunner.compute <comneck_cli.features.FeatureRunner.compute>` (one forward pass per latent grid), ask
requests with the same prompt one :meth:`MLLM.ask <comneck_cli.mllm.MLLM.ask>`.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from comneck_cli.errors import ComneckError, InputError, UsageError
from comneck_cli.serve import ServeConfig

FORMATS = ("safetensors", "npy", "pt")
SELECTS = ("patch", "cls", "all", "pooled", "projected")
STDIN = "-"  # records are labelled as the CLI labels them on stdin, so the features' metadata match too


@dataclass(frozen=True)
class FeatureOptions:
    """One features request's options (the query of ``/v1/features``, ``for`` applied)."""

    via: str = "neck"
    layer: int = -2
    select: str = "patch"
    family: str | None = None
    fmt: str = "safetensors"
    clip_model: str | None = None
    clip_tag: str | None = None
    pad_to_square: bool = False

    @classmethod
    def parse(cls, query: dict[str, str], config: ServeConfig) -> "FeatureOptions":
        """From query parameters: ``via``, ``layer``, ``select``, ``for``, ``format``; a ``for`` family sets the
        rest, as ``comneck features --for`` does, and a contradicting ``layer`` or ``select`` is refused."""
        from comneck_cli.features import VIAS

        unknown = sorted(set(query) - {"via", "layer", "select", "for", "format"})
        if unknown:
            raise UsageError(f"unknown query parameter {unknown[0]!r}; use via, layer, select, for or format")
        via = _choice(query, "via", VIAS, "neck")
        select = _choice(query, "select", SELECTS, "patch")
        fmt = _choice(query, "format", FORMATS, "safetensors")
        try:
            layer = int(query.get("layer", "-2"))
        except ValueError:
            raise UsageError(f"layer must be an integer, not {query['layer']!r}") from None
        clip_model, clip_tag, pad, family = config.clip_model, config.clip_tag, False, query.get("for")
        if family is not None:
            from comneck_cli.clip.presets import get_preset

            preset = get_preset(family)
            for name, given in (("layer", "layer" in query and layer), ("select", "select" in query and select)):
                if given is not False and given != getattr(preset, name):
                    raise UsageError(f"for={family} sets {name} {getattr(preset, name)}; drop {name}={given}")
            layer, select, clip_model, clip_tag, pad = (preset.layer, preset.select, preset.clip_model,
                                                        preset.clip_tag, preset.pad_to_square)
        return cls(via, layer, select, family, fmt, clip_model, clip_tag, pad)


def _choice(query: dict[str, str], name: str, choices: Sequence[str], default: str) -> str:
    value = query.get(name, default)
    if value not in choices:
        raise UsageError(f"{name} must be one of {', '.join(choices)}, not {value!r}")
    return value


@dataclass
class Job:
    """One request's work: ``kind`` features, decode or ask; its records (parsed, limits checked) and options."""

    kind: str
    records: list  # (label, Record)
    body: bytes = b""
    options: Any = None


class _Collect:
    """A ``Report`` that keeps the first failure, to raise it as the request's one error."""

    def __init__(self) -> None:
        self.error: BaseException | None = None
        self.notes: list[str] = []

    def warn(self, text: str) -> None:
        self.notes.append(text)

    def fail(self, label: str, exc: BaseException) -> None:
        self.error = self.error or exc


class Service:
    """The models of one server (or one Ray replica), loaded on first use and kept."""

    def __init__(self, config: ServeConfig) -> None:
        from comneck_cli.coding import CodecCache, resolve_device
        from comneck_cli.io.images import input_limits

        if config.clip_config is not None:
            import open_clip

            open_clip.add_model_config(config.clip_config)
        self.config = config
        self.device = resolve_device(config.device)
        self.limits = input_limits(max_pixels=config.max_pixels)
        self.cache = CodecCache(self.device, config.weights)
        self._runners: dict[tuple, Any] = {}
        self._mllm = None

    # ------------------------------------------------------------------ on the event loop
    def parse(self, body: bytes, *, one: bool = False) -> list:
        """Every record of a ``.cnk`` body as (label, Record), under the CLI's limits; the first problem raises.
        With ``one``, a stream of several records is refused (the endpoint answers one image or answer)."""
        from comneck_cli.coding.files import parse_records
        from comneck_cli.formats import MAGIC

        if not body.startswith(MAGIC):
            raise InputError("the body is not a .cnk record (it does not start with the format's magic bytes)")
        report = _Collect()
        records = parse_records(STDIN, body, report, self.limits)
        if report.error is not None:
            raise report.error
        if one and len(records) > 1:
            raise InputError(f"the body holds {len(records)} records; send one record per request")
        return [(label, record) for label, _, _, _, record in records]

    # ------------------------------------------------------------------ on the model thread
    def process(self, jobs: Sequence[Job]) -> list[Any]:
        """Each job's response bytes, answer dict or error, in order; jobs that can share a forward pass do."""
        results: list[Any] = [None] * len(jobs)
        groups: dict[tuple, list[int]] = {}
        for i, job in enumerate(jobs):
            groups.setdefault((job.kind, job.options), []).append(i)
        for (kind, _), indices in groups.items():
            run = {"features": self._features, "decode": self._decode, "ask": self._ask}[kind]
            for i, result in zip(indices, run([jobs[i] for i in indices])):
                results[i] = result
        return results

    def _runner(self, options: FeatureOptions):
        """One FeatureRunner per tower and path: the CLIP tower and necks load once, whatever layer is asked."""
        from comneck_cli.features import FeatureRunner

        key = (options.via, options.clip_model, options.clip_tag, options.pad_to_square, options.family)
        if key not in self._runners:
            config = self.config
            self._runners[key] = FeatureRunner(
                via=options.via, neck=None if options.via == "adapter" else config.neck,
                adapter=config.adapter if options.via == "adapter" else None, clip_model=options.clip_model,
                clip_tag=options.clip_tag, clip_weights=config.clip_weights, weights=config.weights,
                device=self.device, family=options.family, pad_to_square=options.pad_to_square)
        runner = self._runners[key]
        runner.layer, runner.select = options.layer, options.select  # compute() and metadata() read them
        return runner

    def _features(self, jobs: Sequence[Job]) -> list[Any]:
        """The features file of each job, every record of every job through one ``compute``."""
        import torch

        options = jobs[0].options
        runner = self._runner(options)
        prepared, owner, errors = [], [], {}
        for j, job in enumerate(jobs):
            for label, record in job.records:
                try:
                    prepared.append(runner.prepare(record))
                    owner.append((j, label))
                except ComneckError as exc:
                    errors.setdefault(j, exc)
        feats, _ = runner.compute(prepared, [label for _, label in owner]) if prepared else ([], [])
        per_job: dict[int, list] = {}
        for (j, label), (extractor, _), f in zip(owner, prepared, feats):
            if isinstance(f, ComneckError):
                errors.setdefault(j, f)
            per_job.setdefault(j, []).append((label, f, extractor))
        results: list[Any] = []
        for j in range(len(jobs)):
            if j in errors:
                results.append(errors[j])
                continue
            rows = per_job[j]
            if len({tuple(f.shape) for _, f, _ in rows}) > 1:
                results.append(InputError("the records give features of different shapes; send them one per "
                                          "request"))
                continue
            meta = dict(runner.metadata(rows[0][2], rows[0][0]), source=",".join(label for label, _, _ in rows))
            results.append(_serialise(torch.stack([f for _, f, _ in rows]), options.fmt, meta))
        return results

    def _decode(self, jobs: Sequence[Job]) -> list[Any]:
        """The PNG of each job's record through ``g_s`` (``comneck decode`` writes the same bytes)."""
        from comneck_cli.coding.files import decode_record_bytes

        results: list[Any] = []
        for job in jobs:
            try:
                results.append(decode_record_bytes(job.records[0][1], self.cache, "PNG"))
            except ComneckError as exc:
                results.append(exc)
        return results

    def _ask(self, jobs: Sequence[Job]) -> list[Any]:
        """The answer of each job, all of them through one ``ask``; when that fails, each job alone, so one bad
        record does not fail the requests it was batched with."""
        prompt, via, max_new_tokens = jobs[0].options
        try:
            mllm = self.mllm()
            config = self.config
            answers = mllm.ask([job.body for job in jobs], prompt, via=via, max_new_tokens=max_new_tokens,
                               neck=config.neck if via == "neck" else None,
                               adapter=config.adapter if via == "adapter" else None, weights=config.weights)
            return [_answer(a) for a in answers]
        except ComneckError as exc:
            if len(jobs) == 1:
                return [exc]
        return [self._ask([job])[0] for job in jobs]

    def mllm(self):
        if self._mllm is None:
            if self.config.mllm is None:
                raise UsageError("this server has no MLLM; start it with `mllm` DIR|HUB_ID to answer /v1/ask",
                                 params=["mllm"])
            from comneck_cli.mllm import load_mllm

            self._mllm = load_mllm(self.config.mllm, device=str(self.device))
        return self._mllm


def _answer(answer: Any) -> dict[str, Any]:
    return {"answer": answer.answer, "via": answer.via, "bpp": answer.bpp}


def _serialise(tensor: Any, fmt: str, meta: dict[str, str]) -> bytes:
    """The bytes ``save_features`` writes for ``fmt``, through the file it writes, so the server cannot drift from
    ``comneck features``."""
    from comneck_cli.features import save_features

    with tempfile.TemporaryDirectory(prefix="comneck-serve-") as folder:
        path = Path(folder) / f"features.{fmt}"
        save_features(tensor, path, meta)
        return path.read_bytes()
