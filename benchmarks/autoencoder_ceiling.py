"""How high can a variable-rate codec's transforms go? PSNR of g_s(g_a(x)) without quantisation, beside each level.

The vbr gains cancel without quantisation (y_hat = round((y - mu)·g)/g + mu -> y), so g_s(g_a(x)) is the ceiling
every rate of the codec stays under: if it is low, no rate can be high, whatever the entropy model does. Run it on
a codec file or on a training checkpoint while a run goes on (issue #19)::

    python benchmarks/autoencoder_ceiling.py weights/mbt2018-mean-vbr.safetensors --photos DIR [--json out.json]

Each level's PSNR and bpp are the model's own forward pass in eval mode (rounding, likelihoods), not a coded
record: close to `comneck encode` but quicker. Prints a table; writes JSON with --json.

``--pca 192,320`` adds a linear reference for the latent width M: the PSNR of the best linear transform that keeps
M coefficients per 16×16 RGB block (the codec's stride; y has M channels per block), i.e. the top M principal
components of the photos' own blocks, unquantised. A learned g_a/g_s can beat it, but it says how much room a
width leaves: a ceiling far below the M = 320 reference and near the M = 192 one asks for a wider codec.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

SUFFIXES = (".png", ".jpg", ".jpeg", ".ppm", ".tif", ".tiff", ".webp")


def load_net(path: Path) -> torch.nn.Module:
    """The codec network of a comneck codec file (.safetensors) or of a `comneck train codec` checkpoint.pt, of
    whichever variable-rate architecture it names (mbt2018-mean-vbr, lapped-pca-vbr)."""
    from comneck_cli.codecs import get_spec

    if path.suffix == ".pt":
        state = torch.load(path, map_location="cpu", weights_only=True)
        config, weights, codec = state["model_config"], state["model"], state["config"]["codec"]
    else:
        from safetensors import safe_open
        from safetensors.torch import load_file

        with safe_open(str(path), "pt") as f:
            meta = f.metadata()
        config, codec = json.loads(meta.get("config", "{}")), meta.get("codec", "mbt2018-mean-vbr")
        weights = load_file(str(path))
    net = get_spec(codec).constructor()(**config)
    net.load_state_dict({k: v.float() for k, v in weights.items()}, strict=False)
    return net.eval()


def photos(folder: Path, max_side: int) -> list[tuple[str, torch.Tensor]]:
    found = []
    for file in sorted(p for p in folder.rglob("*") if p.suffix.lower() in SUFFIXES):
        image = Image.open(file).convert("RGB")
        if max(image.size) > max_side:
            scale = max_side / max(image.size)
            image = image.resize((round(image.width * scale), round(image.height * scale)), Image.LANCZOS)
        found.append((file.name, torch.from_numpy(np.array(image)).permute(2, 0, 1).float().div(255)[None]))
    return found


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = F.mse_loss(a.clamp(0, 1).mul(255).round(), b.mul(255).round()).item()
    return 10 * math.log10(255**2 / mse) if mse > 0 else float("inf")


@torch.no_grad()
def measure(net: torch.nn.Module, images: list[tuple[str, torch.Tensor]]) -> dict:
    rows = []
    for name, x in images:
        h, w = x.shape[-2:]
        ph, pw = -h % 64, -w % 64
        xp = F.pad(x, (0, pw, 0, ph), mode="replicate")
        row = {"photo": name, "pixels": h * w, "ceiling": psnr(net.g_s(net.g_a(xp))[..., :h, :w], x), "levels": []}
        for level in range(net.levels):
            out = net(xp, stage=2, s=level)
            bits = sum(-torch.log2(v).sum().item() for v in out["likelihoods"].values())
            row["levels"].append({"bpp": bits / (h * w), "psnr": psnr(out["x_hat"][..., :h, :w], x)})
        rows.append(row)
    levels = [{"bpp": float(np.mean([r["levels"][i]["bpp"] for r in rows])),
               "psnr": float(np.mean([r["levels"][i]["psnr"] for r in rows]))} for i in range(net.levels)]
    return {"photos": rows, "ceiling": float(np.mean([r["ceiling"] for r in rows])), "levels": levels}


def _blocks(x: torch.Tensor, stride: int) -> np.ndarray:
    """(1, 3, H, W) -> (blocks, stride²·3): the whole stride×stride blocks, row-major, HWC inside a block."""
    image = x[0].permute(1, 2, 0).double().numpy()
    h, w = image.shape[0] // stride * stride, image.shape[1] // stride * stride
    blocks = image[:h, :w].reshape(h // stride, stride, w // stride, stride, 3).transpose(0, 2, 1, 3, 4)
    return blocks.reshape(-1, stride * stride * 3)


def linear_reference(images: list[tuple[str, torch.Tensor]], widths: list[int], stride: int = 16) -> dict[int, float]:
    """Mean PSNR per width M of each photo's whole blocks projected on the top M principal components of all the
    photos' blocks (fitted on the photos measured: the best a linear block transform of width M does on them)."""
    data = np.concatenate([_blocks(x, stride) for _, x in images])
    mean = data.mean(axis=0)
    _, vectors = np.linalg.eigh(np.cov((data - mean).T))
    vectors = vectors[:, ::-1]  # descending variance
    result = {}
    for width in widths:
        basis = vectors[:, :width]
        values = []
        for _, x in images:
            blocks = _blocks(x, stride)
            restored = torch.from_numpy((blocks - mean) @ basis @ basis.T + mean)
            values.append(psnr(restored, torch.from_numpy(blocks)))
        result[width] = float(np.mean(values))
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", type=Path, help="codec .safetensors or training checkpoint.pt")
    parser.add_argument("--photos", type=Path, required=True, help="folder of photos (searched recursively)")
    parser.add_argument("--max-side", type=int, default=768, help="downscale larger photos to this long side")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--pca", type=lambda t: [int(v) for v in t.split(",")], default=[],
                        help="latent widths M for the linear reference, comma-separated (e.g. 192,320)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    images = photos(args.photos, args.max_side)
    result = measure(load_net(args.model), images)
    result["linear_reference"] = {str(m): v for m, v in linear_reference(images, args.pca).items()}
    result.update(model=str(args.model), seconds=round(time.perf_counter() - start, 1))
    print(f"{args.model}: {len(result['photos'])} photos, ceiling g_s(g_a(x)) {result['ceiling']:.2f} dB")
    for width, value in result["linear_reference"].items():
        print(f"linear reference, top {width} principal components per 16×16 block: {value:.2f} dB")
    print("level  bpp    PSNR")
    for i, level in enumerate(result["levels"], 1):
        print(f"{i:>5}  {level['bpp']:.3f}  {level['psnr']:.2f}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
