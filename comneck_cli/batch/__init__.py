"""``comneck batch encode|decode|features``: whole folders or path lists, on this machine or a Ray cluster.

The plan (which inputs, which outputs, in which chunks) is made once, on the driver. Each chunk of up to
``--batch-size`` inputs then goes through :meth:`Job.run`, the only implementation of the per-input work:

- ``--engine local`` calls it in this process, chunk after chunk;
- ``--engine ray`` hands the chunks to Ray Data (``ray.data.from_items``) and ``map_batches`` them through
  :class:`Worker`, a callable class that loads the models once per actor (GPU or CPU) and writes each output
  from the actor. The driver only reads back one small row per input: done, skipped or failed, and why.

Because the chunks are cut by the driver, in sorted order, whatever the engine, the same inputs share a
batched ``g_a`` in both engines and the outputs are byte-identical. A finished output is recognised by its
content (a ``.cnk`` parses and its record matches the codec, quality, weights and image size; an image
decodes completely at the record's size; a features file loads with the same settings) and skipped; a stale
or truncated one is redone. Failures are recorded per input in ``OUTPUT/errors.jsonl`` and the rest goes on.

Importing this module does not import torch or Ray; :class:`Job` imports them where it loads models.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

from comneck_cli.defaults import DEFAULT_CODEC
from comneck_cli.errors import ComneckError, InputError, UsageError
from comneck_cli.io.images import IMAGE_SUFFIXES
from comneck_cli.io.outputs import STDIO

CNK_SUFFIX = ".cnk"
ERRORS_FILE = "errors.jsonl"
DECODE_FORMATS = {"png": ".png", "webp": ".webp", "tif": ".tif", "jpg": ".jpg"}
RAY_MISSING = "`engine` ray needs Ray, which is not installed: pip install 'comneck[ray]'"


# --------------------------------------------------------------------------- planning (driver side)
@dataclass(frozen=True)
class Item:
    """One input: ``source`` is absolute (workers may run elsewhere), ``label`` is the path as the user gave it,
    ``relative`` is the POSIX path mirrored under ``--output`` (``a/b.png`` -> ``OUT/a/b.cnk``)."""

    source: str
    label: str
    relative: str


def plan_inputs(spec: str, suffixes: Sequence[str], output: Path, relative_to: Path | None = None,
                stdin: Iterable[str] | None = None) -> tuple[list[Item], list[dict[str, str]]]:
    """Items in sorted order, and the entries refused while planning (``{"path", "reason"}``).

    ``spec`` is a folder (walked recursively for ``suffixes``; hidden entries and ``output`` itself are left
    out), a text file listing paths (one a line, relative to ``relative_to``, default the current folder), or
    ``-`` for such a list on stdin.
    """
    if spec == STDIO:
        return _listed((stdin if stdin is not None else sys.stdin), relative_to)
    path = Path(spec)
    if path.is_dir():
        return _walk(path, suffixes, output), []
    if not path.exists():
        raise InputError(f"`input` {spec} does not exist; give a folder, a text file listing paths, or -",
                         params=["input"])
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        text = None
    if text is None or "\x00" in text:
        raise InputError(f"`input` {spec} is neither a folder nor a text file listing paths; for single "
                         f"files use `comneck encode|decode|features`", params=["input"])
    return _listed(text.splitlines(), relative_to)


def _walk(root: Path, suffixes: Sequence[str], output: Path) -> list[Item]:
    root_abs = Path(os.path.abspath(root))
    skip = Path(os.path.abspath(output))
    found = []
    for folder, dirs, files in os.walk(root_abs):
        here = Path(folder)
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and here / d != skip)
        for name in files:
            if not name.startswith(".") and name.lower().endswith(tuple(suffixes)):
                source = here / name
                relative = source.relative_to(root_abs).as_posix()
                found.append(Item(str(source), str(root / relative), relative))
    return sorted(found, key=lambda item: item.relative)


def _listed(lines: Iterable[str], relative_to: Path | None) -> tuple[list[Item], list[dict[str, str]]]:
    base = Path(os.path.abspath(relative_to if relative_to is not None else Path.cwd()))
    items, refused, seen = [], [], set()
    for line in lines:
        entry = line.rstrip("\r\n")
        if not entry.strip() or entry.lstrip().startswith("#"):
            continue
        source = Path(os.path.abspath(entry))
        if source in seen:
            continue
        seen.add(source)
        if source.is_dir():  # `.` or a folder: it has no file name for an output to mirror
            refused.append({"path": entry, "reason": "is a folder, not a file; list the files in it, or give "
                                                     "the folder itself as `input`", "params": ["input"]})
            continue
        try:
            relative = source.relative_to(base).as_posix()
        except ValueError:
            refused.append({"path": entry, "reason": f"not under {base}, which output paths mirror; "
                                                     f"pass `relative_to` a folder that holds it",
                            "params": ["relative_to"]})
            continue
        items.append(Item(str(source), entry, relative))
    return sorted(items, key=lambda item: item.relative), refused


def chunks(items: Sequence[Item], size: int) -> list[list[Item]]:
    return [list(items[i : i + size]) for i in range(0, len(items), size)]


# --------------------------------------------------------------------------- output checks (resume)
def _image_size(path: str) -> tuple[int, int]:
    """(height, width) after EXIF orientation, from the header only."""
    from PIL import Image

    with Image.open(path) as img:
        width, height = img.size
        if img.getexif().get(0x0112, 1) in (5, 6, 7, 8):
            width, height = height, width
    return height, width


def cnk_output_ok(target: Path, encoder, source: str) -> bool:
    """One record, written as ``encoder`` (``api.ImageEncoder``) writes: its codec, quality (or rate), weights and
    guidance (semantic map, pre-editing P), for an image of the source's size.

    With a bpp target the record's rate is whatever met the target: its bpp must be within 5% of it, or the target
    must be out of the codec's reach and the record at the rate closest to it (else every rerun would redo it).
    """
    from comneck_cli.formats import CnkError, read_file

    if not target.is_file():
        return False
    try:
        records = read_file(target)
        size = _image_size(source)
    except (CnkError, OSError, ValueError, SyntaxError):
        return False
    if len(records) != 1:
        return False
    r, codec = records[0], encoder.codec
    if (r.codec_id, r.weights_digest) != (codec.spec.codec_id, codec.digest) or (r.height, r.width) != size:
        return False
    if not encoder.made(r):
        return False
    if encoder.bpp_target is not None:
        from comneck_cli.codecs import bpp_out_of_reach

        return (abs(r.bits_per_pixel - encoder.bpp_target) <= 0.05 * encoder.bpp_target
                or bpp_out_of_reach(codec.spec, r.rate, r.bits_per_pixel, encoder.bpp_target) is not None)
    return (r.quality, r.rate) == (codec.quality, codec.stored_rate)


def image_output_ok(target: Path, height: int, width: int) -> bool:
    """Decodes completely (a truncated file does not) at the record's size."""
    from PIL import Image

    if not target.is_file():
        return False
    try:
        with Image.open(target) as img:
            img.load()
            return img.size == (width, height)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        return False


