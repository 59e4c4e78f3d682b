"""Issue #10: how good is the codec shipped in weights/? Rate-PSNR against Pillow JPEG and WebP on held-out photos.

The held-out set is every RGB photograph scikit-image ships (none of them is in the training data, which is the
wallpapers of Debian's mate-backgrounds, gnome-backgrounds, plasma-workspace-wallpapers, lomiri-wallpapers and
ukui-wallpapers): astronaut, chelsea, coffee, hubble_deep_field, ihc,
motorcycle_left, motorcycle_right, retina and rocket, coded at their own size. Synthetic images (chessboard,
color, phantom) and the grayscale ones are left out.

For each method the script sweeps its setting (the learned codec's rate R on a grid, JPEG/WebP quality 1..100)
per image; bpp counts the whole file (the ``.cnk`` record with its container, the JPEG/WebP file with headers)
and PSNR is RGB 8-bit over the whole image. Curves average bpp and PSNR over the images at each setting.
BD-rate (``bjontegaard`` pchip, as ``comneck eval``) compares the curves over 0.2..1.0 bpp: only points in
that range enter (at least four per method), negative = the codec needs fewer bits than the anchor for the
same PSNR.

    python benchmarks/default_codec.py [--weights NAME|FILE] [-o benchmarks/results/default_codec.json]
        [--plot weights/mbt2018-mean-vbr.png] [--card weights/mbt2018-mean-vbr.md] [--tiny]

``--card`` rewrites the model card's results block (between ``CARD_BEGIN`` and ``CARD_END``) from this run, so the
card quotes exactly what was measured. ``--tiny`` (the smoke test) runs a few settings on two small crops.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np

HELD_OUT = ("astronaut.png", "chelsea.png", "coffee.png", "hubble_deep_field.jpg", "ihc.png",
            "motorcycle_left.png", "motorcycle_right.png", "retina.jpg", "rocket.jpg")
CODEC = "mbt2018-mean-vbr"
RATES = tuple(round(1 + 0.25 * i, 2) for i in range(29))  # 1.0, 1.25, ..., 8.0
PIL_QUALITIES = tuple(range(2, 101, 2))
BPP_RANGE = (0.2, 1.0)


def held_out_images(tiny: bool = False) -> dict[str, np.ndarray]:
    import skimage.data

    from comneck_cli.io.images import read_image

    folder = Path(skimage.data.__file__).parent
    names = HELD_OUT[:2] if tiny else HELD_OUT
    images = {name: read_image(folder / name) for name in names}
    return {k: v[:96, :128] for k, v in images.items()} if tiny else images


def sweep_codec(images: dict[str, np.ndarray], weights: str | None, rates) -> list[dict]:
    from comneck_cli import coding as api
    from comneck_cli.codecs import load_codec
    from comneck_cli.eval.metrics import psnr
    from comneck_cli.formats import pack

    codec = load_codec(CODEC, 1, weights=weights)
    rows = []
    for name, image in images.items():
        y = codec.analyze(api.to_tensor(image, 64))  # g_a once per image; each rate only re-codes y
        for rate in rates:
            at = codec.at_rate(rate)
            strings, _ = at.code(y)
            record = api.record_from_strings(image, at, strings, None)
            decoded = api.decode(record, at)
            rows.append({"method": CODEC, "setting": rate, "image": name,
                         "bpp": 8 * len(pack(record)) / (image.shape[0] * image.shape[1]),
                         "psnr": psnr(image, decoded)})
    return rows


def sweep_pillow(images: dict[str, np.ndarray], method: str, qualities) -> list[dict]:
    from comneck_cli.eval.baselines import TRADITIONAL
    from comneck_cli.eval.metrics import psnr

    codec = TRADITIONAL[method]
    rows = []
    for name, image in images.items():
        for quality in qualities:
            data = codec.encode(image, quality)
            rows.append({"method": method, "setting": quality, "image": name,
                         "bpp": 8 * len(data) / (image.shape[0] * image.shape[1]),
                         "psnr": psnr(image, codec.decode(data))})
    return rows


def mean_curve(rows: list[dict]) -> list[tuple[float, float]]:
    """(mean bpp, mean PSNR) per setting, in order of rate."""
    by_setting: dict[float, list[dict]] = {}
    for row in rows:
        by_setting.setdefault(row["setting"], []).append(row)
    points = [(float(np.mean([r["bpp"] for r in group])), float(np.mean([r["psnr"] for r in group])))
              for group in by_setting.values()]
    return sorted(points)


def in_range(curve: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The points inside BPP_RANGE, kept monotone in PSNR (pchip needs a strictly increasing curve)."""
    kept: list[tuple[float, float]] = []
    for bpp, value in curve:
        if BPP_RANGE[0] <= bpp <= BPP_RANGE[1] and (not kept or value > kept[-1][1]):
            kept.append((bpp, value))
    return kept


CARD_BEGIN = "<!-- results: written by benchmarks/default_codec.py --card from its JSON; do not edit by hand -->"
CARD_END = "<!-- /results -->"
CARD_RATES = (1, 2, 3, 4, 5, 6, 7, 8)


