"""Issues #10 and #19: how good is a learned codec on photos it never saw? Against Pillow JPEG, WebP, AVIF.

The photos are the unseen evaluation set (``benchmarks/evalset/photos.json``, assembled by ``benchmarks/evalset.py``):
photographs from packages that were never used to train or tune comneck's codecs. Each is fed at its own size, as
``comneck encode`` reads it (8-bit RGB, EXIF orientation applied; nothing is scaled or cropped), and every method
codes it whole.

The codec is the shipped default (``mbt2018-mean-vbr``, its file in ``weights/``) unless ``--codec`` names another
variable-rate codec (``lapped-pca-vbr``); ``--weights FILE`` measures that file, and the codec its metadata names when
``--codec`` is left out (a file of another codec than ``--codec`` is refused).

For each method the script sweeps its setting per photo: the learned codec's rate R at its eight levels (1, ..., 8),
and Pillow's quality 2, 8, ..., 98 for JPEG (libjpeg-turbo, 4:2:0), WebP (``method=6``, its slowest and best) and AVIF
(libavif/aom at Pillow's default speed 6; reported as skipped where Pillow has no AVIF encoder). bpp counts the whole
file (the ``.cnk`` record with its container, the JPEG/WebP/AVIF file with its headers); PSNR is RGB 8-bit over the
whole image and MS-SSIM is pytorch-msssim's definition on the RGB image (data range 255, ``comneck_cli.eval.metrics.ms_ssim``). Curves average bpp and quality over
the photos at each setting. BD-rate (``bjontegaard`` pchip, as ``comneck eval``) compares the curves over 0.1–2.0 bpp
(only points in that range enter, at least four per method; negative = the codec needs fewer bits than the anchor
for the same quality), and for each of the codec's rates the JSON and the card say whether the anchor gives more
quality at the codec's bpp ("rates where JPEG is better").

    python benchmarks/default_codec.py [--codec NAME] [--weights NAME|FILE] [--evalset DIR]
        [-o benchmarks/results/default_codec.json] [--anchors-from RESULTS.json]
        [--plot weights/mbt2018-mean-vbr.png] [--card weights/mbt2018-mean-vbr.md] [--jobs N] [--tiny]

A stopped run resumes: each finished (method, photo) sweep is kept in ``OUTPUT.partial.jsonl`` until the JSON is
written. Its codec rows are kept while the codec, its weights' sha256 and the rates are the same; its anchor rows
while the qualities, each anchor's Pillow and library versions (and options) and the evaluation set's listing are
the same, whatever the codec. ``--jobs N`` sweeps in N processes of one torch thread each (results are the same).

The anchors (about 3/4 of a full run) do not depend on the codec: ``--anchors-from RESULTS.json`` takes their rows
from an earlier results JSON of this script (e.g. ``benchmarks/results/default_codec.json``) when its qualities,
evaluation-set listing, photo names and anchor versions are this run's, and stops with one line saying which differs
otherwise. The JSON's ``anchors_from`` (and the card) say which file the anchor rows came from and when they were
measured.

``--card`` rewrites the model card's results block (between ``CARD_BEGIN`` and ``CARD_END``) from this run, so the
card quotes exactly what was measured. ``--tiny`` (the smoke test) runs a few settings of JPEG and WebP on two small
crops of scikit-image photos: it checks the script, it measures nothing.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

from comneck_cli.defaults import DEFAULT_CODEC, VARIABLE_RATE_CODECS

import evalset  # benchmarks/evalset.py, beside this script

CODEC = DEFAULT_CODEC  # the shipped codec, measured unless --codec names another
RATES = tuple(float(r) for r in range(1, 9))  # the eight trained levels
PIL_QUALITIES = tuple(range(2, 101, 6))
BPP_RANGE = (0.1, 2.0)
METRICS = {"psnr": "PSNR (dB, RGB)", "ms_ssim": "MS-SSIM"}
ANCHORS = ("jpeg", "webp", "avif")
LIBRARIES = {"jpeg": "libjpeg_turbo", "webp": "webp", "avif": "avif"}  # Pillow's feature name of each anchor's library
TINY_PHOTOS = ("astronaut.png", "chelsea.png")


def pillow_codecs():
    """The anchors: Pillow's JPEG and AVIF with their defaults, WebP at ``method=6``."""
    from comneck_cli.eval.baselines import TRADITIONAL

    return {"jpeg": TRADITIONAL["jpeg"], "webp": dataclasses.replace(TRADITIONAL["webp"], options={"method": 6}),
            "avif": TRADITIONAL["avif"]}