def features_output_ok(target: Path, expected: dict[str, str]) -> bool:
    """Loads completely, holds one input's features, and (for .pt / .safetensors) was made with the same
    settings: every metadata field but ``source`` equal. ``.npy`` carries no metadata: loading is all."""
    if not target.is_file():
        return False
    want = {k: v for k, v in expected.items() if k != "source"}
    try:
        suffix = target.suffix.lower()
        if suffix == ".pt":
            import torch

            saved = torch.load(target, weights_only=True, map_location="cpu")
            tensor, meta = saved["features"], saved["metadata"]
        elif suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(target), framework="pt") as f:
                meta = f.metadata() or {}
                tensor = f.get_tensor("features")
        else:
            import numpy as np

            tensor, meta = np.load(target, allow_pickle=False), want
    except Exception:  # any unreadable, truncated or foreign file is simply redone  # noqa: BLE001
        return False
    return tuple(tensor.shape[:1]) == (1,) and {k: meta.get(k) for k in want} == want


# --------------------------------------------------------------------------- the per-chunk work
def _reason(exc: BaseException, *names: str) -> str:
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
        return self._outcome(item, "failed", _reason(exc, item.label, item.source), notes, tb,
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
                write_atomic(self.target(item, CNK_SUFFIX), data, force=True)
                outcomes[position] = self._outcome(item, "done", notes=notes)
            except Exception as exc:  # noqa: BLE001
                outcomes[position] = self._failed(item, exc, notes)
        return [outcomes[i] for i in range(len(items))]


def _read_records(item: Item, limits) -> list:
    from comneck_cli.formats import CnkError, read_file

    try:
        return read_file(item.source, limits)
    except CnkError as exc:
        raise ComneckError(str(exc), params=exc.params) from None  # `max_pixels` stays a flag in the reason


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
                records = _read_records(item, self._limits)
                pending = [(t, r) for t, r in zip(self.targets(item, len(records)), records)
                           if self.force or not image_output_ok(t, r.height, r.width)]
                if not pending:
                    yield self._outcome(item, "skipped")
                    continue
                for target, record in pending:
                    data = files.decode_record_bytes(record, self._cache, WRITE_FORMATS[DECODE_FORMATS[self.fmt]])
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
                records = _read_records(item, self._limits)
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
                extractor = runner.extractor_for(None if self.via == "uncompressed" else payload)
                if not self.force and features_output_ok(target, runner.metadata(extractor, label)):
                    continue
                prepared.append(runner.prepare(payload))
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


# --------------------------------------------------------------------------- engines
_LISTS = ("params", "warnings")  # the columns a Ray row carries as JSON


class Worker:
    """Ray Data callable class: one per actor. Loads the models once, then runs each row (one chunk of the
    driver's plan) through :meth:`Job.run`, writing the outputs from the actor.

    A model that fails to load is reported as a ``setup`` row rather than raised: Ray would otherwise retry
    the actor and bury the reason in its logs. The driver turns that row into one error sentence.
    """

    def __init__(self, job: Job) -> None:
        self.job, self.setup_error, self.setup_params = job, "", []
        try:
            job.open()
        except Exception as exc:  # noqa: BLE001 - reported by the driver, see the class docstring
            self.setup_error = _reason(exc) if not job.debug else "".join(traceback.format_exception(exc))
            self.setup_params = list(getattr(exc, "params", ()))

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        import numpy as np

        rows: list[dict] = []
        for chunk in batch["chunk"]:
            items = [Item(*entry) for entry in json.loads(str(chunk))]
            if self.setup_error:
                rows.append({"path": "", "status": "setup", "reason": self.setup_error,
                             "params": self.setup_params, "warnings": [], "traceback": ""})
                continue
            rows.extend(self.job.run(items))
        columns = {key: np.array([json.dumps(r[key]) if key in _LISTS else str(r[key]) for r in rows], dtype=object)
                   for key in ("path", "status", "reason", "params", "warnings", "traceback")}
        return columns


def run_local(job: Job, plan: list[list[Item]]) -> Iterator[dict]:
    """This process, chunk after chunk: the same Job.run a Ray worker calls."""
    job.open()
    for chunk in plan:
        yield from job.run(chunk)


@dataclass
class RayOptions:
    address: str | None = None
    workers: int | None = None
    num_gpus: float = 0.0
    num_cpus: float = 1.0


def run_ray(job: Job, plan: list[list[Item]], options: RayOptions, debug: bool = False) -> Iterator[dict]:
    """Ray Data over the plan's chunks; a fixed pool of actors, each with ``num_gpus`` GPUs and ``num_cpus``
    CPUs. Starts a Ray instance on this machine unless one is running in this process, ``--address`` names a
    cluster, or ``RAY_ADDRESS`` is set."""
    problem = ray_problem()  # here, with the install hint or the real reason, not inside a worker
    if problem is not None:
        raise problem
    import ray
    started = False
    if not ray.is_initialized():
        address = options.address or os.environ.get("RAY_ADDRESS")
        kwargs: dict[str, Any] = {"logging_level": logging.INFO if debug else logging.ERROR,
                                  "log_to_driver": debug}
        if address is None:
            kwargs["include_dashboard"] = False
        else:
            _probe(address)
        try:
            ray.init(address=options.address, **kwargs)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            raise ComneckError(f"cannot start or reach Ray at {address or 'this machine'} "
                               f"({str(exc).splitlines()[0]}); start a cluster with `ray start --head` or leave "
                               f"out `address`", params=["address"]) from None
        started = True
    try:
        if ray.util.client.ray.is_connected():
            yield from _through_client(ray, job, plan, options, debug)
        else:
            yield from _map_chunks(job, plan, options, debug)
    finally:
        if started:
            ray.shutdown()


def _map_chunks(job: Job, plan: list[list[Item]], options: RayOptions, debug: bool) -> Iterator[dict]:
    """The Ray Data pipeline itself: from_items(chunks) -> map_batches(Worker) on a fixed actor pool."""
    import ray
    import ray.data

    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False  # the command draws one bar for the whole job
    context.print_on_execution_start = False
    if not debug:
        logging.getLogger("ray.data").setLevel(logging.ERROR)
    workers = options.workers or _pool_size(ray.cluster_resources(), options)
    workers = max(1, min(workers, len(plan)))
    rows = [{"chunk": json.dumps([[i.source, i.label, i.relative] for i in chunk])} for chunk in plan]
    dataset = ray.data.from_items(rows, override_num_blocks=min(len(rows), max(200, 16 * workers)))
    results = dataset.map_batches(
        Worker,
        fn_constructor_kwargs={"job": job},
        batch_size=1,  # one row is one chunk of the plan: batches never depend on Ray's block layout
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=workers),
        num_cpus=options.num_cpus,
        num_gpus=options.num_gpus,
    )
    for row in results.iter_rows():
        if row["status"] == "setup":
            raise ComneckError(f"a Ray worker could not load the models: {row['reason']}",
                               params=json.loads(row["params"]))
        yield {key: json.loads(row[key]) if key in _LISTS else row[key]
               for key in ("path", "status", "reason", "params", "warnings", "traceback")}


