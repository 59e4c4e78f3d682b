"""The evaluation loop: images in chunks, every (method, point) on each chunk, one JSONL row per finished point.

Work goes chunk by chunk over the images (``batch_size`` images at a time) so that each image is read, coded
and passed through C once for the reference C(x), and only one chunk's features are ever held in memory:
ViT-L/14's 256 × 1024 patch tokens are 1 MiB per image and method. Within a chunk every method runs on every
image that still lacks its row, and CLIP runs batched per (tower, latent grid).

``REPORT_DIR/points.jsonl`` is the log behind ``--resume``: a first line with the settings that decide what a
number means (codec, ``--size``, layer, selection, CLIP, prompt, classes), then one line per finished
(method, point, image), appended and synced chunk by chunk. ``--resume`` refuses a log made with other
settings, keeps the rows made with the same model files (each row names the digests of the codec, neck and
U-Net files it used) and recomputes the rest; a line cut short by a crash is dropped. The report is rebuilt
from the log at the end of every run, for the methods, qualities and images asked for in that run.
"""

from __future__ import annotations

import json
import math
import os
import time
import warnings
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import torch

from comneck_cli import coding as api
from comneck_cli import hub
from comneck_cli.defaults import DEFAULT_CODEC
from comneck_cli.errors import ComneckError, InputError, MismatchError, UsageError
from comneck_cli.features import neck_registry_name
from comneck_cli.io.outputs import make_folder
from comneck_cli.eval import DEFAULT_METHODS, DEFAULT_PROMPT, report
from comneck_cli.eval.data import Dataset, find_images, load_image
from comneck_cli.eval.methods import Context, Entry, Outcome, Point, Skip, file_digest, get_method, spec_for
from comneck_cli.clip.zeroshot import ZeroShot
from comneck_cli.eval.metrics import bits_per_pixel, feature_fidelity, ms_ssim, psnr
from comneck_cli.mllm.tower import MLLM_TAG

LOG_NAME = "points.jsonl"
LOG_FORMAT = "comneck-eval-log"
LOG_VERSION = 1

Progress = Callable[[int], AbstractContextManager]  # total -> context yielding advance()


@dataclass
class EvalConfig:
    """Everything ``comneck eval`` takes. Specs map a quality (or None: every quality) to a file or a registry
    name; a quality missing from ``weights`` uses the registry ``CODEC-qQ`` / zoo, from ``necks`` the
    registry ``CODEC-qQ-neck``."""

    data: Path
    output: Path
    codec: str = DEFAULT_CODEC
    qualities: tuple[int, ...] = (1, 2, 3, 4)
    methods: tuple[str, ...] = DEFAULT_METHODS
    weights: dict = field(default_factory=dict)
    necks: dict = field(default_factory=dict)
    neck_weights: dict = field(default_factory=dict)
    postprocess: dict = field(default_factory=dict)
    adapter: str | None = None  # semantic-adapter's file or name; None: the registry's CODEC-adapter
    pre_edit: str | None = None  # vbr-preedit's P, file or name; None: the registry's CODEC-preedit
    limit: int | None = None
    size: int = 256
    layer: int = -2
    select: str = "patch"
    pad_to_square: bool = False  # LLaVA-1.5's expand2square before CLIP's preprocessing (image paths)
    clip_model: str | None = None  # None: the necks' CLIP, else ViT-L-14
    clip_tag: str | None = None  # None: the necks' tag, else openai
    clip_weights: Path | None = None
    classes: Path | None = None
    prompt: str = DEFAULT_PROMPT
    batch_size: int = 8
    device: str = "auto"
    resume: bool = False
    force: bool = False
    max_pixels: int | None = None
    mllm: str | Path | None = None  # a LLaVA folder or cached hub id: answer agreement and KL (eval.mllm)
    prompts: Path | None = None  # with mllm: one prompt a line
    mllm_dtype: str | None = None
    max_new_tokens: int = 32


@dataclass
class EvalResult:
    output: Path
    rows: list[dict]
    means: list[dict]
    skips: list[Skip]
    failures: list[str]
    computed: int
    reused: int
    files: list[Path]


