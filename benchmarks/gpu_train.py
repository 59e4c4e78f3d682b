"""Train a codec for exactly the minutes a lent GPU machine has, and bring the checkpoint back (issue #34.3).

Everything that can fail is checked first (CUDA, the data, the start file, the output folder), so no GPU minute goes
on setting up; then ``comneck train codec`` runs with ``minutes`` (stop, checkpoint, export) and this script writes
``summary.json`` beside the exported file. A second call with the same ``--out`` resumes the same run from its
``checkpoint.pt`` (bring the folder back and carry it again), so the minutes of several loans add up::

    python benchmarks/gpu_train.py --minutes 8 --data tiles/ --init weights/mbt2018-mean-vbr.safetensors \\
        --out "$OUT/run" --steps 200000 --crop 256 --batch-size 16 --lr 1e-4

``--out`` then holds ``codec.safetensors`` (what the run has learnt so far, loadable with ``--weights``),
``run/checkpoint.pt`` and ``run/metrics.jsonl`` (for ``--resume``) and ``summary.json`` (steps, seconds, steps per
second, the device, the final losses, the file's sha256). ``--device cpu`` runs the same path on a CPU (the tests do).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

SUFFIXES = (".png", ".jpg", ".jpeg", ".ppm", ".tif", ".tiff", ".webp")
EXPORT_MARGIN_MINUTES = 0.5  # the export and summary after the last step, so the whole call fits the loan


def preflight(args: argparse.Namespace) -> str | None:
    """Why the run cannot start, in one sentence, or None; nothing here costs GPU time."""
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        return "no CUDA device is visible (torch.cuda.is_available() is False); pass --device cpu to train on the CPU"
    if not args.data.is_dir() or not any(p.suffix.lower() in SUFFIXES for p in args.data.rglob("*")):
        return f"--data {args.data} holds no images ({', '.join(SUFFIXES)})"
    if args.init is not None and not args.init.is_file():
        return f"--init {args.init} does not exist"
    if args.init_pca is not None and not args.init_pca.is_dir():
        return f"--init-pca {args.init_pca} is not a folder"
    if args.minutes <= EXPORT_MARGIN_MINUTES:
        return f"--minutes {args.minutes:g} leaves no time to train after the export ({EXPORT_MARGIN_MINUTES} min)"
    try:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / ".writable").touch()
        (args.out / ".writable").unlink()
    except OSError as exc:
        return f"cannot write to --out {args.out} ({exc.strerror or exc})"
    return None


def train(args: argparse.Namespace) -> dict:
    """One leg of the run: fresh, or resumed from ``--out``'s checkpoint; returns the summary it writes."""
    import torch

    from comneck_cli.train.codec import CodecTrainConfig, train_codec
    from comneck_cli.weights import file_sha256

    checkpoint = args.out / "run" / "checkpoint.pt"
    resumed = checkpoint.is_file()
    common = dict(data=args.data, steps=args.steps, output=args.out / "codec.safetensors", register=None,
                  run_dir=args.out / "run", device=args.device, precision=args.precision, quiet=True,
                  checkpoint_every=args.checkpoint_every, minutes=args.minutes - EXPORT_MARGIN_MINUTES,
                  workers=args.workers, log_every=args.log_every)
    if resumed:  # the checkpoint holds the trajectory (codec, λ, lr, crop, batch, seed)
        cfg = CodecTrainConfig(resume=checkpoint, **common)
    else:
        cfg = CodecTrainConfig(codec=args.codec, init=args.init, init_pca=args.init_pca, config=args.config,
                               crop=args.crop,
                               batch_size=args.batch_size, lr=args.lr, aux_lr=args.aux_lr, seed=args.seed,
                               freeze=args.freeze or None, **common)
    start = time.perf_counter()
    before = torch.load(checkpoint, map_location="cpu", weights_only=True)["step"] if resumed else 0
    result = train_codec(cfg)
    seconds = time.perf_counter() - start
    summary = {
        "resumed_from_step": before, "step": result.steps, "planned_steps": args.steps, "seconds": round(seconds, 1),
        "steps_per_second": round((result.steps - before) / seconds, 3),
        "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
        "final": result.final, "codec_file": result.output.name, "sha256": file_sha256(result.output),
        "resume": f"python benchmarks/gpu_train.py --out {args.out} --data {args.data} --minutes M",
    }
    (args.out / "summary.json").write_text(json.dumps(summary, indent=1), encoding="utf-8")
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, required=True, help="wall time of this leg, export included")
    parser.add_argument("--data", type=Path, required=True, help="training images (a flat folder)")
    parser.add_argument("--out", type=Path, required=True, help="run folder: resumed when it holds a checkpoint")
    parser.add_argument("--codec", default="mbt2018-mean-vbr")
    parser.add_argument("--init", type=Path, default=None, help="start from this codec file")
    parser.add_argument("--init-pca", type=Path, default=None, help="lapped-pca-vbr: photos for the linear paths")
    parser.add_argument("--config", type=json.loads, default=None, help="constructor arguments, JSON")
    parser.add_argument("--steps", type=int, default=200_000, help="the run's planned length over all legs")
    parser.add_argument("--crop", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--aux-lr", type=float, default=1e-3, help="learning rate of the bottleneck quantiles")
    parser.add_argument("--freeze", action="append", default=[], metavar="PREFIX",
                        help="hold these parameters fixed (repeatable), as `train codec --freeze`")
    parser.add_argument("--seed", type=int, default=34)
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto")
    parser.add_argument("--checkpoint-every", type=int, default=500)
    parser.add_argument("--log-every", type=int, default=50)
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (--device cpu)")
    args = parser.parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    problem = preflight(args)
    if problem is not None:
        print(f"gpu_train: error: {problem}", file=sys.stderr)
        return 1
    summary = train(args)
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
