"""The report: averaged points, BD-rates, ``points.csv``/``points.json``, ``summary.md`` and one PNG per metric.

Averages per (method, point) are means over the images of the per-image values (bpp included, as
CompressAI's own evaluation averages bpp and PSNR); accuracy is the mean of the per-image 0/1 top-1 hits. An
image without a value for a metric (MS-SSIM on small images, PSNR of a d3 neck) is left out of that mean and
the number of images averaged is recorded.

BD-rate (Bjøntegaard delta rate, the ``bjontegaard`` package, piecewise cubic Hermite interpolation ``pchip`` as
the JVET spreadsheet) of every method against ``reconstruction`` on every metric: the average difference in
rate, in percent, for the same metric value over the metric range both curves cover; negative means fewer bits
for the same quality. It needs 4 or more points per curve, with rates strictly increasing and the metric
strictly improving with rate (feature MSE is negated, as lower is better); otherwise the report gives the
reason instead of a number. ``uncompressed`` is a single point, the upper bound, drawn as a horizontal line.
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Callable, Iterable, Sequence

from comneck_cli.io.outputs import write_atomic
from comneck_cli.eval.metrics import METRICS, Metric

ANCHOR = "reconstruction"
BD_METHOD = "pchip"
MIN_BD_POINTS = 4
CSV_COLUMNS = ("kind", "method", "point", "quality", "image", "label", "setting", "n", "bytes", "bpp", "psnr",
               "ms_ssim", "feature_mse", "feature_cosine", "accuracy", "correct", "predicted", "mllm_agreement", "mllm_kl", "notes")


# ------------------------------------------------------------------------------------------ BD-rate
def bd_rate(anchor: Iterable[tuple[float, float | None]], test: Iterable[tuple[float, float | None]], *,
            higher_is_better: bool = True, names: tuple[str, str] = ("anchor", "test"),
            metric: str = "the metric") -> tuple[float | None, str | None]:
    """BD-rate in percent of ``test`` against ``anchor``, each a sequence of (rate, metric value) points.

    Returns ``(value, None)``, ``(value, warning)`` when the curves overlap only partly, or ``(None, reason)``
    when it cannot be computed (fewer than 4 points, rates not strictly increasing, the metric not strictly
    improving with rate, the curves not overlapping).
    """
    curves = []
    for name, points in zip(names, (anchor, test)):
        curve, reason = _curve(list(points), name, metric, higher_is_better)
        if reason:
            return None, reason
        curves.append(curve)
    import bjontegaard

    (ra, da), (rt, dt) = curves
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        value = float(bjontegaard.bd_rate(ra, da, rt, dt, method=BD_METHOD, require_matching_points=False))
    messages = [str(w.message) for w in caught]
    if not math.isfinite(value):
        return None, f"the {names[1]} and {names[0]} curves do not overlap in {metric}"
    overlap = next((m for m in messages if "overlap" in m.lower()), None)
    if overlap is None:
        return value, None
    shared = re.search(r"overlap: '([0-9.]+)'", overlap)
    share = f"{float(shared.group(1)):.0f} % of their joint range" if shared else "part of their range"
    return value, f"curves overlap only partly in {metric}: {share}, the only part compared"


def _curve(points, name: str, metric: str, higher_is_better: bool):
    if any(value is None or not math.isfinite(value) for _, value in points):
        return None, f"{name} has no {metric} at some points"
    if len(points) < MIN_BD_POINTS:
        return None, f"needs at least {MIN_BD_POINTS} points per curve; {name} has {len(points)}"
    points = sorted(points)
    rates = [r for r, _ in points]
    values = [v if higher_is_better else -v for _, v in points]
    for (r0, v0), (r1, v1) in zip(zip(rates, values), zip(rates[1:], values[1:])):
        if not r1 > r0:
            return None, f"{name} has two points at the same rate ({r0:.4g} bpp)"
        if not v1 > v0:
            shown = (v0, v1) if higher_is_better else (-v0, -v1)
            return None, (f"{name}'s {metric} does not improve strictly with rate ({shown[0]:.4g} at {r0:.4g} bpp, "
                          f"{shown[1]:.4g} at {r1:.4g} bpp)")
    return (rates, values), None


# ------------------------------------------------------------------------------------------ averages
def aggregate(points, rows: Sequence[dict]) -> list[dict]:
    """One mean row per planned (method, point) that has image rows, in plan order."""
    by_key: dict[tuple[str, str], list[dict]] = {}
    for row in rows:
        by_key.setdefault((row["method"], row["point"]), []).append(row)
    means = []
    for point in points:
        group = by_key.get((point.method, point.name))
        if not group:
            continue
        mean = {"type": "mean", "method": point.method, "point": point.name, "quality": point.quality,
                "n": len(group), "bpp": _mean(r["bpp"] for r in group), "bytes": _mean(r["bytes"] for r in group)}
        counts = {}
        for metric in METRICS.values():
            values = [r[metric.field] for r in group if r.get(metric.field) is not None]
            mean[metric.name] = _mean(values)
            counts[metric.name] = len(values)
        mean["counts"] = counts
        notes: dict[str, int] = {}
        for row in group:
            for note in row.get("notes", []):
                notes[note] = notes.get(note, 0) + 1
        mean["notes"] = [f"{note} ({n} of {len(group)} images)" for note, n in notes.items()]
        means.append(mean)
    return means


def _mean(values: Iterable[float]) -> float | None:
    values = [float(v) for v in values]
    return sum(values) / len(values) if values else None


def bd_rates(means: Sequence[dict], methods: Sequence[str]) -> dict[str, dict[str, dict]]:
    """``{method: {metric: {"value": percent or None, "reason": str or None}}}`` against :data:`ANCHOR`."""
    table: dict[str, dict[str, dict]] = {}
    anchor_rows = [m for m in means if m["method"] == ANCHOR]
    for method in methods:
        rows = [m for m in means if m["method"] == method]
        table[method] = {}
        for metric in METRICS.values():
            if method == ANCHOR:
                entry = {"value": None, "reason": "anchor"}
            elif not anchor_rows:
                entry = {"value": None, "reason": f"no {ANCHOR} points to compare with"}
            elif method == "uncompressed":
                entry = {"value": None, "reason": "a single point (the upper bound), drawn as a line"}
            elif not rows:
                entry = {"value": None, "reason": "no points"}
            else:
                value, reason = bd_rate([(m["bpp"], m.get(metric.name)) for m in anchor_rows],
                                        [(m["bpp"], m.get(metric.name)) for m in rows],
                                        higher_is_better=metric.higher_is_better, names=(ANCHOR, method),
                                        metric=metric.name)
                entry = {"value": value, "reason": reason}
            table[method][metric.name] = entry
    return table


# ------------------------------------------------------------------------------------------ files
def write_report(folder: Path, *, header: dict, methods: dict[str, str], points, rows: Sequence[dict], skips,
                 failures: Sequence[str], spell: Callable[[str], str] | None = None) -> tuple[list[dict], list[Path]]:
    """Write every report file into ``folder`` (atomically, replacing earlier reports); return (means, files).

    ``spell`` rewrites the library's sentences (skip reasons, failures, per-image notes) in the words of whoever
    reads the report: the command line passes its flag speller, so the report says ``--codec`` where the
    library says ```codec```, as stderr does; by default they stay as they are.
    """
    if spell is not None:
        skips = [replace(s, reason=spell(s.reason)) for s in skips]
        failures = [spell(f) for f in failures]
        rows = [{**r, "notes": [spell(n) for n in r.get("notes", [])]} for r in rows]
    means = aggregate(points, rows)
    bd = bd_rates(means, list(methods))
    status = _method_status(methods, points, means, skips)
    files = []

    def put(name: str, data: bytes) -> None:
        write_atomic(folder / name, data, force=True)
        files.append(folder / name)

    document = {
        "format": "comneck-eval-report",
        "settings": header,
        "methods": status,
        "skipped": [{"method": s.method, "point": s.point, "reason": s.reason} for s in skips],
        "failures": list(failures),
        "bd_rate": {"anchor": ANCHOR, "interpolation": BD_METHOD, "bjontegaard": _bjontegaard_version(),
                    "values": bd},
        "means": [_clean(m) for m in means],
        "images": [_clean({k: v for k, v in r.items() if k != "type"}) for r in rows],
    }
    put("points.json", (json.dumps(document, indent=2, allow_nan=False) + "\n").encode())
    put("points.csv", _csv(means, rows))
    plots = {}
    for metric in METRICS.values():
        png = _plot(metric, means, list(methods))
        if png is not None:
            put(f"{metric.name}.png", png)
            plots[metric.name] = f"{metric.name}.png"
    put("summary.md", _summary(header, status, skips, failures, means, bd, plots, list(methods)).encode())
    return means, files


def _method_status(methods: dict[str, str], points, means, skips) -> list[dict]:
    status = []
    for name, what in methods.items():
        whole = next((s for s in skips if s.method == name and s.point is None), None)
        planned = [p.name for p in points if p.method == name]
        measured = [m["point"] for m in means if m["method"] == name]
        skipped = [{"point": s.point, "reason": s.reason} for s in skips if s.method == name and s.point is not None]
        if whole is not None or not planned:
            state = "skipped"
        elif skipped or len(measured) < len(planned):
            state = "partial"
        else:
            state = "ok"
        detail = next((p.detail for p in points if p.method == name and p.detail), "")
        status.append({"name": name, "status": state, "reason": whole.reason if whole else None, "what": what,
                       "detail": detail, "points": measured, "skipped_points": skipped})
    return status


def _clean(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_clean(v) for v in value]
    return value


def _csv(means: Sequence[dict], rows: Sequence[dict]) -> bytes:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, CSV_COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for mean in means:
        writer.writerow({**_csv_values(mean), "kind": "mean", "image": "", "notes": "; ".join(mean["notes"])})
    for row in rows:
        writer.writerow({**_csv_values(row), "kind": "image", "n": 1, "notes": "; ".join(row.get("notes", []))})
    return buffer.getvalue().encode()


def _csv_values(row: dict) -> dict:
    return {k: ("" if v is None else repr(v) if isinstance(v, float) else v) for k, v in row.items()}


def _plot(metric: Metric, means: Sequence[dict], methods: Sequence[str]) -> bytes | None:
    """Rate on x, ``metric`` on y, one curve per method; ``uncompressed`` as a horizontal line. None: no data."""
    series = {}
    for method in methods:
        pts = sorted((m["bpp"], m[metric.name]) for m in means if m["method"] == method and m[metric.name] is not None)
        if pts:
            series[method] = pts
    if not series:
        return None
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.8), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for method, pts in series.items():
        if method == "uncompressed":
            rate, value = pts[0]
            ax.axhline(value, color="black", linestyle="--", linewidth=1,
                       label=f"uncompressed, C(x) (PNG {rate:.2f} bpp)")
        else:
            ax.plot([r for r, _ in pts], [v for _, v in pts], marker="o", label=method)
    ax.set_xlabel("bits per pixel (bpp)")
    ax.set_ylabel(metric.title)
    ax.set_title(f"{metric.title} against rate")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small")
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()


def _bjontegaard_version() -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("bjontegaard")
    except PackageNotFoundError:
        return None


_FORMATS = {"psnr": "{:.2f}", "ms_ssim": "{:.4f}", "feature_mse": "{:.4g}", "feature_cosine": "{:.4f}",
            "accuracy": "{:.3f}", "mllm_agreement": "{:.3f}", "mllm_kl": "{:.4g}"}


def _summary(header, status, skips, failures, means, bd, plots, methods) -> str:
    lines = ["# comneck eval", ""]
    classes = header.get("classes") or []
    labels = (f"{len(classes)} classes; zero-shot accuracy not measured, CLIP is not available (below)"
              if classes and not header.get("clip_model") else
              f"{len(classes)} classes, zero-shot prompt \"{header.get('prompt')}\"" if classes
              else "no class labels (flat folder): zero-shot accuracy not measured")
    ignored = header.get("ignored") or []
    size = header.get("size")
    coded = f"short side resized to {size} (bicubic), centre crop {size} × {size}" if size else "they are (no resize)"
    weights = ", ".join(f"{k} {v}" for k, v in header.get("weights", {}).items())
    lines += [
        f"- data: `{header.get('data')}`, {header.get('images')} images; {labels}",
        *([f"- not evaluated: {len(ignored)} image(s) directly in `{header.get('data')}`, outside the class "
           f"folders: {', '.join(ignored)}"] if ignored else []),
        f"- images coded as: {coded}",
        f"- codec: {header.get('codec')}, qualities {', '.join(map(str, header.get('qualities', [])))}"
        + (f" (weights {weights})" if weights else ""),
        (f"- CLIP: {header.get('clip_model')} / {header.get('clip_tag')}; features: layer {header.get('layer')}, "
         f"`{header.get('select')}`, compared with C(x) of the same pixels" if header.get("clip_model") else
         "- CLIP: not available, so feature metrics and accuracy are not measured (pixel metrics only): "
         + str(header.get("clip_unavailable") or "no tower")),
        *([f"- MLLM: `{header['mllm']['folder']}` (tower {header['mllm']['tower']}), {len(header['mllm']['prompts'])} "
           "prompt(s), greedy answers compared with its answers about the original image; KL(original || "
           "compressed) of the next-token distributions along the original's answer"] if header.get("mllm") else []),
        "- rate: 8 × bytes / pixels of what each method really stores (the whole .cnk record, container included; "
        "whole image files); traditional codecs are bpp-matched to the .cnk record image by image",
        f"- BD-rate: against `{ANCHOR}`, bjontegaard {_bjontegaard_version()} `{BD_METHOD}`; negative = fewer bits "
        "for the same value",
        "",
        "## Methods",
        "",
        "| method | status | points | what |",
        "|---|---|---|---|",
    ]
    for s in status:
        what = s["what"] + (f" ({s['detail']})" if s["detail"] else "")
        state = s["status"] + (" (see below)" if s["status"] != "ok" else "")
        lines.append(f"| {s['name']} | {state} | {', '.join(s['points']) or '–'} | {_md(what)} |")
    if skips:
        lines += ["", "## Skipped", ""]
        lines += [f"- **{s.method}{'' if s.point is None else ' ' + s.point}** skipped: {s.reason}" for s in skips]
    if failures:
        lines += ["", "## Failures", ""] + [f"- {f}" for f in failures]
    columns = list(dict.fromkeys(m["point"] for m in means))
    for metric in METRICS.values():
        if metric.name.startswith("mllm_") and not header.get("mllm"):
            continue  # asked of an MLLM only with --mllm
        if not any(m[metric.name] is not None for m in means):
            lines += ["", f"## {metric.title}", "", "Not measured" + _why_missing(metric, means, header) + "."]
            continue
        lines += ["", f"## {metric.title}", "", "Each cell: mean bpp, mean value "
                  f"({'higher' if metric.higher_is_better else 'lower'} is better).", "",
                  "| method | " + " | ".join(columns) + f" | BD-rate vs {ANCHOR} |",
                  "|---|" + "---|" * (len(columns) + 1)]
        fmt = _FORMATS[metric.name]
        for method in methods:
            rows = {m["point"]: m for m in means if m["method"] == method}
            if not rows:
                continue
            cells = []
            for column in columns:
                m = rows.get(column)
                if m is None:
                    cells.append("")
                else:
                    value = "n/a" if m[metric.name] is None else fmt.format(m[metric.name])
                    cells.append(f"{m['bpp']:.4f} bpp, {value}")
            entry = bd[method][metric.name]
            bd_cell = (f"{entry['value']:+.2f}%" if entry["value"] is not None else
                       "anchor" if entry["reason"] == "anchor" else f"– ({entry['reason']})")
            if entry["value"] is not None and entry["reason"]:
                bd_cell += f" ({entry['reason']})"
            lines.append(f"| {method} | " + " | ".join(cells) + f" | {_md(bd_cell)} |")
        if metric.name in plots:
            lines += ["", f"![{metric.title}]({plots[metric.name]})"]
    notes: dict[str, list[str]] = {}
    for m in means:
        for note in m["notes"]:
            text, _, count = note.rpartition(" (")
            notes.setdefault(text, []).append(f"{m['method']} {m['point']} ({count}")
    if notes:
        lines += ["", "## Notes", ""] + [f"- {text}: {', '.join(where)}" for text, where in notes.items()]
    return "\n".join(lines) + "\n"


def _why_missing(metric: Metric, means, header: dict) -> str:
    """The one true reason a metric has no value anywhere: CLIP missing comes before the data's labels."""
    reasons = {note.split(" (")[0] for m in means for note in m["notes"]}
    if metric.name in ("feature_mse", "feature_cosine", "accuracy") and not header.get("clip_model"):
        return ": CLIP is not available (see the CLIP line above)"
    if metric.name == "accuracy":
        return ": the data has no class labels (class sub-folders)"
    if metric.name == "ms_ssim":
        found = next((r for r in reasons if r.startswith("MS-SSIM")), None)
        return f": {found}" if found else ""
    return ""


def _md(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")
