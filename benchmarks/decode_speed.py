"""Issue #34.2: is a candidate default codec's decode of a 512×512 photo no slower than today's default on the CPU?

Each ``--weights FILE`` (a variable-rate codec file; its codec is the one its metadata names) codes scikit-image's
astronaut (512×512, whole) at each ``--rates`` R; then, in interleaved rounds (so every codec sees the same machine
load), the script times ``decode`` (the packed record's entropy decoding and g_s, uint8 image out: what
`comneck decode` does after reading the file) and ``encode`` (g_a, entropy coding and packing, from the uint8
image). It prints the median per codec and rate, and each codec's ratio to the first one's, and writes every sample
to JSON. Ratios are what to quote: absolute times depend on the machine's load (``uptime`` is recorded).

    python benchmarks/decode_speed.py --weights weights/mbt2018-mean-vbr.safetensors --weights NEW.safetensors \
        [--rates 1,4,8] [--repeat 5] [--threads 1] [-o benchmarks/results/decode_speed.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from run import _home_relative  # benchmarks/run.py, beside this script: a result file names no user's home


def photo() -> np.ndarray:
    import skimage.data
    from PIL import Image

    return np.asarray(Image.open(Path(skimage.data.__file__).parent / "astronaut.png").convert("RGB"))


def load(path: Path):
    from comneck_cli.codecs import load_codec, weights_info

    codec = weights_info(path).get("codec")
    if codec is None:
        sys.exit(f"decode_speed: {path} names no codec in its metadata; give a comneck codec file")
    return load_codec(codec, 1, weights=path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", type=Path, action="append", required=True,
                        help="a variable-rate codec file (repeat; the first is the baseline of the ratios)")
    parser.add_argument("--rates", default="1,4,8", help="rates R, comma-separated")
    parser.add_argument("--repeat", type=int, default=5, help="interleaved rounds")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--image", type=Path, default=None, help="another photo instead of astronaut (512×512)")
    parser.add_argument("-o", "--output", type=Path, default=Path("benchmarks/results/decode_speed.json"))
    args = parser.parse_args(argv)

    import torch

    from comneck_cli import coding as api
    from comneck_cli.formats import pack, unpack
    from comneck_cli.weights import file_sha256

    torch.set_num_threads(args.threads)
    rates = [float(r) for r in args.rates.split(",")]
    if args.image is None:
        image = photo()
    else:
        from PIL import Image

        image = np.asarray(Image.open(args.image).convert("RGB"))
    codecs = [load(p) for p in args.weights]
    names = [f"{c.spec.name} {file_sha256(p)[:8]}" for c, p in zip(codecs, args.weights)]

    def encode(codec, rate: float) -> bytes:
        at = codec.at_rate(rate)
        strings, _ = at.code(codec.analyze(api.to_tensor(image, 64)))
        return pack(api.record_from_strings(image, at, strings, None))

    def decode(codec, rate: float, data: bytes) -> np.ndarray:
        return api.decode(unpack(data), codec.at_rate(rate))

    records = {(i, r): encode(c, r) for i, c in enumerate(codecs) for r in rates}
    samples: dict[str, list[float]] = {}
    load_before = os.getloadavg()
    for _ in range(args.repeat):
        for (i, rate), data in records.items():
            for what, call in (("encode", lambda: encode(codecs[i], rate)),
                               ("decode", lambda: decode(codecs[i], rate, data))):
                start = time.perf_counter()
                call()
                samples.setdefault(f"{i}|{rate}|{what}", []).append(time.perf_counter() - start)
    rows = []
    for (i, rate), data in records.items():
        row = {"codec": names[i], "weights": _home_relative(args.weights[i]), "rate": rate,
               "bpp": 8 * len(data) / (image.shape[0] * image.shape[1])}
        for what in ("encode", "decode"):
            median = statistics.median(samples[f"{i}|{rate}|{what}"])
            base = statistics.median(samples[f"0|{rate}|{what}"])
            row.update({f"{what}_ms": round(1000 * median, 1), f"{what}_ratio": round(median / base, 3),
                        f"{what}_samples_ms": [round(1000 * s, 1) for s in samples[f"{i}|{rate}|{what}"]]})
        rows.append(row)
    print(f"{image.shape[1]}×{image.shape[0]}, {args.threads} thread(s), median of {args.repeat} interleaved rounds")
    print(f"{'codec':28} {'R':>4} {'bpp':>6} {'decode ms':>10} {'× first':>8} {'encode ms':>10} {'× first':>8}")
    for row in rows:
        print(f"{row['codec']:28} {row['rate']:>4g} {row['bpp']:>6.3f} {row['decode_ms']:>10.1f} "
              f"{row['decode_ratio']:>8.2f} {row['encode_ms']:>10.1f} {row['encode_ratio']:>8.2f}")
    report = {"image": _home_relative(args.image) if args.image else "skimage astronaut.png", "size": list(image.shape[:2]),
              "threads": args.threads, "repeat": args.repeat, "rows": rows,
              "load_average": {"before": load_before, "after": os.getloadavg()},
              "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
              "date": time.strftime("%Y-%m-%d %H:%M")}
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=1))
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