def run_eval(cfg: EvalConfig, *, progress: Progress | None = None, echo: Callable[[str], None] | None = None,
             spell: Callable[[str], str] | None = None) -> EvalResult:
    """Evaluate every method of ``cfg`` on its data and write the report into ``cfg.output`` (its sentences
    through ``spell``, :func:`comneck_cli.eval.report.write_report`)."""
    say = echo or (lambda message: None)
    if "{}" not in cfg.prompt:
        raise ComneckError(f"the prompt {cfg.prompt!r} has no {{}} for the class name; pass `prompt` with one",
                           params=("prompt",))
    log_path = Path(cfg.output) / LOG_NAME
    if log_path.exists() and not (cfg.resume or cfg.force):
        raise _taken(Path(cfg.output), LOG_NAME)
    dataset = find_images(cfg.data, limit=cfg.limit, classes_file=cfg.classes)
    with _run_folder(Path(cfg.output)):  # before any model loads: an unwritable -o fails in a second, not minutes
        return _evaluate(cfg, dataset, progress, say, spell)


@contextmanager
def _run_folder(folder: Path) -> Iterator[None]:
    """``folder`` made, with its missing parents, for the run; those the run made are removed again when it fails
    before writing into them (bad prompts, a model that does not load), so a refused run leaves no empty folder."""
    made = [path for path in (folder, *folder.parents) if not path.exists()]
    make_folder(folder)
    try:
        yield
    except BaseException:
        for path in made:  # the deepest first; one that holds anything stops the removal
            try:
                path.rmdir()
            except OSError:
                break
        raise


