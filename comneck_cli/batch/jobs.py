"""The per-input work of ``comneck batch``: :class:`Job` and its encode, decode and features kinds. ``Job.run`` is
the only implementation of that work; both engines (:mod:`~comneck_cli.batch.engines`) call it."""

from __future__ import annotations

import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

from comneck_cli.defaults import DEFAULT_CODEC
from comneck_cli.errors import ComneckError
from comneck_cli.io.images import IMAGE_SUFFIXES
from comneck_cli.batch.plan import Item, records_of
from comneck_cli.batch.resume import (Written, check_replaceable, cnk_output_ok, features_output_ok,
                                     image_output_ok)

CNK_SUFFIX = ".cnk"
DECODE_FORMATS = {"png": ".png", "webp": ".webp", "tif": ".tif", "jpg": ".jpg"}


def failure_reason(exc: BaseException, *names: str) -> str:
    """The error sentence without a leading ``path:`` (the record already names the path)."""
    from comneck_cli.formats import CnkError

    text = str(exc)
    if not isinstance(exc, (ComneckError, CnkError)):
        text = f"unexpected {type(exc).__name__}: {text}"
    for name in names:
        if name and text.startswith(f"{name}: "):
            return text[len(name) + 2 :]
    return text


@dataclass
class Job:
    """Settings of one batch command; picklable, so Ray can ship it to each worker before :meth:`open`.

    ``run`` gives one outcome per input, in input order: ``{"path", "status" (done|skipped|failed), "reason",
    "params" (the parameters the reason names, as ``ComneckError.params``), "warnings", "traceback"}``.
    """

    output: str
    force: bool = False
    device: str = "auto"
    debug: bool = False
    max_pixels: int | None = None
    suffixes = IMAGE_SUFFIXES  # what a folder `input` is searched for
    command, label = "", ""  # the subcommand, and the progress bar's label

    def open(self) -> None:
        """Load the models (once per process / Ray actor)."""

    def limits(self):
        """The .cnk reader's limits on this worker: its environment's, with --max-pixels applied."""
        from comneck_cli.io.images import input_limits

        return input_limits(max_pixels=self.max_pixels)

    def run(self, items: Sequence[Item]) -> Iterable[dict[str, Any]]:
        raise NotImplementedError

    def claim(self, target: Path) -> None:
        """Refuse, before the work, a ``target`` this job must not replace (``resume.check_replaceable``): not a
        regular file, or a file no batch job wrote (without ``force``)."""
        check_replaceable(target, self._written(), self.force)

    def will_write(self, target: Path) -> None:
        """Record ``target`` as a batch output (``resume.Written``) just before it is written."""
        self._written().add(target)

    def _written(self) -> Written:
        if getattr(self, "_outputs", None) is None:  # made where the job runs (a Ray worker), not on the driver
            self._outputs = Written(Path(self.output))
        return self._outputs

    def target(self, item: Item, suffix: str, number: int | None = None) -> Path:
        stem = Path(item.relative).with_suffix("")
        name = f"{stem.name}_{number:04d}{suffix}" if number is not None else f"{stem.name}{suffix}"
        return Path(self.output) / stem.parent / name

    @property
    def output_suffix(self) -> str:
        """The extension of this job's outputs."""
        raise NotImplementedError

    def targets(self, item: Item, count: int = 1) -> list[Path]:
        """Every output of ``item``: one, or ``name_0001``... for a stream of ``count`` records."""
        if count == 1:
            return [self.target(item, self.output_suffix)]
        return [self.target(item, self.output_suffix, n) for n in range(1, count + 1)]

    def _outcome(self, item: Item, status: str, reason: str = "", notes: Sequence[str] = (), tb: str = "",
                 params: Sequence[str] = ()) -> dict:
        return {"path": item.label, "status": status, "reason": reason, "params": list(params),
                "warnings": list(notes), "traceback": tb}

    def _failed(self, item: Item, exc: BaseException, notes: Sequence[str] = ()) -> dict:
        tb = "".join(traceback.format_exception(exc)) if self.debug else ""
        return self._outcome(item, "failed", failure_reason(exc, item.label, item.source), notes, tb,
                             getattr(exc, "params", ()))