class _ClusterDriver:
    """Runs :func:`_map_chunks` on the cluster for a Ray Client (``ray://``) connection, whose client side
    cannot run Ray Data's executor; the client polls it for outcomes. A threaded actor: ``poll`` answers
    while ``run`` works."""

    def __init__(self) -> None:
        self.outcomes: list[dict] = []
        self.finished, self.error = False, None

    def run(self, job: Job, plan: list[list[Item]], options: RayOptions, debug: bool) -> None:
        try:
            for outcome in _map_chunks(job, plan, options, debug):
                self.outcomes.append(outcome)
        except Exception as exc:  # noqa: BLE001 - handed to the client, which raises it
            self.error = exc if isinstance(exc, ComneckError) else ComneckError(f"{type(exc).__name__}: {exc}")
        finally:
            self.finished = True

    def poll(self, start: int) -> tuple[list[dict], bool, ComneckError | None]:
        finished = self.finished  # read first: when True, every outcome is already in the list
        return self.outcomes[start:], finished, self.error


def _through_client(ray, job: Job, plan: list[list[Item]], options: RayOptions, debug: bool) -> Iterator[dict]:
    import time

    driver = ray.remote(num_cpus=0, max_concurrency=2)(_ClusterDriver).remote()
    try:
        driver.run.remote(job, plan, options, debug)
        seen = 0
        while True:
            new, finished, error = ray.get(driver.poll.remote(seen))
            seen += len(new)
            yield from new
            if finished:
                break
            time.sleep(0.5)
        if error is not None:
            raise error
    finally:
        ray.kill(driver)