def _evaluate(cfg: EvalConfig, dataset: Dataset, progress: Progress | None, say: Callable[[str], None],
              spell: Callable[[str], str] | None) -> EvalResult:
    """:func:`run_eval` once ``cfg.output`` exists."""
    if dataset.ignored:
        say(f"{len(dataset.ignored)} image(s) directly in {cfg.data} are not in a class folder and are not "
            f"evaluated: {', '.join(dataset.ignored)}")
    device = api.resolve_device(cfg.device)
    judge = _judge(cfg, device)
    clip_model, clip_tag, clip_seed = _choose_clip(cfg)
    ctx = Context(device=device, codec=cfg.codec, qualities=tuple(cfg.qualities), layer=cfg.layer, select=cfg.select,
                  clip_model=clip_model, clip_tag=clip_tag, clip_seed=clip_seed, clip_weights=cfg.clip_weights,
                  weights=cfg.weights,
                  necks=cfg.necks, neck_weights=cfg.neck_weights, postprocess=cfg.postprocess,
                  adapter=cfg.adapter, pre_edit=cfg.pre_edit, pad_to_square=cfg.pad_to_square)
    mllm_tower = judge is not None and (clip_model, clip_tag) == judge.tower_id
    if not mllm_tower and str(clip_tag).startswith(MLLM_TAG):  # open_clip cannot load an MLLM's tower
        have = (f"{judge.mllm.folder}'s tower is {'/'.join(judge.tower_id)}" if judge is not None
                else "no `mllm` is given")
        raise MismatchError(f"the models were trained for the vision tower of an MLLM ({clip_model}/{clip_tag}), but "
                            f"{have}; pass that checkpoint as `mllm`, with `prompts`", params=("mllm", "prompts"))
    if mllm_tower:  # necks trained for the MLLM's tower: C and C' are that tower, which open_clip cannot load
        ctx._clip = judge.clip()
    methods = {name: get_method(name) for name in dict.fromkeys(cfg.methods)}
    needs_codec = any(name != "uncompressed" for name in methods)
    without_clip = _clip_unavailable(ctx, methods)
    if without_clip is not None:
        say(f"CLIP feature metrics and accuracy are not measured: {without_clip}")
        clip_model = clip_tag = None
    elif cfg.select not in ("pooled", "projected"):  # C(x) must have the layer, or nothing can be compared
        from comneck_cli.clip.tower import resolve_layer

        resolve_layer(cfg.layer, len(ctx.clip.visual.transformer.resblocks) + 1, None)
    if needs_codec:
        for quality in cfg.qualities:  # the anchor and the rate targets: a missing codec stops the run
            ctx.codec(quality)

    points: list[Point] = []
    skips: list[Skip] = []
    for method in methods.values():
        planned, skipped = method.plan(ctx)
        points += planned
        skips += skipped
    for skip in skips:
        say(f"{skip.method}{'' if skip.point is None else ' ' + skip.point} skipped: {skip.reason}")
    if dataset.labelled and mllm_tower:
        say("zero-shot accuracy is not measured: the MLLM's vision tower has no text tower")
    zero_shot = (_zero_shot(ctx, dataset.classes, cfg.prompt)
                 if dataset.labelled and without_clip is None and not mllm_tower else None)

    settings = {
        "codec": cfg.codec, "size": cfg.size, "layer": cfg.layer, "select": cfg.select,
        "pad_to_square": cfg.pad_to_square, "clip_model": clip_model,
        "clip_tag": clip_tag, "clip_weights": file_digest(cfg.clip_weights) if cfg.clip_weights else None,
        "prompt": cfg.prompt if dataset.labelled else None, "classes": dataset.classes,
        "mllm": judge.settings() if judge is not None else None,
    }
    log = _Log(Path(cfg.output) / LOG_NAME, settings, resume=cfg.resume, force=cfg.force)
    finished = log.finished({(p.method, p.name): p.models for p in points})
    if log.stale:
        say(f"{log.stale} logged point(s) were made with other model files and are computed again")

    items = dataset.items
    todo = [(p, item) for item in items for p in points if (p.method, p.name, item.id) not in finished]
    failures: list[str] = []
    computed = 0
    with (progress(len(todo)) if progress else nullcontext(lambda: None)) as advance, log:
        for start in range(0, len(items), cfg.batch_size):
            chunk = items[start : start + cfg.batch_size]
            work = {p_item for p_item in ((p.method, p.name, item.id) for p in points for item in chunk)
                    if p_item not in finished}
            if not work:
                continue
            ctx.new_chunk()
            if judge is not None:
                judge.new_chunk()
            entries = _load_chunk(cfg, chunk, work, failures, advance, say)
            if not entries:
                continue
            reference = _reference(ctx, entries) if without_clip is None else None
            for point in points:
                todo_here = [e for e in entries.values() if (point.method, point.name, e.item.id) in work]
                rows = _run_point(ctx, methods[point.method], point, todo_here, reference, dataset.classes,
                                  zero_shot, failures, advance, judge)
                for row in rows:
                    log.append(row)
                    finished[(point.method, point.name, row["image"])] = row
                    advance()
                computed += len(rows)
            log.sync()

    wanted = [(p.method, p.name, item.id) for p in points for item in items]
    rows = [finished[key] for key in wanted if key in finished]
    header = {
        **settings, "data": str(cfg.data), "images": len(items), "qualities": list(cfg.qualities),
        "ignored": dataset.ignored, "clip_unavailable": without_clip,
        "methods": list(methods), "device": str(device),
        "weights": {f"q{q}": ctx.codec(q).digest.hex() for q in cfg.qualities if needs_codec},
    }
    descriptions = {name: getattr(m, "what", "") for name, m in methods.items()}
    means, files = report.write_report(Path(cfg.output), header=header, methods=descriptions, points=points,
                                       rows=rows, skips=skips, failures=failures, spell=spell)
    return EvalResult(Path(cfg.output), rows, means, skips, failures, computed, len(rows) - computed, files)


def _judge(cfg: EvalConfig, device: torch.device):
    """The MLLM judge of ``cfg.mllm`` (``eval.mllm``), or None; prompts and model checked before anything else."""
    if cfg.mllm is None:
        if cfg.prompts is not None:
            raise UsageError("`prompts` are asked of an MLLM: pass `mllm` too", params=("prompts", "mllm"))
        return None
    if cfg.prompts is None:
        raise UsageError("`mllm` needs `prompts`, the questions asked about every image", params=("mllm", "prompts"))
    from comneck_cli.eval.mllm import AnswerJudge

    return AnswerJudge.load(cfg.mllm, cfg.prompts, device=device, dtype=cfg.mllm_dtype,
                            max_new_tokens=cfg.max_new_tokens)


