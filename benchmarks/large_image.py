"""Peak memory of `comneck encode` (plain and --semantic, CoTAM's hierarchical guidance; issue #6) and of
`comneck decode` (issue #22: g_s runs in tiles) on a large photo.

A W×H photo (default 4000×3000) is made by a Lanczos upscale of scikit-image's astronaut, written as PNG, and
encoded by the real CLI in a fresh process per configuration, so each peak RSS (``ru_maxrss`` of the child) is that
run's own. Models are full size with random weights (timing and memory only; the bytes mean nothing):
mbt2018-mean-vbr N=192, M=320 and an open_clip ViT (default ViT-B-16) saved to a file. The guidance reads the whole
image resized to the CLIP input (global map) and CLIP-sized tiles at full resolution, ``tile_batch`` at a time
(local maps), so its memory does not grow with the image. With ``--decode`` the plain record is decoded back to a
PNG. g_a and g_s run in 1024² tiles, so what grows with the image is a few whole-image buffers (pixels, y, the
entropy coder's symbols); run two sizes and extrapolate to the largest the limits admit (README, "Reliability").

    python benchmarks/large_image.py [--size 4000x3000] [--clip ViT-B-16] [--plain] [--decode] [--no-semantic]
                                     [-o benchmarks/results/large_image.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def prepare(workdir: Path, width: int, height: int, clip_model: str, config: dict) -> tuple[Path, Path, Path]:
    import open_clip
    import skimage.data
    import torch
    from compressai.registry import MODELS
    from PIL import Image
    from safetensors.torch import save_file

    from comneck_cli.codecs import save_codec

    image = workdir / "large.png"
    Image.fromarray(skimage.data.astronaut()).resize((width, height), Image.LANCZOS).save(image)
    torch.manual_seed(0)
    codec = workdir / "vbr.safetensors"
    save_codec(MODELS["mbt2018-mean-vbr"](**config).eval(), codec, "mbt2018-mean-vbr", 3, config)
    clip = workdir / "clip.safetensors"
    model = open_clip.create_model(clip_model, pretrained=None)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(clip))
    return image, codec, clip


def child(args: list[str], what: str) -> tuple[float, float]:
    """Run one CLI command in a child process: (wall seconds, that child's own peak RSS in MiB).

    ``os.wait4`` gives the rusage of this child alone, where RUSAGE_CHILDREN's ru_maxrss is the maximum over all
    children so far and would hide a smaller run after a larger one."""
    start = time.perf_counter()
    with tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - start
        if os.waitstatus_to_exitcode(status):
            err.seek(0)
            raise SystemExit(f"{what} failed:\n{err.read()[-3000:].decode(errors='replace')}")
    return seconds, usage.ru_maxrss / 1024


def encode(image: Path, codec: Path, clip: Path, clip_model: str, semantic: bool, out: Path) -> dict:
    """One `comneck encode` in a child process: wall time, the child's peak RSS, the record's size."""
    args = [sys.executable, "-m", "comneck_cli", "encode", str(image), "--codec", "mbt2018-mean-vbr", "--weights",
            str(codec), "--rate", "4", "--device", "cpu", "--quiet", "--force", "-o", str(out)]
    if semantic:
        args += ["--semantic", "--clip", clip_model, "--clip-tag", "none", "--clip-weights", str(clip)]
    seconds, peak_mib = child(args, "encode")
    from comneck_cli.formats import read_file

    record = read_file(out)[0]
    return {"command": "encode", "semantic": semantic, "seconds": round(seconds, 2), "peak_rss_mib": round(peak_mib, 1),
            "record_bytes": out.stat().st_size, "map_bytes": len(record.importance_map or b""),
            "bpp": round(record.bits_per_pixel, 5)}


def decode(record: Path, codec: Path, out: Path) -> dict:
    """One `comneck decode` of ``record`` to a PNG in a child process: wall time and the child's peak RSS."""
    args = [sys.executable, "-m", "comneck_cli", "decode", str(record), "--weights", str(codec), "--device", "cpu",
            "--quiet", "--force", "-o", str(out)]
    seconds, peak_mib = child(args, "decode")
    return {"command": "decode", "semantic": False, "seconds": round(seconds, 2), "peak_rss_mib": round(peak_mib, 1),
            "record_bytes": record.stat().st_size, "map_bytes": 0, "bpp": None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="4000x3000", help="W×H of the upscaled photo")
    parser.add_argument("--clip", default="ViT-B-16", help="open_clip model guiding --semantic (random weights)")
    parser.add_argument("--config", default="192,320", help="N,M of the mbt2018-mean-vbr codec")
    parser.add_argument("--plain", action="store_true", help="also encode without --semantic, first")
    parser.add_argument("--no-semantic", action="store_true", help="skip the --semantic encode")
    parser.add_argument("--decode", action="store_true", help="also decode the plain record (implies --plain)")
    parser.add_argument("-o", "--output", type=Path, default=Path(__file__).parent / "results" / "large_image.json")
    args = parser.parse_args()
    width, height = (int(v) for v in args.size.lower().split("x"))
    n, m = (int(v) for v in args.config.split(","))
    runs = []
    with tempfile.TemporaryDirectory(prefix="comneck-large-") as tmp:
        workdir = Path(tmp)
        image, codec, clip = prepare(workdir, width, height, args.clip, {"N": n, "M": m})
        plain = args.plain or args.decode
        for semantic in ([False] if plain else []) + ([] if args.no_semantic else [True]):
            runs.append(encode(image, codec, clip, args.clip, semantic, workdir / f"out-{semantic}.cnk"))
        if args.decode:
            runs.append(decode(workdir / "out-False.cnk", codec, workdir / "decoded.png"))
    report = {"date": time.strftime("%Y-%m-%d"), "size": [width, height], "clip": args.clip,
              "codec": {"name": "mbt2018-mean-vbr", "N": n, "M": m}, "threads": os.environ.get("OMP_NUM_THREADS"),
              "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(),
                          "loadavg": os.getloadavg()}, "runs": runs}
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    print(f"{'mode':16s} {'seconds':>8s} {'peak RSS MiB':>13s} {'record B':>10s} {'map B':>6s} {'bpp':>8s}")
    for r in runs:
        mode = f"{r['command']} {'semantic' if r['semantic'] else 'plain'}"
        bpp = "" if r["bpp"] is None else f"{r['bpp']:8.4f}"
        print(f"{mode:16s} {r['seconds']:8.1f} {r['peak_rss_mib']:13.1f} {r['record_bytes']:10d} {r['map_bytes']:6d} "
              f"{bpp:>8s}")


if __name__ == "__main__":
    main()