def _probe(address: str) -> None:
    """Ray retries an unreachable HOST:PORT for minutes: check that something listens there first."""
    import socket

    host, _, port = address.removeprefix("ray://").rpartition(":")
    if address == "auto" or not port.isdigit():
        return
    try:
        socket.create_connection((host or "127.0.0.1", int(port)), timeout=10).close()
    except OSError as exc:
        raise ComneckError(f"cannot reach a Ray cluster at {address} ({exc.strerror or exc}); check `address` "
                           f"or RAY_ADDRESS, or leave both out to run Ray on this machine", params=["address"]) from None


def _pool_size(resources: dict[str, float], options: RayOptions) -> int:
    """As many workers as the cluster holds: its CPUs / CPUs per worker, and with GPUs its GPUs / GPUs per
    worker, whichever is fewer (a fixed pool waits for every actor to be placed)."""
    workers = int(resources.get("CPU", 1) // options.num_cpus)
    if options.num_gpus > 0:
        gpus = resources.get("GPU", 0)
        if gpus < options.num_gpus:
            raise ComneckError(f"`num_gpus` {options.num_gpus:g} but the Ray cluster has {gpus:g} "
                               f"GPUs; lower it, or use 0 for CPU workers", params=["num_gpus"])
        workers = min(workers, int(gpus // options.num_gpus))
    return max(1, workers)


# --------------------------------------------------------------------------- the driver
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
    another input's (a.cnk's record 1 and a_0001.cnk, both OUT/a_0001.png)."""
    from comneck_cli.io.outputs import clashes

    counts = _stream_counts(job, items)
    refused = clashes([(item.label, job.targets(item, counts.get(item, 1))) for item in items])
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
                        counts[each] = max(1, len(_read_records(each, job.limits())))
                    except (ComneckError, OSError):  # its worker reports the damage
                        counts[each] = 1
    return counts


def ray_problem() -> ComneckError | None:
    """Why ``--engine ray`` cannot run here, or None. Ray is imported, not only looked for: an installed Ray whose
    import fails (e.g. a pyarrow built for another numpy) must say so, not that Ray is missing."""
    try:
        import ray  # noqa: F401
        import ray.data  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - whatever a broken install raises, it is the reason to show
        if isinstance(exc, ModuleNotFoundError) and exc.name in ("ray", "ray.data"):
            return ComneckError(RAY_MISSING, params=["engine"])
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        return ComneckError(f"`engine` ray: Ray is installed but importing it failed ({type(exc).__name__}: {first}); "
                            "fix that installation, or use `engine` local", params=["engine"])
    return None