def _clip_unavailable(ctx: Context, methods: dict) -> str | None:
    """Why CLIP cannot load, when every method shows pixels (so PSNR and MS-SSIM still mean something); else None.

    A run that needs CLIP for what it compares (necks, uncompressed, semantic...) still fails on a missing tower."""
    if not all(method.shows_pixels for method in methods.values()):
        return None
    try:
        ctx.clip
    except ComneckError as exc:
        return str(exc)
    return None


def _zero_shot(ctx: Context, classes: list[str], prompt: str) -> ZeroShot:
    try:
        return ZeroShot(ctx.clip, ctx.clip_model, classes, (prompt,), device=ctx.device)
    except ComneckError:
        raise
    except Exception as exc:  # open_clip's tokenizers fail in many ways (a Hugging Face tokenizer offline, ...)
        raise ComneckError(f"cannot build the zero-shot classifier of CLIP {ctx.clip_model} "
                           f"({type(exc).__name__}: {exc}); evaluate a flat folder to skip accuracy") from exc


def _choose_clip(cfg: EvalConfig) -> tuple[str, str, int | None]:
    """``--clip``/``--clip-tag``, else the CLIP the first neck (or U-Net, or decoder adapter) was trained for, else
    ViT-L-14 / openai; and the seed of that neck's random tower, when it records one (``clip.tower.random_clip``)."""
    if cfg.clip_model is not None:
        return cfg.clip_model, cfg.clip_tag or "openai", None
    from safetensors import safe_open

    from comneck_cli.features import resolve_neck
    from comneck_cli.models.adapter import AdapterInfo, adapter_registry_name
    from comneck_cli.models.neck import NeckInfo
    from comneck_cli.models.unet import PostprocessInfo, postprocess_registry_name

    candidates = []  # (how to find the file, how to read its info)
    for quality in cfg.qualities:  # whether or not the neck method runs: its CLIP is the one to compare with
        given = spec_for(cfg.necks, quality)
        name = given if given is not None else neck_registry_name(cfg.codec, quality)
        candidates.append((lambda name=name: resolve_neck(name), NeckInfo.from_metadata))
    for quality in cfg.qualities:
        given = spec_for(cfg.postprocess, quality)
        name = given if given is not None else postprocess_registry_name(cfg.codec, quality)
        candidates.append((lambda name=name: hub.resolve(name, "postprocess"), PostprocessInfo.from_metadata))
    for quality in cfg.qualities:  # an adapter trained for an MLLM's tower makes that tower eval's C
        name = cfg.adapter if cfg.adapter is not None else adapter_registry_name(cfg.codec, quality)
        candidates.append((lambda name=name: hub.resolve(name, "adapter"), AdapterInfo.from_metadata))
    for find, read in candidates:
        try:
            path = find()
            with safe_open(str(path), framework="pt") as f:
                info = read(dict(f.metadata() or {}), path)
        except Exception:  # the method plans again and reports why this file cannot be used
            continue
        seed = getattr(info, "clip_seed", None) if cfg.clip_tag is None else None
        return info.clip_model, cfg.clip_tag or info.clip_tag, seed
    return "ViT-L-14", cfg.clip_tag or "openai", None


def _load_chunk(cfg, chunk, work, failures, advance, say) -> dict[str, Entry]:
    entries = {}
    for item in chunk:
        pending = sum(1 for key in work if key[2] == item.id)
        if not pending:
            continue
        try:
            image, notes = load_image(item, cfg.size, max_pixels=cfg.max_pixels)
        except ComneckError as exc:
            failures.append(f"{item.id}: {exc}")
            say(f"error: {item.id}: {exc}")
            for _ in range(pending):
                advance()
            continue
        for note in notes:
            say(f"warning: {note}")
        entries[item.id] = Entry(item, image)
    return entries