def card_results(report: dict) -> str:
    """The model card's results block: BD-rates and the codec's mean points beside JPEG/WebP at the same bpp."""
    curves, n = report["curves"], len(report["held_out"])
    lines = [CARD_BEGIN, "",
             f"Measured {report['date']} with `benchmarks/default_codec.py` on {n} held-out photos "
             f"({report['machine']['cpus']} CPUs, {report['seconds']:.0f} s). BD-rate over "
             f"{report['bpp_range'][0]}–{report['bpp_range'][1]} bpp, PSNR (RGB, 8 bit), whole-file bits; negative "
             "means fewer bits than the anchor for the same PSNR.", "",
             "| anchor | BD-rate of this codec |", "|---|---|"]
    for anchor, result in report["bd_rate"].items():
        value = result["bd_rate_percent"]
        shown = "n/a" if value is None else f"{value:+.1f} %"
        note = f" ({result['note']})" if result["note"] else ""
        lines.append(f"| Pillow {anchor.upper()} | {shown}{note} |")
    lines += ["", "| rate R | mean bpp | PSNR (dB) | JPEG at that bpp | WebP at that bpp |", "|---|---|---|---|---|"]
    by_rate: dict[float, list[dict]] = {}
    for row in report["rows"]:
        if row["method"] == report["codec"] and row["setting"] in CARD_RATES:
            by_rate.setdefault(row["setting"], []).append(row)
    for rate, group in sorted(by_rate.items()):
        bpp, value = float(np.mean([r["bpp"] for r in group])), float(np.mean([r["psnr"] for r in group]))
        anchors = [np.interp(bpp, [p[0] for p in curves[m]], [p[1] for p in curves[m]]) for m in ("jpeg", "webp")]
        lines.append(f"| {rate:g} | {bpp:.3f} | {value:.2f} | {anchors[0]:.2f} | {anchors[1]:.2f} |")
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


def plot(curves: dict[str, list[tuple[float, float]]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.2), dpi=110)
    for name, curve in curves.items():
        points = [p for p in curve if p[0] <= 1.6]
        ax.plot([p[0] for p in points], [p[1] for p in points], marker=".", label=name)
    ax.axvspan(*BPP_RANGE, color="0.92", zorder=0, label="BD-rate range")
    ax.set_xlabel("bits per pixel (whole file)")
    ax.set_ylabel("PSNR (dB, RGB)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", default=None, help="codec FILE or registry NAME (default: the registry's)")
    parser.add_argument("-o", "--output", type=Path, default=Path("benchmarks/results/default_codec.json"))
    parser.add_argument("--plot", type=Path, default=None, help="also write the rate-PSNR plot here (PNG)")
    parser.add_argument("--card", type=Path, default=None, help="rewrite this model card's results block")
    parser.add_argument("--tiny", action="store_true", help="smoke test: two small crops, few settings")
    args = parser.parse_args()

    from comneck_cli.eval.report import bd_rate

    started = time.time()
    images = held_out_images(args.tiny)
    rates = RATES[::7] if args.tiny else RATES
    qualities = PIL_QUALITIES[::10] if args.tiny else PIL_QUALITIES
    rows = sweep_codec(images, args.weights, rates)
    for method in ("jpeg", "webp"):
        rows += sweep_pillow(images, method, qualities)
    methods = (CODEC, "jpeg", "webp")
    curves = {m: mean_curve([r for r in rows if r["method"] == m]) for m in methods}
    bd = {}
    for anchor in ("jpeg", "webp"):
        value, note = bd_rate(in_range(curves[anchor]), in_range(curves[CODEC]), names=(anchor, CODEC), metric="PSNR")
        bd[anchor] = {"bd_rate_percent": value, "note": note}

    print(f"{len(images)} held-out photos, bpp range {BPP_RANGE[0]}-{BPP_RANGE[1]} for BD-rate")
    print(f"{'method':18} {'points in range':>15}  mean curve (bpp, PSNR dB)")
    for m in methods:
        shown = ", ".join(f"({b:.3f}, {p:.2f})" for b, p in in_range(curves[m])[::3])
        print(f"{m:18} {len(in_range(curves[m])):>15}  {shown}")
    for anchor, result in bd.items():
        value = result["bd_rate_percent"]
        print(f"BD-rate of {CODEC} vs {anchor}: {'n/a' if value is None else f'{value:+.1f} %'}"
              f"{'' if not result['note'] else '  (' + result['note'] + ')'}")

    from comneck_cli.codecs import load_codec
    from comneck_cli.weights import file_sha256

    source = load_codec(CODEC, 1, weights=args.weights).source
    report = {
        "codec": CODEC, "weights": str(source), "sha256": file_sha256(Path(source)), "held_out": list(images),
        "bpp_range": BPP_RANGE, "bd_rate": bd, "curves": curves, "rows": rows,
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
        "seconds": round(time.time() - started, 1), "date": time.strftime("%Y-%m-%d %H:%M"),
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=1))
    if args.plot:
        plot(curves, args.plot, f"{CODEC} (shipped) vs Pillow, {len(images)} held-out scikit-image photos")
    if args.card:
        write_card(args.card, card_results(report))
    print(f"wrote {args.output}" + "".join(f" and {p}" for p in (args.plot, args.card) if p))


if __name__ == "__main__":
    main()