def anchor_descriptions(anchors) -> dict[str, str]:
    """Each anchor in words: Pillow's version, its library's version and its options (what its rows depend on)."""
    import PIL
    from PIL import features

    codecs = pillow_codecs()
    return {a: f"Pillow {PIL.__version__} {codecs[a].title} ({LIBRARIES[a]} {features.version(LIBRARIES[a]) or '?'}"
               f"{''.join(f', {k}={v}' for k, v in codecs[a].options.items())})" for a in anchors}


def unavailable(anchors) -> dict[str, str]:
    """The anchors this Pillow cannot encode, with why."""
    codecs = pillow_codecs()
    return {a: codecs[a].unavailable() for a in anchors if codecs[a].unavailable()}


def tiny_images() -> dict[str, np.ndarray]:
    """Two 96×128 crops of scikit-image photos for the smoke test (scikit-image's photos tuned the codec)."""
    import skimage.data

    from comneck_cli.io.images import read_image

    folder = Path(skimage.data.__file__).parent
    return {name: read_image(folder / name)[:96, :128] for name in TINY_PHOTOS}


def _repo_relative(path: Path) -> str:
    """The weights file as the report names it: relative to the repository when inside it (no machine's paths)."""
    repo = Path(__file__).resolve().parents[1]
    return str(path.resolve().relative_to(repo)) if path.resolve().is_relative_to(repo) else str(path)


def quality(image: np.ndarray, decoded: np.ndarray) -> dict[str, float | None]:
    """PSNR (dB, RGB 8-bit) and MS-SSIM (None below the 161-px short side) of ``decoded`` against ``image``."""
    from comneck_cli.eval.metrics import ms_ssim, psnr

    return {"psnr": psnr(image, decoded), "ms_ssim": ms_ssim(image, decoded)[0]}


def sweep_codec(images: dict[str, np.ndarray], codec, rates) -> list[dict]:
    """The rows of ``codec`` (a loaded variable-rate codec) at ``rates``, labelled with its name."""
    from comneck_cli import coding as api
    from comneck_cli.formats import pack

    rows = []
    for name, image in images.items():
        print(f"{codec.spec.name}: {name}", file=sys.stderr, flush=True)
        y = codec.analyze(api.to_tensor(image, 64))  # g_a once per image; each rate only re-codes y
        for rate in rates:
            at = codec.at_rate(rate)
            strings, _ = at.code(y)
            record = api.record_from_strings(image, at, strings, None)
            rows.append({"method": codec.spec.name, "setting": rate, "image": name,
                         "bpp": 8 * len(pack(record)) / (image.shape[0] * image.shape[1]),
                         **quality(image, api.decode(record, at))})
    return rows


def sweep_pillow(images: dict[str, np.ndarray], method: str, qualities) -> list[dict]:
    codec = pillow_codecs()[method]
    rows = []
    for name, image in images.items():
        print(f"{method}: {name}", file=sys.stderr, flush=True)
        for setting in qualities:
            data = codec.encode(image, setting)
            rows.append({"method": method, "setting": setting, "image": name,
                         "bpp": 8 * len(data) / (image.shape[0] * image.shape[1]),
                         **quality(image, codec.decode(data))})
    return rows


def mean_points(rows: list[dict], metric: str) -> list[dict]:
    """Per setting: the mean bpp and mean ``metric`` over the images (None if any image lacks it), by bpp."""
    by_setting: dict[float, list[dict]] = {}
    for row in rows:
        by_setting.setdefault(row["setting"], []).append(row)
    points = []
    for setting, group in by_setting.items():
        values = [r[metric] for r in group]
        points.append({"setting": setting, "bpp": float(np.mean([r["bpp"] for r in group])),
                       "value": None if any(v is None for v in values) else float(np.mean(values))})
    return sorted(points, key=lambda p: p["bpp"])


