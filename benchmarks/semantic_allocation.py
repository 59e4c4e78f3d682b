"""Issue #21 item 3: at equal bpp, does ``comneck encode --semantic`` bring the MLLM's CLIP features closer to C(x)?

``--semantic`` (CoTAM, SPEC §7.1) spends the variable-rate codec's bits where a shallow CLIP block's attention
points: g(i, j) = g_R · 2^(S·(m(i, j) − m̄)). This codes each photo at every rate R of the grid twice with the
library's own path (one g_a pass; ``code_semantic`` for the guided record; whole packed ``.cnk`` records, the
importance-map section included, are what bpp counts; each record is unpacked and decoded as ``comneck decode``
does): plain, and guided by the map of the same CLIP C at strength S. On the decoded image x̂ and the original x
it measures, with that C and the MLLM's view of an image (``FeatureExtractor``: open_clip's eval transform, the
centre square; with ``--pad-to-square`` LLaVA-1.5's, the whole photo on a square of CLIP's mean colour):

- the final image embedding (``encode_image``): MSE and cosine distance 1 − cos(C(x̂), C(x));
- the patch tokens of hidden state −2 (what LLaVA reads): MSE;
- PSNR (RGB 8-bit), what people see.

Per photo the two curves are compared at equal bpp: each metric is interpolated over log10(bpp) (pchip, the
``bjontegaard`` package ``comneck eval``'s BD-rate uses) and the difference semantic − plain is averaged over the
bpp range both curves cover (BD-PSNR's construction; negative feature differences mean the semantic records are
closer to C(x)); BD-rate on PSNR says what the guidance costs people (positive: more bits for the same PSNR).
Over the photos: the mean of each difference and on how many photos semantic wins.

    python benchmarks/semantic_allocation.py [--photos DIR] [--limit N] [--max-side S] [--weights FILE]
        [--clip-model ViT-L-14 --clip-tag openai | --clip-weights FILE | --random-clip SEED] [--rates 1,2,...,8]
        [--strength S] [--guide attention|saliency|view] [-o benchmarks/results/semantic_allocation.json]
        [--plot FILE.png]

Two questions hide in "does it help": does the codec spend bits where a map says (the variable-rate codec coding at a
gain map, what ``--gain-maps`` training teaches), and does CLIP attention point where C's features are sensitive.
``--guide attention`` (default) answers both at once, as ``comneck encode --semantic`` codes. ``--guide saliency``
separates the first: the map is an oracle, not something the encoder could send cheaply — how strongly C's layer
``LAYER`` patch tokens respond to each pixel (:func:`saliency`), through the measurement's own view of the image — so
a loss there says the codec's allocation does not work even when the map is right, and a gain says what a good map
is worth. With random CLIP weights (no attention semantics) only the saliency guide is meaningful. ``--guide view``
is its control: the oracle also knows which part of a non-square photo C's centre crop never sees, and a map that
is 1 on the crop and 0 outside (:func:`view_map`) measures how much of the gain is that geometry alone.

Photos: the unseen evaluation set (``benchmarks/evalset.py`` assembles it) or ``--photos DIR``, optionally
downscaled (Lanczos) to ``--max-side`` to bound the CPU time. ``--random-clip SEED`` builds the CLIP architecture
with seeded random weights: its attention maps carry no semantics and its features are no MLLM's, so such a run
checks the script and says nothing about a real MLLM (the table, the JSON and the plot say so).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

import default_codec  # benchmarks/default_codec.py, beside this script: the codec, its rates, report paths
import evalset

if TYPE_CHECKING:  # torch and open_clip load inside main(): --help stays quick
    from torch import Tensor, nn

    from comneck_cli.codecs import Codec
    from comneck_cli.coding.semantic import Guide
    from comneck_cli.features import FeatureExtractor

LAYER = -2  # LLaVA's hidden state
MIN_POINTS = 2  # pchip needs a segment per curve
METHODS = ("plain", "semantic")
GUIDES = {
    "attention": "CLIP attention at block 2, as `comneck encode --semantic` codes",
    "saliency": f"oracle: the sensitivity of C's layer {LAYER} patch tokens to each pixel (not an encoder's map)",
    "view": "control: 1 where C's centre crop sees the image, 0 elsewhere (its geometry, none of its content)",
}
# name: (title, which way is better); the first three are compared against C(x)
METRICS = {
    "embedding_mse": ("final image embedding MSE vs C(x)", "lower"),
    "embedding_cosine_distance": ("final image embedding cosine distance vs C(x)", "lower"),
    "patch_mse": (f"layer {LAYER} patch tokens MSE vs C(x)", "lower"),
    "psnr": ("PSNR (dB, RGB)", "higher"),
}
RANDOM_WARNING = ("RANDOM CLIP: the CLIP has seeded random weights (--random-clip); its attention maps carry no "
                  "semantics and its features are no MLLM's, so these numbers check the script and say nothing "
                  "about a real MLLM")


def portable(path: Path) -> str:
    """A path as the report names it: relative to the repository inside it, else only its name (no machine's
    paths; the sha256 beside it says which file it was)."""
    name = default_codec._repo_relative(path)
    return Path(name).name if Path(name).is_absolute() else name


def downscale(image: np.ndarray, max_side: int | None) -> np.ndarray:
    """``image`` with its longer side brought down to ``max_side`` (Lanczos, aspect kept); smaller ones as they are."""
    from PIL import Image

    height, width = image.shape[:2]
    if max_side is None or max(height, width) <= max_side:
        return image
    scale = max_side / max(height, width)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return np.asarray(Image.fromarray(image).resize(size, Image.LANCZOS))


def load_photos(folder: Path | None, limit: int | None, max_side: int | None) -> tuple[dict[str, np.ndarray], str]:
    """(name -> uint8 H×W×3, the set's description): ``folder``'s images, else the unseen evaluation set."""
    if folder is None:
        listing = evalset.read_listing()
        images = evalset.load_photos(listing={**listing, "photos": listing["photos"][:limit]})  # only those used
        described = "the unseen evaluation set (`benchmarks/evalset/`)"
    else:
        from comneck_cli.eval.data import find_images
        from comneck_cli.io.images import read_image

        images = {item.id: read_image(item.path) for item in find_images(folder, limit=limit).items}
        described = f"the images in {portable(folder)}/"
    names = list(images)[:limit]
    return {name: downscale(images[name], max_side) for name in names}, described


def load_clip(model: str, tag: str | None, weights: Path | None, random_seed: int | None) -> "nn.Module":
    """C: seeded random weights of ``model``'s architecture, or resolved as every comneck command resolves it."""
    import torch

    from comneck_cli.clip import tower

    if random_seed is None:
        return tower.resolve_clip(model, tag, weights)
    torch.manual_seed(random_seed)
    return tower.load_clip(model, None)  # open_clip.create_model(pretrained=None): the seeded initialisation


def clip_features(extractor: "FeatureExtractor", images: list[np.ndarray]) -> tuple["Tensor", "Tensor"]:
    """(final embeddings (B, D), hidden state ``LAYER``'s patch tokens (B, P, width)) of C in one pass."""
    import torch

    with torch.inference_mode():
        x = torch.stack([extractor.preprocess(image) for image in images]).to(extractor.device)
        out = extractor.tail(extractor.head(x), layer=LAYER, embedding=True)
        return out.embedding.float().cpu(), out.select(LAYER, "patch").float().cpu()


def clip_view(x: "Tensor", size: tuple[int, int]) -> "Tensor":
    """(1, 3, H, W) in [0, 1] -> the centre square C sees, resized to ``size``, differentiably.

    The geometry of open_clip's eval transform (``FeatureExtractor.preprocess``: shortest side to the input size,
    bicubic with antialiasing, centre crop); pixels outside the crop get no gradient, as they get no attention from
    the measurement."""
    import torch.nn.functional as F

    height, width = x.shape[-2:]
    scale = size[0] / min(height, width)
    resized = (max(size[0], round(height * scale)), max(size[1], round(width * scale)))
    x = F.interpolate(x, size=resized, mode="bicubic", align_corners=False, antialias=True)
    top, left = (resized[0] - size[0]) // 2, (resized[1] - size[1]) // 2
    return x[..., top : top + size[0], left : left + size[1]]


def saliency(image: np.ndarray, extractor: "FeatureExtractor", strength: float, probes: int = 4,
             seed: int = 0) -> np.ndarray:
    """Oracle importance on the codec's y grid: how much C's layer ``LAYER`` patch tokens move per pixel.

    The per-pixel sensitivity s(p) = E_v Σ_c (∂(v · f(x)) / ∂x_{p,c})², v Rademacher (``probes`` of them, seeded), is
    the diagonal of JᵀJ summed over colour: the feature error a small pixel error at p causes. Summed over each
    16×16 block of the padded image it is the weight w of that y position in the feature error. High-rate theory
    gives the step sizes that minimise Σ w·D at a fixed rate: D ∝ 1/w, so the gain goes as √w, log2 g = ½ log2 w +
    const. ``--semantic`` sets log2 g = log2 g_R + S·(m − m̄) with m in [0, 1], so m = 1 + (log2 w − top) / (2S),
    clipped to [0, 1], ``top`` the 95th percentile of log2 w over the blocks C sees: the ½-power law over the top
    2S octaves of w, the rest at 0. Blocks C never sees come out 0. The form ``Guide.importance`` returns, so the
    same ``quantise`` writes the record's map.
    """
    import torch

    from comneck_cli.clip.presets import expand_to_square, mean_colour
    from comneck_cli.clip.preprocess import ClipPreprocess
    from comneck_cli.coding.semantic import Y_STRIDE
    from comneck_cli.formats import PAD_MULTIPLE
    from comneck_cli.io.images import pad_amounts

    height, width = image.shape[:2]
    prep = ClipPreprocess(extractor.clip)  # C's input size, mean and std
    seen_image = expand_to_square(image, mean_colour(prep.cfg.mean)) if extractor.pad_to_square else image
    row, col = (seen_image.shape[0] - height) // 2, (seen_image.shape[1] - width) // 2  # expand2square's offsets
    x = torch.from_numpy(np.array(seen_image, dtype=np.float32) / 255).permute(2, 0, 1)[None].requires_grad_(True)
    patches = extractor.tail(extractor.head((clip_view(x, prep.size) - prep.mean) / prep.std), layer=LAYER,
                             embedding=False).select(LAYER, "patch")
    generator = torch.Generator().manual_seed(seed)
    sensitivity = torch.zeros(height, width, dtype=torch.float64)
    for probe in range(probes):
        v = torch.randint(0, 2, patches.shape, generator=generator).float().mul(2).sub(1)
        (grad,) = torch.autograd.grad((patches * v).sum(), x, retain_graph=probe < probes - 1)
        sensitivity += grad[0, :, row : row + height, col : col + width].double().pow(2).sum(0) / probes
    left, right, top, bottom = pad_amounts(height, width, PAD_MULTIPLE)
    padded = np.zeros((height + top + bottom, width + left + right))
    padded[top : top + height, left : left + width] = sensitivity.numpy()
    grid = padded.reshape(padded.shape[0] // Y_STRIDE, Y_STRIDE, padded.shape[1] // Y_STRIDE, Y_STRIDE).sum((1, 3))
    seen, importance = grid > 0, np.zeros_like(grid)
    if seen.any() and strength > 0:
        logs = np.log2(grid[seen])
        importance[seen] = np.clip(1 + (logs - np.percentile(logs, 95)) / (2 * strength), 0, 1)
    return importance


def view_map(height: int, width: int) -> np.ndarray:
    """The control for the saliency oracle: 1 on the y positions whose 16×16 block's centre lies in the square C's
    eval transform keeps (the centred min(H, W) square), 0 elsewhere and on the padding. On a non-square photo part
    of the oracle's gain is only this: bits moved from what C never sees to what it does."""
    from comneck_cli.coding.semantic import Y_STRIDE
    from comneck_cli.formats import PAD_MULTIPLE, latent_grids
    from comneck_cli.io.images import pad_amounts

    (rows, cols), _ = latent_grids(height, width)
    left, _, top, _ = pad_amounts(height, width, PAD_MULTIPLE)
    side = min(height, width)
    first_row, first_col = (height - side) // 2, (width - side) // 2
    centres_y = np.arange(rows) * Y_STRIDE + Y_STRIDE / 2 - top  # in image pixels
    centres_x = np.arange(cols) * Y_STRIDE + Y_STRIDE / 2 - left
    inside_y = (centres_y >= first_row) & (centres_y < first_row + side)
    inside_x = (centres_x >= first_col) & (centres_x < first_col + side)
    return np.outer(inside_y, inside_x).astype(np.float64)


def importance_map(image: np.ndarray, guide_kind: str, guide: "Guide", extractor: "FeatureExtractor",
                   strength: float):
    """The record's importance map: ``comneck encode --semantic``'s (CLIP attention), the saliency oracle's, or the
    view control's."""
    from comneck_cli.coding.semantic import quantise, semantic_map

    if guide_kind == "attention":
        return semantic_map(image, guide, strength)
    if guide_kind == "view":
        return quantise(view_map(*image.shape[:2]), *image.shape[:2], strength)
    return quantise(saliency(image, extractor, strength), *image.shape[:2], strength)


def sweep(name: str, image: np.ndarray, codec: "Codec", guide: "Guide", extractor: "FeatureExtractor",
          rates: tuple[float, ...], strength: float, guide_kind: str = "attention") -> list[dict]:
    """One row per (method, rate): bpp of the packed record and the metrics of its decoded image against x."""
    from comneck_cli import coding as api
    from comneck_cli.eval.metrics import feature_fidelity, psnr
    from comneck_cli.formats import PAD_MULTIPLE, pack, unpack

    y = codec.analyze(api.to_tensor(image, PAD_MULTIPLE))  # g_a once; every record re-codes the same y
    importance = importance_map(image, guide_kind, guide, extractor, strength)  # depends on x and S, not on R
    rows, decoded = [], []
    for rate in rates:
        at = codec.at_rate(rate)
        for method in METHODS:
            record = (api.code_semantic(image, at, y, importance) if method == "semantic"
                      else api.record_from_strings(image, at, at.code(y)[0]))
            data = pack(record)
            decoded.append(api.decode(unpack(data), at))
            rows.append({"image": name, "method": method, "rate": rate,
                         "bpp": 8 * len(data) / (image.shape[0] * image.shape[1]), "psnr": psnr(image, decoded[-1])})
    (reference_embedding,), (reference_patches,) = clip_features(extractor, [image])
    embeddings, patches = clip_features(extractor, decoded)
    for row, embedding, patch in zip(rows, embeddings, patches):
        mse, cosine, _ = feature_fidelity(embedding, reference_embedding)
        row.update(embedding_mse=mse, embedding_cosine_distance=1 - cosine,
                   patch_mse=feature_fidelity(patch, reference_patches)[0])
    return rows


def equal_bpp_difference(plain: list[tuple[float, float]], semantic: list[tuple[float, float]]) -> dict:
    """Mean of semantic − plain of one metric at equal bpp, over the bpp range both curves cover.

    Each curve, (bpp, value) points, is interpolated over log10(bpp) (pchip) and the difference of the integrals
    over the shared range is divided by its length (``bjontegaard.bd_psnr``, which does exactly that). ``relative``
    divides by plain's mean over that range. None, with the reason, when a curve has fewer than ``MIN_POINTS``
    usable points, two at one bpp, or the curves share no bpp.
    """
    import bjontegaard

    from comneck_cli.eval.report import BD_METHOD

    curves = []
    for name, points in zip(METHODS, (plain, semantic)):
        points = sorted((b, v) for b, v in points if v is not None and math.isfinite(v))
        if len(points) < MIN_POINTS:
            return {"difference": None, "relative": None, "bpp_range": None,
                    "note": f"{name} has {len(points)} usable points; needs {MIN_POINTS}"}
        if any(b1 <= b0 for (b0, _), (b1, _) in zip(points, points[1:])):
            return {"difference": None, "relative": None, "bpp_range": None,
                    "note": f"{name} has two points at one bpp"}
        curves.append([np.array(axis, dtype=np.float64) for axis in zip(*points)])
    (bpp_p, value_p), (bpp_s, value_s) = curves
    low, high = max(bpp_p[0], bpp_s[0]), min(bpp_p[-1], bpp_s[-1])
    if not low < high:
        return {"difference": None, "relative": None, "bpp_range": None, "note": "the curves share no bpp"}
    difference, f_plain, _ = bjontegaard.bd_psnr(bpp_p, value_p, bpp_s, value_s, method=BD_METHOD,
                                                 require_matching_points=False, interpolators=True, min_overlap=0)
    plain_mean = f_plain.integrate(math.log10(low), math.log10(high)) / (math.log10(high) - math.log10(low))
    return {"difference": float(difference), "relative": float(difference / plain_mean) if plain_mean else None,
            "bpp_range": [float(low), float(high)], "note": None}


def compare(rows: list[dict]) -> dict:
    """One photo's curves compared: every metric's equal-bpp difference and BD-rate on PSNR (semantic vs plain)."""
    from comneck_cli.eval.report import bd_rate

    curves = {m: [r for r in rows if r["method"] == m] for m in METHODS}
    result = {metric: equal_bpp_difference(*([(r["bpp"], r[metric]) for r in curves[m]] for m in METHODS))
              for metric in METRICS}
    percent, note = bd_rate([(r["bpp"], r["psnr"]) for r in curves["plain"]],
                            [(r["bpp"], r["psnr"]) for r in curves["semantic"]], names=METHODS, metric="PSNR")
    result["bd_rate_psnr"] = {"percent": percent, "note": note}
    return result


def summarise(per_photo: dict[str, dict]) -> dict:
    """Over the photos: mean difference (and relative difference) per metric, and how many photos semantic wins.

    A win is a difference on the better side (``METRICS``): lower feature error, higher PSNR; for BD-rate on PSNR,
    fewer bits (below 0 %)."""
    summary = {}
    for metric, (_, better) in METRICS.items():
        values = [p[metric]["difference"] for p in per_photo.values() if p[metric]["difference"] is not None]
        relative = [p[metric]["relative"] for p in per_photo.values() if p[metric]["relative"] is not None]
        sign = -1 if better == "lower" else 1
        summary[metric] = {"mean_difference": float(np.mean(values)) if values else None,
                           "mean_relative": float(np.mean(relative)) if relative else None,
                           "semantic_wins": sum(sign * v > 0 for v in values), "photos": len(values)}
    percents = [p["bd_rate_psnr"]["percent"] for p in per_photo.values() if p["bd_rate_psnr"]["percent"] is not None]
    summary["bd_rate_psnr"] = {"mean_percent": float(np.mean(percents)) if percents else None,
                               "semantic_wins": sum(v < 0 for v in percents), "photos": len(percents)}
    return summary


def mean_curves(rows: list[dict]) -> dict[str, list[dict]]:
    """Per method, per rate: bpp and every metric averaged over the photos."""
    curves = {}
    for method in METHODS:
        points = []
        for rate in sorted({r["rate"] for r in rows}):
            group = [r for r in rows if r["method"] == method and r["rate"] == rate]
            points.append({"rate": rate, **{key: float(np.mean([r[key] for r in group]))
                                            for key in ("bpp", *METRICS)}})
        curves[method] = points
    return curves


def _number(value: float | None, form: str) -> str:
    return "n/a" if value is None else format(value, form)


def _percent(value: float | None) -> str:
    return "n/a" if value is None else f"{value:+.1f} %"


def print_table(report: dict) -> None:
    warning = report["warning"]
    if warning:
        print(f"*** {warning} ***")
    print(f"{len(report['photos'])} photos of {report['photo_set']}; {report['codec']} at R = "
          f"{', '.join(f'{r:g}' for r in report['rates'])}; --semantic strength {report['strength']:g}; "
          f"CLIP {report['clip']['model']} seeing {report['clip_view']}; map: {report['guide_meaning']}")
    short = {"embedding_mse": "Δ emb MSE", "embedding_cosine_distance": "Δ emb cos-dist",
             "patch_mse": f"Δ L{LAYER} patch MSE", "psnr": "Δ PSNR dB"}
    print("equal-bpp differences, semantic − plain (features: negative = closer to C(x)); BD-rate on PSNR")
    print(f"{'photo':28}" + "".join(f"{short[m]:>18}" for m in METRICS) + f"{'BD-rate PSNR':>14}")
    for name, result in report["per_photo"].items():
        print(f"{name[:28]:28}" + "".join(f"{_number(result[m]['difference'], '+.4g'):>18}" for m in METRICS)
              + f"{_percent(result['bd_rate_psnr']['percent']):>14}")
    summary = report["summary"]
    print(f"{'mean':28}" + "".join(f"{_number(summary[m]['mean_difference'], '+.4g'):>18}" for m in METRICS)
          + f"{_percent(summary['bd_rate_psnr']['mean_percent']):>14}")
    print(f"{'mean relative':28}" + "".join(f"{_number(summary[m]['mean_relative'], '+.2%'):>18}" for m in METRICS))
    wins = {m: f"{summary[m]['semantic_wins']} of {summary[m]['photos']}" for m in (*METRICS, "bd_rate_psnr")}
    print(f"{'semantic wins (photos)':28}" + "".join(f"{wins[m]:>18}" for m in METRICS) + f"{wins['bd_rate_psnr']:>14}")
    print("mean curves:  R | method   | bpp    | PSNR  | emb MSE    | emb cos-dist | patch MSE")
    for method, points in report["curves"].items():
        for p in points:
            print(f"{p['rate']:>15g} | {method:8} | {p['bpp']:.4f} | {p['psnr']:.2f} | {p['embedding_mse']:.4e} | "
                  f"{p['embedding_cosine_distance']:.4e}   | {p['patch_mse']:.4e}")
    if warning:
        print(f"*** {warning} ***")


def plot(report: dict, path: Path) -> None:
    """Feature MSE against bpp, plain and semantic (means over the photos): layer −2 patch tokens, final embedding."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4.2), dpi=110)
    for ax, metric in zip(axes, ("patch_mse", "embedding_mse")):
        for method, points in report["curves"].items():
            ax.plot([p["bpp"] for p in points], [p[metric] for p in points], marker=".", label=method)
        ax.set_xscale("log")
        ax.set_xlabel("bits per pixel (whole .cnk record)")
        ax.set_ylabel(METRICS[metric][0])
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    title = (f"{report['codec']}, --semantic S={report['strength']:g} ({report['guide']} map) vs plain, "
             f"{len(report['photos'])} photos, CLIP {report['clip']['model']}")
    if report["warning"]:
        import textwrap

        fig.suptitle(f"{title}\n" + textwrap.fill(report["warning"], 120), fontsize=8, color="red", fontweight="bold")
    else:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 0.9 if report["warning"] else 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def _rates(text: str) -> tuple[float, ...]:
    return tuple(float(part) for part in text.split(","))


def main(argv: list[str] | None = None) -> None:
    from comneck_cli.coding.semantic import DEFAULT_BLOCK, DEFAULT_STRENGTH

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--photos", type=Path, default=None, help="a folder of images (default: the unseen set)")
    parser.add_argument("--limit", type=int, default=None, help="only the first N photos")
    parser.add_argument("--max-side", type=int, default=None, help="downscale (Lanczos) longer sides to S pixels")
    parser.add_argument("--weights", type=Path, default=None,
                        help=f"a {default_codec.CODEC} codec file (default: the shipped one)")
    parser.add_argument("--clip-model", default="ViT-L-14", help="open_clip model: C and the semantic guide")
    parser.add_argument("--clip-tag", default="openai", help="open_clip weights tag for --clip-model")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--clip-weights", type=Path, default=None, help="local CLIP weights file (or registry name)")
    source.add_argument("--random-clip", type=int, default=None, metavar="SEED",
                        help="seeded random CLIP weights: checks the script only, says nothing about an MLLM")
    parser.add_argument("--rates", type=_rates, default=default_codec.RATES, help="rates R, comma-separated")
    parser.add_argument("--strength", type=float, default=DEFAULT_STRENGTH, help="--semantic-strength S")
    parser.add_argument("--guide", choices=GUIDES, default="attention",
                        help="the map: CLIP attention (comneck encode --semantic), the saliency oracle, its control")
    parser.add_argument("--pad-to-square", action="store_true",
                        help="C sees the whole photo on a square of its mean colour (LLaVA-1.5), not the centre crop")
    parser.add_argument("-o", "--output", type=Path, default=Path("benchmarks/results/semantic_allocation.json"))
    parser.add_argument("--plot", type=Path, default=None, help="also write feature MSE vs bpp here (PNG)")
    args = parser.parse_args(argv)
    if args.guide == "view" and args.pad_to_square:
        parser.error("--guide view with --pad-to-square is plain coding: padded, C sees the whole photo")

    import torch

    from comneck_cli.codecs import load_codec
    from comneck_cli.coding.semantic import Guide
    from comneck_cli.errors import ComneckError
    from comneck_cli.features import FeatureExtractor
    from comneck_cli.weights import file_sha256

    started = time.time()
    try:
        images, photo_set = load_photos(args.photos, args.limit, args.max_side)
    except (evalset.EvalsetError, ComneckError) as exc:
        sys.exit(f"semantic_allocation: {exc}")
    try:
        clip = load_clip(args.clip_model, args.clip_tag, args.clip_weights, args.random_clip)
    except ComneckError as exc:
        sys.exit(f"semantic_allocation: {exc.render(lambda p: '--' + p.replace('_', '-'))}; or pass --clip-weights "
                 "FILE, or --random-clip SEED to check the script with random weights")
    warning = RANDOM_WARNING if args.random_clip is not None else None
    if warning:
        print(f"*** {warning} ***", file=sys.stderr)
    codec = load_codec(default_codec.CODEC, 1, weights=args.weights)
    guide = Guide(clip, block=DEFAULT_BLOCK)
    extractor = FeatureExtractor(clip=clip, k=0, device=torch.device("cpu"), clip_model=args.clip_model,
                                 clip_tag=args.clip_tag, pad_to_square=args.pad_to_square)
    rows, per_photo = [], {}
    for name, image in images.items():
        print(f"{name} {image.shape[1]}×{image.shape[0]}", file=sys.stderr, flush=True)
        photo_rows = sweep(name, image, codec, guide, extractor, args.rates, args.strength, args.guide)
        rows += photo_rows
        per_photo[name] = compare(photo_rows)

    given = None if args.random_clip is not None else args.clip_weights  # a file, or a registered name
    clip_file = given if given is not None and given.is_file() else None
    report = {
        "issue": "#21 item 3: does --semantic bring the decoded image's CLIP features closer to C(x) at equal bpp?",
        "warning": warning,
        "codec": default_codec.CODEC, "weights": portable(Path(codec.source)),
        "sha256": file_sha256(Path(codec.source)),
        "clip": {"model": args.clip_model, "tag": None if args.random_clip is not None else args.clip_tag,
                 "weights": None if clip_file is None else portable(clip_file),
                 "weights_sha256": None if clip_file is None else file_sha256(clip_file),
                 "registry_name": str(given) if given is not None and clip_file is None else None,
                 "random_seed": args.random_clip, "guide_block": DEFAULT_BLOCK, "feature_layer": LAYER},
        "photo_set": photo_set, "photos": list(images),
        "evalset_listing_sha256": file_sha256(evalset.LISTING) if args.photos is None else None,
        "sizes": {name: list(image.shape[:2]) for name, image in images.items()}, "max_side": args.max_side,
        "rates": list(args.rates), "strength": args.strength, "guide": args.guide, "guide_meaning": GUIDES[args.guide],
        "clip_view": "the photo centred on a square of CLIP's mean colour (LLaVA-1.5)" if args.pad_to_square
        else "open_clip's eval transform: the centre square",
        "metrics": {name: {"title": title, "better": better} for name, (title, better) in METRICS.items()},
        "comparison": "per photo, semantic − plain at equal bpp: pchip over log10(bpp), averaged over the bpp range "
                      "both curves cover (bjontegaard.bd_psnr); BD-rate on PSNR: comneck eval's bd_rate",
        "summary": summarise(per_photo), "per_photo": per_photo, "curves": mean_curves(rows), "rows": rows,
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads()},
        "seconds": round(time.time() - started, 1), "date": time.strftime("%Y-%m-%d %H:%M"),
    }
    print_table(report)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=1))
    if args.plot:
        plot(report, args.plot)
    print(f"wrote {args.output}" + (f" and {args.plot}" if args.plot else ""))


if __name__ == "__main__":
    main()
