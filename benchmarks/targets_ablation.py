"""Issue #12: does matching the penultimate patch tokens (what LLaVA reads) make a neck reproduce them better?

The ComNeck authors' training matches only the projected CLS embedding (``--targets pooled:1``). This trains
tiny necks from the same seeds for the same steps with different ``--targets`` and measures, on shipped photos
none of them trained on, how far C'(T(y_hat)) is from C(x) at the outputs the MLLM families read: hidden
state -2's patch tokens (LLaVA, Shikra), hidden state -1's patch tokens (Honeybee), all projected tokens
(LLaMA-Adapter) and the projected embedding (V2L-Tokenizer).

Tiny but real configurations, all made here: an mbt2018-mean codec (N=8, M=12) trained for ``--codec-steps``
on six scikit-image photos (80×80, random 64 crops), and a randomly initialised 4-block, width-64 open_clip
ViT (56 px, patch 14: the 4×4 patch grid of the codec's 4×4 latent grid at 64, split at k = 2), the same
configuration the tests use. Each neck trains d1 stage 3 only (distillation, Adam, constant lr). Errors are
MSE over 30 held-out crops (six other scikit-image photos, centre and four corners of each); "rel" divides by
the teacher tensor's variance over the crops (1.0: no better than predicting its mean). A random CLIP says
how well a neck can copy a tower, not what pretrained weights would give.

    python benchmarks/targets_ablation.py [--steps 400] [--seeds 0,1,2] [-o benchmarks/results/targets_ablation.json]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import tempfile
import time
import warnings
from pathlib import Path

TRAIN_PHOTOS = ("chelsea.png", "astronaut.png", "coffee.png", "camera.png", "rocket.jpg", "retina.jpg")
HELD_OUT = ("motorcycle_left.png", "ihc.png", "hubble_deep_field.jpg", "color.png", "brick.png", "grass.png")
TINY_CLIP = "comneck-targets-tiny-ViT-14"
TINY_CLIP_CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 56, "layers": 4, "width": 64, "head_width": 16, "patch_size": 14},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}
CODEC, CODEC_CONFIG = "mbt2018-mean", {"N": 8, "M": 12}
RUNS = ("pooled:1", "pooled:1,layer-2/patch:1", "layer-2/patch:1", "pooled:1,layer-2/patch:1,layer-1/patch:0.5")
MEASURED = ("layer-2/patch", "layer-1/patch", "projected", "pooled")


def photo(name: str) -> Path:
    import skimage.data

    return Path(skimage.data.__file__).parent / name


def prepare(work: Path, codec_steps: int) -> tuple[Path, Path, Path]:
    """The training folder (one class per photo), the tiny CLIP's weights file, and the trained tiny codec."""
    import open_clip
    import torch
    from PIL import Image
    from safetensors.torch import save_file

    from comneck_cli.train import CodecTrainConfig, train_codec

    data = work / "data"
    for name in TRAIN_PHOTOS:
        (data / Path(name).stem).mkdir(parents=True)
        image = Image.open(photo(name)).convert("RGB").resize((80, 80), Image.BICUBIC)
        image.save(data / Path(name).stem / f"{Path(name).stem}.png")
    configs = work / "clip_configs"
    configs.mkdir()
    (configs / f"{TINY_CLIP}.json").write_text(json.dumps(TINY_CLIP_CONFIG))
    open_clip.add_model_config(configs)
    torch.manual_seed(0)
    clip = open_clip.create_model(TINY_CLIP, pretrained=None)
    clip_file = work / "clip.safetensors"
    save_file({k: v.contiguous() for k, v in clip.state_dict().items()}, str(clip_file))
    codec = train_codec(CodecTrainConfig(codec=CODEC, quality=8, data=data, steps=codec_steps, batch_size=6, crop=64,
                                         config=CODEC_CONFIG, lr=5e-3, run_dir=work / "codec.run", quiet=True,
                                         register=None, output=work / "codec.safetensors", device="cpu"))
    return data, clip_file, codec.output


def held_out_crops():
    """Each held-out photo shrunk to 80×80 as the training photos are, then its centre and four corner crops."""
    import numpy as np
    import torch
    from PIL import Image

    crops = []
    for name in HELD_OUT:
        image = Image.open(photo(name)).convert("RGB").resize((80, 80), Image.BICUBIC)
        x = torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1).float() / 255
        for top, left in ((8, 8), (0, 0), (0, 16), (16, 0), (16, 16)):
            crops.append(x[:, top:top + 64, left:left + 64])
    return torch.stack(crops)