def mean_curve(rows: list[dict], metric: str = "psnr") -> list[tuple[float, float | None]]:
    """(mean bpp, mean metric) per setting, in order of bpp."""
    return [(p["bpp"], p["value"]) for p in mean_points(rows, metric)]


def in_range(curve: list[tuple[float, float | None]]) -> list[tuple[float, float | None]]:
    """The points inside BPP_RANGE, kept monotone in quality (pchip needs a strictly increasing curve)."""
    kept: list[tuple[float, float | None]] = []
    for bpp, value in curve:
        if BPP_RANGE[0] <= bpp <= BPP_RANGE[1] and (value is None or not kept or kept[-1][1] is None
                                                    or value > kept[-1][1]):
            kept.append((bpp, value))
    return kept


def anchor_better(points: list[dict], anchor: list[tuple[float, float | None]]) -> list[float]:
    """The codec's settings whose mean quality is below the anchor's at the same mean bpp (anchor interpolated
    linearly in bpp); settings outside the anchor's bpp span, or without a value, are not judged."""
    known = [(b, v) for b, v in anchor if v is not None]
    if not known:
        return []
    bpps, values = zip(*known)
    return [p["setting"] for p in points if p["value"] is not None and bpps[0] <= p["bpp"] <= bpps[-1]
            and float(np.interp(p["bpp"], bpps, values)) > p["value"]]


_WORKER: dict = {}


def _start_worker(images: dict[str, np.ndarray], weights: str | None, rates, qualities, codec_name: str) -> None:
    import torch

    torch.set_num_threads(1)  # one process per core: torch's own threads would only contend
    _WORKER.update(images=images, weights=weights, rates=rates, qualities=qualities, codec_name=codec_name)


def _sweep_one(key: tuple[str, str]) -> tuple[tuple[str, str], list[dict]]:
    """One (method, photo) sweep in a worker process; the worker loads the codec once, on its first codec sweep."""
    method, name = key
    image = {name: _WORKER["images"][name]}
    if method in ANCHORS:
        return key, sweep_pillow(image, method, _WORKER["qualities"])
    if "codec" not in _WORKER:
        from comneck_cli.codecs import load_codec

        _WORKER["codec"] = load_codec(_WORKER["codec_name"], 1, weights=_WORKER["weights"])
    return key, sweep_codec(image, _WORKER["codec"], _WORKER["rates"])


def _resume(done: Path, header: dict) -> dict[tuple[str, str], list[dict]]:
    """The sweeps ``done`` keeps for a run with ``header``: the codec's while ``header["codec"]`` is the file's, the
    anchors' while ``header["anchors"]`` is; ``done`` is rewritten with this header and what it kept."""
    from comneck_cli.io.outputs import write_atomic

    lines = [json.loads(line) for line in done.read_text().splitlines() if line.strip()] if done.exists() else []
    old = lines[0] if lines else {}
    kept = [e for e in lines[1:] if old.get("anchors" if e["method"] in ANCHORS else "codec")
            == header["anchors" if e["method"] in ANCHORS else "codec"]]
    done.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(done, "".join(json.dumps(line) + "\n" for line in (header, *kept)).encode(), force=True)
    return {(e["method"], e["image"]): e["rows"] for e in kept}