@torch.inference_mode()
def _tower(ctx: Context, extractor, *, latents=None, images=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(selected features, projected embedding) of a batch: C'(T(latents)) or C(images)."""
    if latents is not None:
        tokens = extractor.neck(torch.cat(list(latents)).to(ctx.device))
    else:
        tokens = extractor.head(torch.stack([extractor.preprocess(im) for im in images]).to(ctx.device))
    whole = ctx.select in ("pooled", "projected")
    out = extractor.tail(tokens, layer=None if whole else ctx.layer, projected=ctx.select == "projected")
    return out.select(ctx.layer, ctx.select).float().cpu(), out.embedding.float().cpu()


def _batched(ctx: Context, extractor, inputs: list, kind: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
    def run(part):
        sel, emb = _tower(ctx, extractor, **{kind: part})
        return list(zip(sel, emb))

    return api.split_on_oom(run, inputs, lambda x: f"an input of shape {tuple(getattr(x, 'shape', ()))}")


def _reference(ctx: Context, entries: dict[str, Entry]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """C(x) of every loaded image: the target of feature fidelity."""
    ids = list(entries)
    return dict(zip(ids, _batched(ctx, ctx.reference, [entries[i].image for i in ids], "images")))


def _features(ctx: Context, outcomes: list[tuple[Entry, Outcome]],
              reference) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Features of every outcome, batched per (tower, input kind, latent grid)."""
    result: list = [None] * len(outcomes)
    groups: dict[tuple, list[int]] = {}
    for i, (entry, outcome) in enumerate(outcomes):
        if outcome.is_reference:
            result[i] = reference[entry.item.id]
        elif outcome.latents is not None:
            groups.setdefault((id(outcome.extractor), "latents", tuple(outcome.latents.shape)), []).append(i)
        else:
            groups.setdefault((id(outcome.extractor), "images"), []).append(i)
    for key, indices in groups.items():
        extractor = outcomes[indices[0]][1].extractor or ctx.reference
        kind = key[1]
        inputs = [outcomes[i][1].latents if kind == "latents" else outcomes[i][1].clip_image for i in indices]
        for i, feats in zip(indices, _batched(ctx, extractor, inputs, kind)):
            result[i] = feats
    return result


def _run_point(ctx, method, point: Point, entries: list[Entry], reference, classes, zero_shot, failures,
               advance, judge=None) -> list[dict]:
    outcomes = []
    for entry in entries:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)  # the neck's grid interpolation warns once per run
                outcomes.append((entry, method.run(ctx, point, entry)))
        except ComneckError as exc:
            failures.append(f"{point.method} {point.name} {entry.item.id}: {exc}")
            advance()
    if not outcomes:
        return []
    if reference is None:  # no CLIP: pixel metrics only
        rows = [_row(point, entry, outcome, None, None, None, classes, None) for entry, outcome in outcomes]
    else:
        try:
            features = _features(ctx, outcomes, reference)
        except ComneckError as exc:
            for entry, _ in outcomes:
                failures.append(f"{point.method} {point.name} {entry.item.id}: {exc}")
                advance()
            return []
        rows = [_row(point, entry, outcome, selected, embedding, reference[entry.item.id][0], classes, zero_shot)
                for (entry, outcome), (selected, embedding) in zip(outcomes, features)]
    if judge is not None:  # the MLLM's answers about the same outcomes
        for (entry, outcome), row in zip(outcomes, rows):
            scores = judge.score(ctx, method, point, entry, outcome)
            note = scores.pop("mllm_note", None)
            row.update(scores)
            row["notes"] += [note] if note else []
    return rows


def _row(point: Point, entry: Entry, outcome: Outcome, selected, embedding, target, classes, zero_shot) -> dict:
    height, width = entry.image.shape[:2]
    notes = list(outcome.notes)
    row = {
        "type": "point", "method": point.method, "point": point.name, "quality": point.quality,
        "image": entry.item.id, "label": None if entry.item.label is None else classes[entry.item.label],
        "setting": outcome.setting, "bytes": outcome.num_bytes, "height": height, "width": width,
        "bpp": bits_per_pixel(outcome.num_bytes, height, width),
        "psnr": None, "ms_ssim": None, "feature_mse": None, "feature_cosine": None, "correct": None,
        "predicted": None,
    }
    if outcome.view is not None:
        value = psnr(entry.image, outcome.view)
        if math.isinf(value):
            notes.append("identical to the original: PSNR is infinite")
        else:
            row["psnr"] = value
        row["ms_ssim"], note = ms_ssim(entry.image, outcome.view)
        notes += [note] if note else []
    if selected is not None:
        row["feature_mse"], row["feature_cosine"], note = feature_fidelity(selected, target)
        notes += [note] if note else []
    if zero_shot is not None and entry.item.label is not None:
        predicted = int(zero_shot.predict(embedding.unsqueeze(0))[0])
        row["predicted"] = classes[predicted]
        row["correct"] = int(predicted == entry.item.label)
    row["notes"] = notes
    row["models"] = point.models
    row["time"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    return row


def _taken(folder: Path, log_name: str) -> ComneckError:
    """The refusal to start an evaluation in a folder that holds one (exit 1: the folder is taken, not misused)."""
    return ComneckError(f"{folder} already holds an evaluation ({log_name}); pass `resume` to continue it or `force` "
                        "to start over", params=("resume", "force"))


class _Log:
    """``points.jsonl``: the settings line, then one row per finished point; appended, synced per chunk."""

    def __init__(self, path: Path, settings: dict, *, resume: bool, force: bool):
        self.path = path
        self.settings = settings
        self.rows: list[dict] = []
        self.stale = 0
        self._file = None
        if path.exists() and not resume:
            if not force:
                raise _taken(path.parent, path.name)
            path.unlink()
        if path.exists():
            self._read()
        else:
            try:
                with open(path, "w", encoding="utf-8") as f:
                    f.write(json.dumps({"type": "settings", "format": LOG_FORMAT, "version": LOG_VERSION,
                                        **settings}) + "\n")
                    f.flush()
                    os.fsync(f.fileno())
            except OSError as exc:
                raise ComneckError(f"cannot write {path}: {exc.strerror or exc}") from None

    def _read(self) -> None:
        data = self.path.read_bytes()
        lines = data.split(b"\n")
        complete = len(data) if data.endswith(b"\n") else data.rfind(b"\n") + 1
        if complete < len(data):  # a line cut short by a crash: drop it before appending
            with open(self.path, "r+b") as f:
                f.truncate(complete)
        parsed = []
        for number, line in enumerate(lines[:-1], start=1):
            if not line.strip():
                continue
            try:
                parsed.append(json.loads(line))
            except ValueError as exc:
                raise InputError(f"{self.path} line {number} is damaged ({exc}); delete the line, or pass `force` "
                                 "instead of `resume` to start over", params=("force", "resume")) from exc
        if not parsed or parsed[0].get("format") != LOG_FORMAT:
            raise InputError(f"{self.path} is not a comneck eval log; pass another `output` folder or `force`",
                             params=("output", "force"))
        if parsed[0].get("version") != LOG_VERSION:
            raise InputError(f"{self.path} was written by another comneck version; pass `force` to start over",
                             params=("force",))
        for key, value in self.settings.items():
            if parsed[0].get(key) != value:
                raise MismatchError(
                    f"{self.path} was made with {key} = {parsed[0].get(key)!r}, not {value!r}; rerun with the same "
                    "settings to resume, or pass `force` to start over", params=("force",)
                )
        self.rows = [row for row in parsed[1:] if row.get("type") == "point"]

    def finished(self, models: dict[tuple[str, str], dict]) -> dict[tuple[str, str, str], dict]:
        """The logged rows still valid (made with the same model files), latest per (method, point, image)."""
        done: dict[tuple[str, str, str], dict] = {}
        stale = set()
        for row in self.rows:
            key = (row["method"], row["point"], row["image"])
            wanted = models.get(key[:2])
            if wanted is not None and row.get("models") != wanted:
                stale.add(key)
                done.pop(key, None)
                continue
            stale.discard(key)
            done[key] = row
        self.stale = len(stale)
        return done

    def __enter__(self) -> "_Log":
        self._file = open(self.path, "a", encoding="utf-8")
        return self

    def __exit__(self, *exc) -> None:
        self.sync()
        self._file.close()
        self._file = None

    def append(self, row: dict) -> None:
        self._file.write(json.dumps(_finite(row), allow_nan=False) + "\n")

    def sync(self) -> None:
        if self._file is not None:
            self._file.flush()
            os.fsync(self._file.fileno())


def _finite(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value