@dataclass
class EncodeJob(Job):
    codec: str = DEFAULT_CODEC
    quality: int = 3
    weights: str | None = None
    rate: float | None = None
    bpp_target: float | None = None
    semantic: bool = False
    semantic_strength: float | None = None
    clip_model: str = "ViT-L-14"
    clip_tag: str | None = "openai"
    clip_weights: str | None = None
    pre_edit: str | None = None
    command, label = "encode", "encoding"
    output_suffix = CNK_SUFFIX

    def open(self) -> None:
        from comneck_cli import coding as api

        device = api.resolve_device(self.device)
        codec = api.load_codec(self.codec, self.quality, weights=self.weights, device=device)
        if self.rate is not None:
            codec = codec.at_rate(self.rate)
        self._encoder = api.ImageEncoder.load(
            codec, bpp_target=self.bpp_target, semantic=self.semantic, semantic_strength=self.semantic_strength,
            clip_model=self.clip_model, clip_tag=self.clip_tag, clip_weights=self.clip_weights,
            pre_edit=self.pre_edit, device=device, limits=self.limits())

    def run(self, items):
        from comneck_cli.coding import files
        from comneck_cli.io.outputs import write_atomic

        outcomes: dict[int, dict] = {}
        todo = []  # (position, item, image, warnings)
        for position, item in enumerate(items):
            try:
                self.claim(self.target(item, CNK_SUFFIX))
                if not self.force and cnk_output_ok(self.target(item, CNK_SUFFIX), self._encoder, item.source):
                    outcomes[position] = self._outcome(item, "skipped")
                    continue
                image, notes = files.read_image_file(item.source, item.label, self.max_pixels)
                todo.append((position, item, image, notes))
            except Exception as exc:  # noqa: BLE001 - recorded per input, the chunk goes on
                outcomes[position] = self._failed(item, exc)
        try:
            packed = files.encode_images([image for _, _, image, _ in todo], self._encoder,
                                   [item.label for _, item, _, _ in todo])
        except Exception as exc:  # noqa: BLE001 - g_a of the whole group failed (e.g. out of memory)
            packed = [exc] * len(todo)
        for (position, item, _, notes), data in zip(todo, packed):
            try:
                if isinstance(data, BaseException):
                    raise data
                self.will_write(self.target(item, CNK_SUFFIX))
                write_atomic(self.target(item, CNK_SUFFIX), data, force=True)
                outcomes[position] = self._outcome(item, "done", notes=notes)
            except Exception as exc:  # noqa: BLE001
                outcomes[position] = self._failed(item, exc, notes)
        return [outcomes[i] for i in range(len(items))]



@dataclass
class DecodeJob(Job):
    weights: str | None = None
    fmt: str = "png"
    suffixes = (CNK_SUFFIX,)
    command, label = "decode", "decoding"

    def open(self) -> None:
        from comneck_cli import coding as api

        self._cache = api.CodecCache(api.resolve_device(self.device), self.weights)
        self._limits = self.limits()

    @property
    def output_suffix(self) -> str:
        return DECODE_FORMATS[self.fmt]

    def run(self, items):
        """Yields each input's outcome as soon as its images are written: g_s is slow, and an interrupted job
        must count what it finished, not only whole chunks."""
        from comneck_cli.coding import files
        from comneck_cli.io.images import WRITE_FORMATS
        from comneck_cli.io.outputs import write_atomic

        for item in items:
            try:
                records = records_of(item, self._limits)
                for target in self.targets(item, len(records)):
                    self.claim(target)
                pending = [(t, r) for t, r in zip(self.targets(item, len(records)), records)
                           if self.force or not image_output_ok(t, r.height, r.width)]
                if not pending:
                    yield self._outcome(item, "skipped")
                    continue
                for target, record in pending:
                    data = files.decode_record_bytes(record, self._cache, WRITE_FORMATS[DECODE_FORMATS[self.fmt]])
                    self.will_write(target)
                    write_atomic(target, data, force=True)
                outcome = self._outcome(item, "done")
            except Exception as exc:  # noqa: BLE001
                outcome = self._failed(item, exc)
            yield outcome