def measure(images: dict[str, np.ndarray], weights: str | None, rates, qualities, anchors,
            done: Path | None = None, jobs: int = 1, *, codec_name: str = CODEC, listing_sha256: str | None = None,
            reused: dict[tuple[str, str], list[dict]] | None = None) -> dict:
    """Every row, the mean curves, BD-rates and anchor-better rates of one run (the JSON's measured part).

    ``done`` (a JSON-lines file) keeps each finished (method, photo) sweep, so a run that is stopped resumes
    where it was: its first line says what the codec's rows depend on (codec, weights' sha256, rates, the evaluation
    set's ``listing_sha256``) and what the anchors' do (qualities, versions, listing), and only the rows whose part
    still holds are kept. ``reused`` holds (anchor, photo) sweeps taken from an earlier report: they are not run.
    ``jobs`` > 1 runs the sweeps in that many processes of one torch thread each.
    """
    from comneck_cli.codecs import load_codec
    from comneck_cli.eval.report import bd_rate
    from comneck_cli.weights import file_sha256

    codec = load_codec(codec_name, 1, weights=weights)
    header = {"codec": {"codec": codec_name, "sha256": file_sha256(Path(codec.source)), "rates": list(rates),
                        "evalset_listing_sha256": listing_sha256},
              "anchors": {"qualities": list(qualities), "versions": anchor_descriptions(anchors),
                          "evalset_listing_sha256": listing_sha256}}
    finished = {} if done is None else _resume(done, header)
    finished.update(reused or {})
    skipped = unavailable(anchors)
    anchors = [a for a in anchors if a not in skipped]
    keys = [(method, name) for method in (codec_name, *anchors) for name in images]
    pending = [key for key in keys if key not in finished]
    if jobs > 1 and pending:
        import multiprocessing

        context = multiprocessing.get_context("spawn")  # never fork a process that has started torch's threads
        with context.Pool(jobs, _start_worker, (images, weights, rates, qualities, codec_name)) as pool:
            results = pool.imap_unordered(_sweep_one, pending)
            for key, rows in results:
                finished[key] = rows
                _record(done, key, rows)
    else:
        _WORKER.update(images=images, weights=weights, rates=rates, qualities=qualities, codec_name=codec_name,
                       codec=codec)
        for key in pending:
            finished[key] = _sweep_one(key)[1]
            _record(done, key, finished[key])
    rows = [row for key in keys for row in finished[key]]
    methods = (codec_name, *anchors)
    curves = {metric: {m: mean_curve([r for r in rows if r["method"] == m], metric) for m in methods}
              for metric in METRICS}
    bd, better = {}, {}
    for anchor in anchors:
        bd[anchor], better[anchor] = {}, {}
        for metric, label in METRICS.items():
            value, note = bd_rate(in_range(curves[metric][anchor]), in_range(curves[metric][codec_name]),
                                  names=(anchor, codec_name), metric=label.split(" ")[0])
            bd[anchor][metric] = {"bd_rate_percent": value, "note": note}
            points = mean_points([r for r in rows if r["method"] == codec_name], metric)
            better[anchor][metric] = anchor_better(points, curves[metric][anchor])
    return {"rows": rows, "curves": curves, "bd_rate": bd, "anchor_better": better, "skipped": skipped}


def _record(done: Path | None, key: tuple[str, str], rows: list[dict]) -> None:
    if done is not None:
        with open(done, "a") as f:
            f.write(json.dumps({"method": key[0], "image": key[1], "rows": rows}) + "\n")


CARD_BEGIN = "<!-- results: written by benchmarks/default_codec.py --card from its JSON; do not edit by hand -->"
CARD_END = "<!-- /results -->"
CARD_RATES = (1, 2, 3, 4, 5, 6, 7, 8)


def _percent(entry: dict) -> str:
    value = entry["bd_rate_percent"]
    return "n/a" if value is None else f"{value:+.1f} %"


