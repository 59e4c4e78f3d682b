"""`comneck batch` throughput: images per second, local engine against Ray with N workers, on this machine.

Fifty 256×256 crops of scikit-image photos are encoded, then decoded, by each engine into a fresh folder, with
two codecs of the real mbt2018-mean architecture and random weights (timing only): ``tiny`` (N=8, M=12, the
tests' size, where fixed costs dominate) and ``small`` (N=128, M=192, the zoo's size for qualities 1–4).

Two rates per run:

- end to end: inputs / wall time of the whole command, model loading (and, for Ray, starting the actors and
  importing torch and CompressAI in each) included; what a user waits for on a job this size;
- steady: inputs after the first / time from the first output file to the last (their mtimes: each is
  written by the worker that made it), i.e. the rate once the models are loaded, which a large job approaches.

The local engine runs first, in this process, once with one torch thread and once with torch's default; then a
Ray instance is started (its start time is reported apart, not counted) and each Ray worker gets one CPU, and so
one torch thread.

    python benchmarks/batch_throughput.py [--images 50] [--workers 2] [-o benchmarks/results/batch_throughput.json]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import tempfile
import time
import warnings
from pathlib import Path

CODECS = {"tiny": {"N": 8, "M": 12}, "small": {"N": 128, "M": 192}}
PHOTOS = ["astronaut.png", "coffee.png", "chelsea.png", "rocket.jpg", "motorcycle_left.png", "hubble_deep_field.jpg"]


def prepare(workdir: Path, count: int) -> None:
    """``count`` 256×256 crops in two folders, and one codec file per entry of CODECS."""
    import numpy as np
    import skimage.data
    import torch
    from compressai.models import MeanScaleHyperprior
    from PIL import Image

    from comneck_cli.codecs import save_codec

    folder = Path(skimage.data.__file__).parent
    photos = [np.asarray(Image.open(folder / name).convert("RGB")) for name in PHOTOS]
    rng = np.random.default_rng(0)
    for i in range(count):
        photo = photos[i % len(photos)]
        top, left = (int(rng.integers(0, photo.shape[k] - 256 + 1)) for k in (0, 1))
        target = workdir / "images" / ("a" if i % 2 else "b") / f"img{i:03d}.png"
        target.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(photo[top : top + 256, left : left + 256]).save(target)
    for name, config in CODECS.items():
        torch.manual_seed(0)
        save_codec(MeanScaleHyperprior(**config).eval(), workdir / f"{name}.safetensors", "mbt2018-mean", 1, config)


def timed(args: list[str], output: Path, suffix: str) -> dict:
    """Run one `comneck batch` command in this process: wall time, and the steady rate from the outputs' mtimes
    (each written by the worker that made it, so it is when that input finished, whatever the engine)."""
    from click.testing import CliRunner

    from comneck_cli import batch as batch_module

    start = time.time()
    result = CliRunner().invoke(batch_module.batch, args, catch_exceptions=False)
    wall = time.time() - start
    if result.exit_code != 0:
        raise SystemExit(f"benchmark run failed: {' '.join(args)}\n{result.stderr}")
    finished = sorted(p.stat().st_mtime for p in output.rglob(f"*{suffix}"))
    n = len(finished)
    span = finished[-1] - finished[0] if n > 1 else 0.0
    return {"images": n, "wall_s": wall, "images_per_s": n / wall,
            "steady_images_per_s": (n - 1) / span if span > 0 else float("nan"),
            "first_output_s": finished[0] - start if finished else float("nan")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=50)
    parser.add_argument("--workers", type=int, default=2, help="Ray workers (one CPU each)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("-o", "--output", type=Path, default=Path("benchmarks/results/batch_throughput.json"))
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)

    import ray
    import torch

    default_threads = torch.get_num_threads()
    threads = sorted({1, default_threads})
    rows = []

    def both(codec: str, workdir: Path, engine: str, extra: list[str], **row) -> None:
        """Encode the images, then decode the result, in fresh folders; one row per command."""
        weights = str(workdir / f"{codec}.safetensors")
        coded, decoded = workdir / f"{codec}-{engine}-cnk", workdir / f"{codec}-{engine}-png"
        common = ["--weights", weights, "--batch-size", str(args.batch_size), "--quiet", *extra]
        encode = timed(["encode", "--input", str(workdir / "images"), "--output", str(coded),
                        "--codec", "mbt2018-mean", "-q", "1", *common], coded, ".cnk")
        decode = timed(["decode", "--input", str(coded), "--output", str(decoded), *common], decoded, ".png")
        for command, result in (("encode", encode), ("decode", decode)):
            rows.append({"codec": codec, **CODECS[codec], "command": command, "engine": engine, **row, **result})
        shutil.rmtree(coded)
        shutil.rmtree(decoded)

    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        prepare(workdir, args.images)
        # The local engine first, with no Ray processes running beside it (as a local user runs it).
        for codec in CODECS:
            for n in threads:
                torch.set_num_threads(n)
                both(codec, workdir, "local", [], workers=1, threads=n)
        torch.set_num_threads(default_threads)
        start = time.perf_counter()
        ray.init(address="local", num_cpus=args.workers, include_dashboard=False, object_store_memory=256 << 20,
                 logging_level=logging.ERROR, log_to_driver=False)
        ray_start = time.perf_counter() - start
        try:
            for codec in CODECS:
                both(codec, workdir, "ray", ["--engine", "ray", "--workers", str(args.workers)],
                     workers=args.workers, threads=1)
        finally:
            ray.shutdown()

    print(f"comneck batch, {args.images} images of 256×256, mbt2018-mean (random weights), CPU only, "
          f"{os.cpu_count()} cores (load average {load_before[0]:.1f} before, {os.getloadavg()[0]:.1f} after); "
          f"Ray started once in {ray_start:.1f} s (not counted below)")
    header = f"{'codec':6s} {'N,M':>8s} {'command':7s} {'engine':6s} {'workers':>7s} {'threads':>7s} {'wall s':>7s} " \
             f"{'img/s':>7s} {'steady img/s':>13s} {'first out s':>12s}"
    print(header)
    for r in sorted(rows, key=lambda r: (r["codec"] != "tiny", r["command"], r["engine"], r["threads"])):
        print(f"{r['codec']:6s} {r['N']:>3d},{r['M']:<4d} {r['command']:7s} {r['engine']:6s} {r['workers']:7d} "
              f"{r['threads']:7d} "
              f"{r['wall_s']:7.2f} {r['images_per_s']:7.1f} {r['steady_images_per_s']:13.1f} "
              f"{r['first_output_s']:12.2f}")
    report = {
        "benchmark": "batch_throughput",
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(),
                    "processor": platform.processor(), "python": platform.python_version(),
                    "ray": ray.__version__, "gpu": None},
        "date": time.strftime("%Y-%m-%d"),
        "images": args.images,
        "image_size": [256, 256],
        "batch_size": args.batch_size,
        "ray_start_s": ray_start,
        "load_average_1_5_15_min": {"before": load_before, "after": os.getloadavg()},
        "rows": rows,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