@dataclass
class FeaturesJob(Job):
    via: str = "neck"
    neck: str | None = None
    adapter: str | None = None
    layer: int = -2
    select: str = "patch"
    fmt: str = "pt"
    weights: str | None = None
    clip_model: str = "ViT-L-14"
    clip_tag: str | None = "openai"
    clip_weights: str | None = None
    family: str | None = None
    pad_to_square: bool = False
    suffixes = (CNK_SUFFIX,)
    command, label = "features", "features"

    @property
    def output_suffix(self) -> str:
        return f".{self.fmt}"

    def __post_init__(self) -> None:
        if self.via == "uncompressed":
            self.suffixes = IMAGE_SUFFIXES

    def open(self) -> None:
        from comneck_cli import coding as api
        from comneck_cli.features import FeatureRunner

        self._runner = FeatureRunner(
            via=self.via, neck=self.neck, adapter=self.adapter, layer=self.layer, select=self.select,
            clip_model=self.clip_model,
            clip_tag=self.clip_tag, clip_weights=Path(self.clip_weights) if self.clip_weights else None,
            weights=self.weights, device=api.resolve_device(self.device), family=self.family,
            pad_to_square=self.pad_to_square,
        )
        self._limits = self.limits()

    def run(self, items):
        from comneck_cli.coding import files
        from comneck_cli.features import save_features

        runner = self._runner
        suffix = self.output_suffix
        failed: dict[int, dict] = {}
        # Every output of the chunk: (position of its input, target, label, payload).
        units: list[tuple[int, Path, str, Any]] = []
        notes: dict[int, list[str]] = {}
        for position, item in enumerate(items):
            try:
                if self.via == "uncompressed":
                    image, notes[position] = files.read_image_file(item.source, item.label, self.max_pixels)
                    units.append((position, self.target(item, suffix), item.relative, image))
                    continue
                records = records_of(item, self._limits)
                many = len(records) > 1
                for n, record in enumerate(records, start=1):
                    label = f"{item.relative} record {n}" if many else item.relative
                    units.append((position, self.target(item, suffix, n if many else None), label, record))
            except Exception as exc:  # noqa: BLE001
                failed[position] = self._failed(item, exc)
        pending, prepared = [], []  # units to compute, and their (extractor, y_hat or image)
        for u, (position, target, label, payload) in enumerate(units):
            if position in failed:
                continue
            try:
                self.claim(target)
                resolved = runner.resolve(payload)
                if not self.force and features_output_ok(target, runner.metadata(resolved.extractor, label)):
                    continue
                prepared.append(runner.prepare(payload, resolved))
                pending.append(u)
            except Exception as exc:  # noqa: BLE001
                failed[position] = self._failed(items[position], exc, notes.get(position, ()))
        results, forward_notes = runner.compute(prepared, [units[u][2] for u in pending]) if prepared else ([], [])
        if forward_notes:  # e.g. the neck interpolating its positions: said once, with the chunk's first input
            notes.setdefault(units[pending[0]][0], []).extend(forward_notes)
        done = set()
        for u, (extractor, _), result in zip(pending, prepared, results):
            position, target, label, _ = units[u]
            if position in failed:
                continue
            try:
                if isinstance(result, BaseException):
                    raise result
                self.will_write(target)
                save_features(result.unsqueeze(0), target, runner.metadata(extractor, label), force=True)
                done.add(position)
            except Exception as exc:  # noqa: BLE001
                failed[position] = self._failed(items[position], exc, notes.get(position, ()))
        outcomes = []
        for position, item in enumerate(items):
            if position in failed:
                outcomes.append(failed[position])
            else:
                status = "done" if position in done else "skipped"
                outcomes.append(self._outcome(item, status, notes=notes.get(position, ())))
        return outcomes