def card_results(report: dict) -> str:
    """The model card's results block: BD-rates, the rates where an anchor wins, and the codec's mean points."""
    curves, n = report["curves"], len(report["held_out"])
    sizes = report.get("sizes", {})
    pixels = sorted(h * w for h, w in sizes.values()) if sizes else []
    source = report.get("anchors_from")  # None, or absent in reports from before --anchors-from
    reused = f" Anchor rows from `{source['file']}` (measured {source['date']})." if source else ""
    fed = (f", each coded whole at its own size ({pixels[0] / 1e6:.2f}–{pixels[-1] / 1e6:.2f} Mpixel)"
           if pixels else "")
    lines = [CARD_BEGIN, "",
             f"`{report['codec']}` measured {report['date']} with `benchmarks/default_codec.py` on {n} photos of "
             f"{report['photo_set']}"
             f"{fed} ({report['machine']['cpus']} CPUs, {report['seconds']:.0f} s). BD-rate over "
             f"{report['bpp_range'][0]}–{report['bpp_range'][1]} bpp (pchip), whole-file bits; negative means fewer "
             "bits than the anchor for the same quality. Anchors: "
             + "; ".join(report["anchors"].values()) + "." + reused, ""]
    lines += ["| anchor | BD-rate, PSNR | BD-rate, MS-SSIM | rates R where the anchor is better at equal bpp (PSNR) |",
              "|---|---|---|---|"]
    notes = []
    for anchor, result in report["bd_rate"].items():
        cells = []
        for metric in METRICS:
            cells.append(_percent(result[metric]))
            if result[metric]["note"]:
                notes.append(f"{anchor.upper()}, {METRICS[metric].split(' ')[0]}: {result[metric]['note']}")
        rates = report["anchor_better"][anchor]["psnr"]
        lines.append(f"| Pillow {anchor.upper()} | {cells[0]} | {cells[1]} | "
                     f"{', '.join(f'{r:g}' for r in rates) if rates else 'none'} |")
    lines += [""] + [f"- {note}" for note in notes] + ([""] if notes else [])
    for anchor, why in report.get("skipped", {}).items():
        lines += [f"{anchor.upper()} skipped: {why}", ""]
    anchors = list(report["bd_rate"])
    lines += ["| rate R | mean bpp | PSNR (dB) | MS-SSIM | " + " | ".join(f"{a.upper()} PSNR at that bpp" for a in anchors)
              + " |", "|---" * (4 + len(anchors)) + "|"]
    by_rate: dict[float, list[dict]] = {}
    for row in report["rows"]:
        if row["method"] == report["codec"] and row["setting"] in CARD_RATES:
            by_rate.setdefault(row["setting"], []).append(row)
    for rate, group in sorted(by_rate.items()):
        bpp, value = float(np.mean([r["bpp"] for r in group])), float(np.mean([r["psnr"] for r in group]))
        ssim = None if any(r["ms_ssim"] is None for r in group) else float(np.mean([r["ms_ssim"] for r in group]))
        psnr_curves = curves["psnr"]
        at = [np.interp(bpp, [p[0] for p in psnr_curves[a]], [p[1] for p in psnr_curves[a]]) for a in anchors]
        lines.append(f"| {rate:g} | {bpp:.3f} | {value:.2f} | {'n/a' if ssim is None else f'{ssim:.4f}'} | "
                     + " | ".join(f"{v:.2f}" for v in at) + " |")
    return "\n".join(lines + ["", CARD_END])


def write_card(path: Path, block: str) -> None:
    """Replace the card's results block (or append one) with ``block``, atomically."""
    from comneck_cli.io.outputs import write_atomic

    text = path.read_text(encoding="utf-8") if path.exists() else ""
    if CARD_BEGIN in text and CARD_END in text:
        head, rest = text.split(CARD_BEGIN, 1)
        text = head + block + rest.split(CARD_END, 1)[1]
    else:
        text = text.rstrip("\n") + ("\n\n" if text else "") + block + "\n"
    write_atomic(path, text.encode("utf-8"), force=True)


