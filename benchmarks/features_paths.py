"""The three feature paths end to end on one 256×256 image, ELIC + ViT-L/14 (random weights: timing only).

- neck:            .cnk -> entropy-decode y_hat -> transform-neck -> C' (blocks 3..24) -> features
- reconstruction:  .cnk -> entropy-decode y_hat -> g_s -> resize/crop -> full CLIP tower -> features
- uncompressed:    image -> resize/crop -> full CLIP tower -> features (no codec at all)

Each path runs in its own process so its peak RSS is its own. Prints a table and writes JSON.

    python benchmarks/features_paths.py [--repeat 5] [--threads 2] [-o benchmarks/results/features_paths.json]
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

PATHS = ("neck", "reconstruction", "uncompressed")


def child(path: str, workdir: Path, repeat: int, threads: int) -> dict:
    """Load everything, warm up once, then time ``repeat`` end-to-end runs of one path."""
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    import numpy as np
    import torch
    from PIL import Image

    from comneck_cli import coding as api
    from comneck_cli.features import FeatureExtractor
    from comneck_cli.models.neck import TransformNeck
    from comneck_cli.formats import unpack

    torch.set_num_threads(threads)
    codec = api.load_codec("elic2022-official", 1, weights=workdir / "elic.safetensors")
    record = unpack((workdir / "image.cnk").read_bytes())
    image = np.asarray(Image.open(workdir / "image.png"))
    extractor = FeatureExtractor.for_clip("ViT-L-14", None, k=2)
    extractor.neck = TransformNeck(latent_channels=320, width=1024, heads=16, grid=(16, 16)).eval()

    def once():
        if path == "neck":
            return extractor.from_latents([api.decode_latents(record, codec)], -2, "patch")
        if path == "reconstruction":
            return extractor.from_images([api.decode(record, codec)], -2, "patch")
        return extractor.from_images([image], -2, "patch")

    shape = tuple(once().shape)
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        once()
        times.append(time.perf_counter() - start)
    return {
        "path": path,
        "median_s": statistics.median(times),
        "min_s": min(times),
        "runs": repeat,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "output_shape": shape,
    }


def prepare(workdir: Path) -> int:
    """A full-size ELIC with random weights saved the way comneck loads codecs, and one coded 256² photo."""
    warnings.filterwarnings("ignore")
    import numpy as np
    import skimage.data
    import torch
    from compressai.models import Elic2022Official
    from PIL import Image

    from comneck_cli import coding as api
    from comneck_cli.codecs import save_codec
    from comneck_cli.formats import pack

    torch.manual_seed(0)
    save_codec(Elic2022Official(N=192, M=320).eval(), workdir / "elic.safetensors", "elic2022-official", 1,
               {"N": 192, "M": 320})
    photo = Path(skimage.data.__file__).parent / "astronaut.png"
    crop = np.asarray(Image.open(photo).convert("RGB"))[128:384, 128:384]
    Image.fromarray(crop).save(workdir / "image.png")
    codec = api.load_codec("elic2022-official", 1, weights=workdir / "elic.safetensors")
    data = pack(api.encode(crop, codec))
    (workdir / "image.cnk").write_bytes(data)
    return len(data)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("-o", "--output", type=Path, default=Path("benchmarks/results/features_paths.json"))
    parser.add_argument("--child", choices=PATHS, help=argparse.SUPPRESS)
    parser.add_argument("--workdir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.workdir, args.repeat, args.threads)))
        return

    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        size = prepare(workdir)
        rows = []
        for path in PATHS:
            out = subprocess.run(
                [sys.executable, __file__, "--child", path, "--workdir", str(workdir),
                 "--repeat", str(args.repeat), "--threads", str(args.threads)],
                check=True, capture_output=True, text=True,
            )
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    by = {r["path"]: r for r in rows}
    ratio = by["reconstruction"]["median_s"] / by["neck"]["median_s"]
    print(f"ELIC + ViT-L/14, one 256×256 image ({size} B .cnk), CPU, {args.threads} threads, median of {args.repeat}")
    print(f"{'path':16s} {'median s':>9s} {'min s':>8s} {'peak RSS MiB':>13s}  output")
    for r in rows:
        print(f"{r['path']:16s} {r['median_s']:9.3f} {r['min_s']:8.3f} {r['peak_rss_mib']:13.0f}  {r['output_shape']}")
    print(f"reconstruction / neck time ratio: {ratio:.2f}")
    report = {
        "benchmark": "features_paths",
        "machine": {"cpu_count": __import__("os").cpu_count(), "platform": platform.platform(),
                    "processor": platform.processor(), "python": platform.python_version()},
        "date": time.strftime("%Y-%m-%d"),
        "threads": args.threads,
        "cnk_bytes": size,
        "rows": rows,
        "reconstruction_over_neck": ratio,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