class Evaluator:
    """C(x) once at every measured output; then, per neck, C'(T(y_hat)) and the MSE at each."""

    def __init__(self, clip_file: Path, codec_file: Path):
        import torch

        from comneck_cli.clip.tower import load_clip, split_clip
        from comneck_cli.codecs import load_codec
        from comneck_cli.train.latents import frozen_latents
        from comneck_cli.train.neck import Target, Teacher, tail_request

        clip = load_clip(TINY_CLIP, None, weights_file=clip_file)
        self.head, self.tail = split_clip(clip, 2)
        self.targets = [Target.parse(name) for name in MEASURED]
        self.request = tail_request(self.targets)
        x = held_out_crops()
        codec = load_codec(CODEC, 8, weights=codec_file)
        with torch.no_grad():
            self.teacher = Teacher(clip, self.head, self.tail, self.targets)(x)
            self.y_hat = frozen_latents(codec.model, codec.spec.family, x)
        self.crops = len(x)

    def errors(self, neck) -> dict[str, dict[str, float]]:
        import torch
        import torch.nn.functional as F

        from comneck_cli.train.neck import select_target

        with torch.no_grad():
            features = self.tail(neck(self.y_hat), **self.request)
        out = {}
        for name, target, teacher in zip(MEASURED, self.targets, self.teacher):
            mse = F.mse_loss(select_target(features, target), teacher).item()
            out[name] = {"mse": mse, "rel": mse / teacher.var(dim=0, unbiased=False).mean().item()}
        return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=400, help="neck training steps (d1 stage 3)")
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seeds", default="0,1,2", help="neck seeds (initialisation and data order)")
    parser.add_argument("--codec-steps", type=int, default=200)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("-o", "--output", type=Path, default=Path("benchmarks/results/targets_ablation.json"))
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]

    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        os.environ["COMNECK_HOME"] = str(work / "home")  # nothing reaches the user's registry
        import torch

        from comneck_cli.models.neck import TransformNeck, load_neck
        from comneck_cli.train import NeckTrainConfig, train_neck

        torch.set_num_threads(args.threads)
        data, clip_file, codec_file = prepare(work, args.codec_steps)
        evaluator = Evaluator(clip_file, codec_file)
        rows = []
        for seed in seeds:
            for targets in (None, *RUNS):
                began = time.perf_counter()
                if targets is None:  # a freshly initialised neck, for scale
                    torch.manual_seed(seed)
                    neck = TransformNeck(latent_channels=CODEC_CONFIG["M"], width=64, heads=4, grid=(4, 4)).eval()
                else:
                    folder = work / f"neck-{seed}-{len(rows)}"
                    cfg = NeckTrainConfig(
                        scenario="d1", codec=CODEC, quality=8, codec_weights=codec_file, data=data,
                        clip_model=TINY_CLIP, clip_tag="none", clip_weights=clip_file, targets=targets,
                        steps=(0, 0, args.steps), lr=(args.lr,), batch_size=6, crop=64, seed=seed,
                        run_dir=folder / "run", checkpoint_every=10**9, quiet=True, register=None,
                        output=folder / "neck.safetensors", device="cpu")
                    neck, _ = load_neck(train_neck(cfg).output)
                rows.append({"targets": targets or "untrained", "seed": seed, "errors": evaluator.errors(neck),
                             "seconds": round(time.perf_counter() - began, 2)})

    names = ["untrained", *RUNS]
    summary = {}
    for name in names:
        mine = [r for r in rows if r["targets"] == name]
        summary[name] = {m: {k: statistics.mean(r["errors"][m][k] for r in mine) for k in ("mse", "rel")}
                         | {"mse_sd": statistics.pstdev(r["errors"][m]["mse"] for r in mine)} for m in MEASURED}
    base = summary["pooled:1"]["layer-2/patch"]["mse"]
    drop = 1 - summary["pooled:1,layer-2/patch:1"]["layer-2/patch"]["mse"] / base

    print(f"MSE of C'(T(y_hat)) vs C(x), {evaluator.crops} held-out crops, tiny codec and CLIP, "
          f"{args.steps} steps, mean over seeds {args.seeds} (rel = MSE / teacher variance)")
    head = "".join(f"{m:>22s}" for m in MEASURED)
    print(f"{'--targets':44s}{head}")
    for name in names:
        cells = "".join(f"{summary[name][m]['mse']:>11.4f} ({summary[name][m]['rel']:.3f})" for m in MEASURED)
        print(f"{name:44s}{cells}")
    print(f"layer -2 patch-token MSE, pooled:1 -> pooled:1,layer-2/patch:1: {base:.4f} -> "
          f"{summary['pooled:1,layer-2/patch:1']['layer-2/patch']['mse']:.4f} ({drop:.0%} lower)")
    report = {
        "benchmark": "targets_ablation",
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "torch": torch.__version__, "threads": args.threads},
        "date": time.strftime("%Y-%m-%d"),
        "settings": {"steps": args.steps, "lr": args.lr, "seeds": seeds, "codec_steps": args.codec_steps,
                     "codec": CODEC, "codec_config": CODEC_CONFIG, "clip_config": TINY_CLIP_CONFIG, "k": 2,
                     "crop": 64, "batch_size": 6, "train_photos": TRAIN_PHOTOS, "held_out_photos": HELD_OUT,
                     "held_out_crops": evaluator.crops},
        "rows": rows,
        "summary": summary,
        "penultimate_patch_mse_drop": drop,
        "seconds": round(time.perf_counter() - start, 1),
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.output} in {report['seconds']} s")


if __name__ == "__main__":
    main()