def plot(curves: dict[str, dict[str, list]], path: Path, title: str) -> None:
    """Rate-PSNR and rate-MS-SSIM (in dB, −10·log10(1 − MS-SSIM)) side by side, up to 2.2 bpp."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4.2), dpi=110)
    for ax, metric in zip(axes, METRICS):
        for name, curve in curves[metric].items():
            points = [(b, v) for b, v in curve if b <= 2.2 and v is not None]
            if metric == "ms_ssim":
                points = [(b, -10 * math.log10(max(1 - v, 1e-10))) for b, v in points]
            ax.plot([p[0] for p in points], [p[1] for p in points], marker=".", label=name)
        ax.axvspan(*BPP_RANGE, color="0.94", zorder=0, label="BD-rate range")
        ax.set_xlabel("bits per pixel (whole file)")
        ax.set_ylabel("PSNR (dB, RGB)" if metric == "psnr" else "MS-SSIM (dB: −10·log10(1 − MS-SSIM))")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


class DefaultCodecError(Exception):
    """A run this script refuses, with the one line that says why."""


def codec_and_weights(codec: str | None, weights: str | None) -> tuple[str, Path]:
    """The codec to measure and its weights file. ``weights`` (a file or registry name; None: the registry's file of
    the codec) holds the codec its metadata names, which is measured when ``codec`` is None; a ``codec`` it does
    not hold is refused, and so is a codec without variable rates."""
    from comneck_cli.codecs import get_spec, resolve_weights, weights_info

    path = resolve_weights(get_spec(codec or CODEC), 1, weights)
    held = weights_info(path).get("codec")
    if codec is not None and held is not None and held != codec:
        raise DefaultCodecError(f"--weights {weights} holds codec {held}, not {codec}; pass --codec {held} or leave "
                                "--codec out")
    name = codec or held or CODEC
    if name not in VARIABLE_RATE_CODECS:
        raise DefaultCodecError(f"--weights {weights} holds codec {name}, which has no variable rate; this script "
                                f"sweeps R = 1..8 of {' or '.join(VARIABLE_RATE_CODECS)}")
    return name, path


def earlier_anchors(path: Path, images: dict[str, np.ndarray], qualities, anchors,
                    listing_sha256: str | None) -> tuple[dict[tuple[str, str], list[dict]], dict[str, str]]:
    """The (anchor, photo) sweeps of an earlier results JSON of this script, and where they came from (``file``, and
    ``date``: when they were measured). Refused, saying what differs, unless its qualities, evaluation-set listing,
    photo names and the version of each anchor this run codes are this run's."""
    try:
        earlier = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise DefaultCodecError(f"--anchors-from {path}: cannot read it ({exc})") from exc
    if not isinstance(earlier, dict) or any(key not in earlier for key in ("qualities", "evalset_listing_sha256",
                                                                            "held_out", "anchors", "rows", "date")):
        raise DefaultCodecError(f"--anchors-from {path} is not a results JSON of benchmarks/default_codec.py")
    here = anchor_descriptions([a for a in anchors if a not in unavailable(anchors)])
    differs = [f"its {what} ({theirs}) and this run's ({mine}) differ" for what, theirs, mine in (
        ("qualities", earlier["qualities"], list(qualities)),
        ("evaluation-set listing sha256", earlier["evalset_listing_sha256"], listing_sha256)) if theirs != mine]
    if set(earlier["held_out"]) != set(images):
        differs.append(f"photos in only one of them: {', '.join(sorted(set(earlier['held_out']) ^ set(images)))}")
    differs += [f"its {a} anchor ({earlier['anchors'].get(a, 'not measured')}) and this run's ({version}) differ"
                for a, version in here.items() if earlier["anchors"].get(a) != version]
    if differs:
        raise DefaultCodecError(f"--anchors-from {path}: {'; '.join(differs)}; leave --anchors-from out to measure "
                                "the anchors afresh")
    rows: dict[tuple[str, str], list[dict]] = {}
    for row in earlier["rows"]:
        if row["method"] in here:
            rows.setdefault((row["method"], row["image"]), []).append(row)
    return rows, {"file": _repo_relative(Path(path)), "date": (earlier.get("anchors_from") or earlier)["date"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--codec", choices=VARIABLE_RATE_CODECS, default=None,
                        help=f"the codec to measure (default: the one --weights FILE holds, else {CODEC})")
    parser.add_argument("--weights", default=None, help="codec FILE or registry NAME (default: the registry's)")
    parser.add_argument("--evalset", type=Path, default=None,
                        help=f"the assembled evaluation set (default ${evalset.ENV} or ~/.cache/comneck/evalset)")
    parser.add_argument("-o", "--output", type=Path, default=Path("benchmarks/results/default_codec.json"))
    parser.add_argument("--anchors-from", type=Path, default=None,
                        help="take the anchors' rows from this earlier results JSON (same qualities, photos, versions)")
    parser.add_argument("--plot", type=Path, default=None, help="also write the rate-quality plot here (PNG)")
    parser.add_argument("--card", type=Path, default=None, help="rewrite this model card's results block")
    parser.add_argument("--jobs", type=int, default=1, help="sweep in this many processes (one torch thread each)")
    parser.add_argument("--tiny", action="store_true",
                        help="smoke test: two small scikit-image crops, few settings, JPEG and WebP only")
    args = parser.parse_args()

    from comneck_cli.errors import ComneckError
    from comneck_cli.weights import file_sha256

    started = time.time()
    try:
        codec_name, source = codec_and_weights(args.codec, args.weights)
        if args.tiny:
            images, photo_set = tiny_images(), "scikit-image (smoke test only: these photos tuned the codec)"
            rates, qualities, anchors = RATES[::7], PIL_QUALITIES[::6], ANCHORS[:2]
        else:
            images = evalset.load_photos(args.evalset)
            photo_set = "the unseen evaluation set (`benchmarks/evalset/`)"
            rates, qualities, anchors = RATES, PIL_QUALITIES, ANCHORS
        listing = None if args.tiny else file_sha256(evalset.LISTING)
        reused, anchors_from = ({}, None) if args.anchors_from is None else earlier_anchors(
            args.anchors_from, images, qualities, anchors, listing)
    except (ComneckError, DefaultCodecError, evalset.EvalsetError) as exc:
        sys.exit(f"default_codec: {exc}")
    done = None if args.tiny else args.output.with_suffix(".partial.jsonl")
    result = measure(images, str(source), rates, qualities, anchors, done, args.jobs, codec_name=codec_name,
                     listing_sha256=listing, reused=reused)
    curves, bd = result["curves"], result["bd_rate"]

    print(f"{len(images)} photos, bpp range {BPP_RANGE[0]}-{BPP_RANGE[1]} for BD-rate")
    for method, curve in curves["psnr"].items():
        shown = ", ".join(f"({b:.3f}, {p:.2f})" for b, p in in_range(curve)[::3])
        print(f"{method:18} {len(in_range(curve)):>3} points in range  (bpp, PSNR dB): {shown}")
    for anchor, by_metric in bd.items():
        for metric, entry in by_metric.items():
            print(f"BD-rate of {codec_name} vs {anchor}, {metric}: {_percent(entry)}"
                  f"{'' if not entry['note'] else '  (' + entry['note'] + ')'}")
        print(f"rates where {anchor} is better at equal bpp (PSNR): {result['anchor_better'][anchor]['psnr']}")
    for anchor, why in result["skipped"].items():
        print(f"{anchor} skipped: {why}")
    if anchors_from:
        print(f"anchor rows from {anchors_from['file']} (measured {anchors_from['date']})")

    report = {
        "codec": codec_name, "weights": _repo_relative(source), "sha256": file_sha256(source),
        "photo_set": photo_set, "held_out": list(images),
        "sizes": {name: list(image.shape[:2]) for name, image in images.items()},
        "fed": "each photo whole at its own size, 8-bit RGB as comneck encode reads it; nothing scaled or cropped"
               if not args.tiny else "96x128 crops",
        "evalset_listing_sha256": listing,
        "bpp_range": BPP_RANGE, "rates": list(rates), "qualities": list(qualities),
        "anchors": anchor_descriptions([a for a in anchors if a not in result["skipped"]]),
        "anchors_from": anchors_from,
        **result,
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
        "seconds": round(time.time() - started, 1), "date": time.strftime("%Y-%m-%d %H:%M"),
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=1))
    if done is not None:
        done.unlink()  # the JSON holds every row now
    if args.plot:
        plot(curves, args.plot, f"{codec_name} ({source.name}) vs Pillow, {len(images)} photos of {photo_set}"
             .replace("`", ""))
    if args.card:
        write_card(args.card, card_results(report))
    print(f"wrote {args.output}" + "".join(f" and {p}" for p in (args.plot, args.card) if p))


if __name__ == "__main__":
    main()
