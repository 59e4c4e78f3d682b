"""The comneck benchmark: codec latency and throughput, CompressAI head to head, feature paths, JPEG/WebP, start-up.

Random weights (nothing is downloaded): timings are real, sizes and bpp of the learned codecs are not.

- codecs: bmshj2018-hyperprior, mbt2018-mean, cheng2020-anchor, elic2022-official at full size, saved with
  ``comneck_cli.codecs.save_codec`` and loaded with ``load_codec`` (the real path), at 256×256 and 768×512
  (W×H). Each (codec, size) runs in its own process, so its peak RSS is its own. Encode and decode latency
  (median), images per second at batch 1 and batch 8 (``encode_batch``), g_a / g_s / entropy-coding split,
  container overhead (``record.overhead_bytes()``).
- head to head: CompressAI's ``model.compress(x)`` / ``model.decompress(strings, shape)`` as its
  ``examples/codec.py`` calls them, on a fresh CompressAI model with the same weights, and the same image; payload
  identity, file overhead against that example's header, and comneck/CompressAI time ratios (interleaved runs).
- features: ``benchmarks/features_paths.py`` (neck vs reconstruction vs uncompressed CLIP ViT-L/14), run as is.
- traditional: Pillow JPEG and WebP at the quality whose bpp is closest to ``--target-bpp`` (binary search).
- start-up: ``comneck --help`` and ``comneck info FILE`` as subprocesses; whether torch gets imported;
  the costliest imports (``python -X importtime``); ``comneck encode``, ``decode`` and ``features`` of one image,
  each as a ratio to ``python -c "import torch"`` timed in the same rounds.

    python benchmarks/run.py [--repeat 5] [--budget 10] [--threads N] [-o benchmarks/results/run.json]
    python benchmarks/run.py --smoke -o /tmp/run.json      # tiny codecs, 64×64, 1 repeat, no ViT-L (the test)

Images (scikit-image's photos; ``images[i]`` of each size, i = 0..7, cycling through the sources below):
256×256 are unscaled crops of astronaut (image 0 = astronaut[128:384, 128:384], as in features_paths.py),
coffee and chelsea; 768×512 are Lanczos upscales (coffee ×1.28 exactly, image 0; astronaut ×1.5; chelsea
×1.71) cropped to 768×512. Every crop is listed in the JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Callable

HERE = Path(__file__).resolve().parent


def _home_relative(path: str | Path | None) -> str | None:
    """A path as the report keeps it: under the home folder as ``~/...``, so a result file names no user's machine."""
    if path is None:
        return None
    home = Path.home()
    return f"~/{Path(path).relative_to(home)}" if Path(path).is_relative_to(home) else str(path)
FEATURES_PATHS = HERE / "features_paths.py"

# Full-size configurations: the (N, M) the CompressAI zoo uses at these qualities (CODECS[...].qualities).
FULL = {
    "bmshj2018-hyperprior": (6, {"N": 192, "M": 320}),
    "mbt2018-mean": (5, {"N": 192, "M": 320}),
    "cheng2020-anchor": (4, {"N": 192}),
    "elic2022-official": (1, {"N": 192, "M": 320}),
}
# Tiny configurations of the same architectures (as tests/conftest.py builds them): same code paths, fast.
SMOKE = {
    "bmshj2018-hyperprior": (6, {"N": 8, "M": 12}),
    "mbt2018-mean": (5, {"N": 8, "M": 12}),
    "cheng2020-anchor": (4, {"N": 8}),
    "elic2022-official": (1, {"N": 8, "M": 24, "groups": [2, 2, 4, 8, 8]}),
}
SIZES = ((256, 256), (512, 768))  # (H, W); labelled W×H
SMOKE_SIZES = ((64, 64),)
BATCH = 8
SOURCES = {  # per size, the order in which photos are used; image 0 is the first
    "square": ("astronaut.png", "coffee.png", "chelsea.png"),
    "wide": ("coffee.png", "astronaut.png", "chelsea.png"),
}
OFFSETS = (0.5, 0.25, 0.75)  # crop position (fraction of the slack) for the 1st, 2nd, 3rd use of a photo
BATCH_ANALYSIS = "mbt2018-mean"


def label(size: tuple[int, int]) -> str:
    return f"{size[1]}x{size[0]}"


def parse_size(text: str) -> tuple[int, int]:
    w, h = (int(v) for v in text.lower().split("x"))
    return h, w


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def measure(fns: dict[str, Callable[[], Any]], repeat: int, budget: float, *, warmup: bool = True,
            min_runs: int = 3) -> tuple[dict[str, Any], dict[str, dict]]:
    """Time each function in interleaved rounds; return the first call's outputs and per-function stats.

    With ``warmup`` each function is called once untimed first (its time is kept as ``first_s``: what a
    one-image CLI run pays); use it for the first call of a code path or tensor size, skip it for paths
    already exercised. Then up to ``repeat`` rounds, stopping once ``budget`` seconds of timed calls are
    spent but not before ``min_runs`` rounds (so that one stalled call cannot be the median), nor more than
    ``repeat``. Interleaving keeps a comparison fair on a machine whose load drifts.
    """
    outputs, first = {}, {}
    if warmup:
        for key, fn in fns.items():
            start = time.perf_counter()
            outputs[key] = fn()
            first[key] = time.perf_counter() - start
    times: dict[str, list[float]] = {k: [] for k in fns}
    spent = 0.0
    first_key = next(iter(fns))
    while len(times[first_key]) < min(min_runs, repeat) or (len(times[first_key]) < repeat and spent < budget):
        for key, fn in fns.items():
            start = time.perf_counter()
            out = fn()
            elapsed = time.perf_counter() - start
            outputs.setdefault(key, out)
            times[key].append(elapsed)
            spent += elapsed
    return outputs, {
        key: {"median_s": statistics.median(times[key]), "min_s": min(times[key]), "runs": len(times[key]),
              "first_s": first.get(key), "samples_s": [round(t, 5) for t in times[key]]}
        for key in fns
    }


# --------------------------------------------------------------------------- images


def make_images(size: tuple[int, int], count: int, folder: Path) -> list[dict]:
    """``count`` H×W crops of scikit-image photos, written as PNG; returns how each was made."""
    import numpy as np
    import skimage.data
    from PIL import Image

    height, width = size
    sources = SOURCES["wide" if width > height else "square"]
    made = []
    for i in range(count):
        name = sources[i % len(sources)]
        photo = Image.open(Path(skimage.data.__file__).parent / name).convert("RGB")
        scale = max(1.0, height / photo.height, width / photo.width)
        if scale > 1:
            photo = photo.resize((round(photo.width * scale), round(photo.height * scale)), Image.LANCZOS)
        frac = OFFSETS[(i // len(sources)) % len(OFFSETS)]
        top, left = round((photo.height - height) * frac), round((photo.width - width) * frac)
        crop = np.asarray(photo)[top : top + height, left : left + width]
        path = folder / f"image-{label(size)}-{i}.png"
        Image.fromarray(crop).save(path)
        made.append({"file": path.name, "source": name, "scale": round(scale, 4), "top": top, "left": left,
                     "height": height, "width": width})
    return made


# --------------------------------------------------------------------------- children (one process each)


def child_prepare(workdir: Path, smoke: bool) -> dict:
    """Random-weight codecs written through save_codec, and the test images."""
    warnings.filterwarnings("ignore")
    import torch
    from compressai.registry import MODELS

    from comneck_cli.codecs import save_codec

    configs = SMOKE if smoke else FULL
    for name, (quality, config) in configs.items():
        torch.manual_seed(0)
        save_codec(MODELS[name](**config).eval(), workdir / f"{name}.safetensors", name, quality, config)
    images = {label(s): make_images(s, BATCH, workdir) for s in (SMOKE_SIZES if smoke else SIZES)}
    return {"images": images}


# `comneck features` start-up: a neck for the shipped codec and a random open_clip ViT-S/32 (its config ships with
# open_clip, so a plain `comneck features` process can build it), registered in a temporary COMNECK_HOME.
STARTUP_CLIP = "ViT-S-32"


def child_startup_models(workdir: Path, size: tuple[int, int]) -> dict:
    """The CLIP weights file and the neck file (for H×W ``size`` images) that `comneck features` loads in the
    start-up rows."""
    warnings.filterwarnings("ignore")
    import open_clip
    import torch
    from safetensors.torch import save_file

    from comneck_cli import weights as registry
    from comneck_cli.codecs import weights_info
    from comneck_cli.formats import latent_grids
    from comneck_cli.models.neck import EVERY_RATE, NeckInfo, TransformNeck, save_neck

    torch.manual_seed(0)
    clip = open_clip.create_model(STARTUP_CLIP, pretrained=None)
    clip_file = workdir / "startup-clip.safetensors"
    save_file({k: v.contiguous() for k, v in clip.state_dict().items()}, str(clip_file))
    codec_file = registry.resolve("mbt2018-mean-vbr")  # the shipped default codec, what `comneck encode` uses
    config = json.loads(weights_info(codec_file)["config"])
    vision = clip.visual
    neck = TransformNeck(latent_channels=config["M"], width=vision.conv1.out_channels,
                         heads=vision.transformer.resblocks[0].attn.num_heads, grid=latent_grids(*size)[0])
    info = NeckInfo(codec="mbt2018-mean-vbr", quality=EVERY_RATE, codec_digest=registry.file_sha256(codec_file)[:8],
                    clip_model=STARTUP_CLIP, clip_tag=None, k=2, scenario="d1", config=neck.config)
    neck_file = workdir / "startup-neck.safetensors"
    save_neck(neck, neck_file, info)
    return {"clip": str(clip_file), "neck": str(neck_file)}


def compressai_header_bytes(strings: int) -> int:
    """CompressAI examples/codec.py, image file: u8 model id, u8 metric<<4|quality-1, u32 H, u32 W,
    u8 bit depth, then write_body: u32 shape×2, u32 string count, u32 length per string."""
    return 1 + 1 + 4 * 2 + 1 + 4 * 2 + 4 + 4 * strings


def child_codec(args: argparse.Namespace) -> dict:
    """Everything measured for one (codec, size), in this process alone."""
    warnings.filterwarnings("ignore")
    import logging

    logging.disable(logging.WARNING)
    import torch

    from comneck_cli import coding as api
    from comneck_cli.io.images import read_image, to_tensor
    from comneck_cli.formats import PAD_MULTIPLE, pack

    torch.set_num_threads(args.threads)
    workdir, name, size = args.workdir, args.codec, parse_size(args.size)
    quality = (SMOKE if args.smoke else FULL)[name][0]
    rss = {"start": peak_rss_mib()}
    start = time.perf_counter()
    codec = api.load_codec(name, quality, weights=workdir / f"{name}.safetensors")
    load_s = time.perf_counter() - start
    rss["loaded"] = peak_rss_mib()
    images = [read_image(workdir / f"image-{args.size}-{i}.png") for i in range(BATCH)]
    image = images[0]
    run = dict(repeat=args.repeat, budget=args.budget)

    out, enc = measure({"encode": lambda: api.encode(image, codec)}, **run)
    record = out["encode"]
    (workdir / f"{name}-{args.size}.cnk").write_bytes(pack(record))
    out, dec = measure({"decode": lambda: api.decode(record, codec)}, **run)
    assert out["decode"].shape == image.shape
    x = to_tensor(image, PAD_MULTIPLE)
    y_hat = api.decode_latents(record, codec)

    def g_a(x=x):
        with torch.inference_mode():
            return codec.model.g_a(x)

    _, split = measure({"g_a": g_a, "g_s": lambda: codec.synthesize(y_hat)}, **run, warmup=False)
    rss["batch1"] = peak_rss_mib()

    row: dict[str, Any] = {
        "codec": name, "quality": quality, "size": args.size, "height": size[0], "width": size[1],
        "load_s": load_s, "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
        "encode": enc["encode"], "decode": dec["decode"], "g_a": split["g_a"], "g_s": split["g_s"],
        "encode_img_per_s_b1": 1 / enc["encode"]["median_s"], "decode_img_per_s": 1 / dec["decode"]["median_s"],
        "strings": len(record.strings), "payload_bytes": record.payload_bytes,
        "overhead_bytes": record.overhead_bytes(), "file_bytes": len(pack(record)),
        "bpp_random_weights": record.bits_per_pixel,
    }

    estimate = BATCH * enc["encode"]["median_s"]
    if estimate > args.batch_budget:
        row["batch8"] = {"skipped": f"estimated {estimate:.1f} s per batch of {BATCH} > --batch-budget "
                                    f"{args.batch_budget:g} s"}
    else:
        xs = [to_tensor(im, PAD_MULTIPLE) for im in images]
        x8 = torch.cat(xs)
        y = g_a().float()
        family = codec.spec.family

        def entropy_encode():  # everything after g_a for one image: h_a, z coding, h_s, y coding
            with torch.inference_mode():
                return family.compress(codec.model, y)

        api.encode_batch(images, codec)  # warm-up: first batch-8 tensors
        # The same 8 images one by one and as one batch, in interleaved rounds: a fair ratio on a drifting load.
        out, b8 = measure({"batch1_x8": lambda: [api.encode(im, codec) for im in images],
                           "batch8": lambda: api.encode_batch(images, codec)}, **run, warmup=False, min_runs=1)
        assert len(out["batch8"]) == BATCH
        _, parts = measure({"g_a_b1_x8": lambda: [g_a(x) for x in xs], "g_a_b8": lambda: g_a(x8),
                            "entropy_encode": entropy_encode,
                            "entropy_decode": lambda: api.decode_latents(record, codec)}, **run, warmup=False,
                           min_runs=1)
        row["batch8"] = {**b8, **parts, **batch_summary(b8, parts)}
        rss["batch8"] = peak_rss_mib()

    if args.h2h:
        row["head_to_head"] = head_to_head(codec, (SMOKE if args.smoke else FULL)[name][1], image, record, run)
    row["peak_rss_mib"] = rss
    return row


def batch_summary(b8: dict, parts: dict) -> dict:
    """Batch 8 against the same images one by one, and where an encode's time goes, from medians and from
    minima (on a loaded machine the minimum is the better estimate of the uncontended time)."""
    out = {}
    for stat, suffix in (("median_s", ""), ("min_s", "_from_min")):
        one_by_one, batched = b8["batch1_x8"][stat], b8["batch8"][stat]
        per_image = one_by_one / BATCH
        ga1, ga8 = parts["g_a_b1_x8"][stat] / BATCH, parts["g_a_b8"][stat] / BATCH
        out |= {
            f"img_per_s_b1{suffix}": 1 / per_image,
            f"img_per_s{suffix}": BATCH / batched,
            f"speedup_over_b1{suffix}": one_by_one / batched,
            f"g_a_per_image_b1_s{suffix}": ga1,
            f"g_a_per_image_b8_s{suffix}": ga8,
            f"g_a_share_of_b1_encode{suffix}": ga1 / per_image,
            f"entropy_share_of_b1_encode{suffix}": parts["entropy_encode"][stat] / per_image,
            # Amdahl: even if batching made g_a free, everything after it still runs once per image.
            f"speedup_bound_if_g_a_free{suffix}": per_image / max(per_image - ga1, 1e-9),
        }
    out["speedup_median_of_rounds"] = statistics.median(
        a / b for a, b in zip(b8["batch1_x8"]["samples_s"], b8["batch8"]["samples_s"]))
    return out


def head_to_head(codec, config: dict, image, record, run: dict) -> dict:
    """CompressAI's own coding of the same image with the same weights, as examples/codec.py does it.

    CompressAI's side is a fresh model of CompressAI's class with the codec's state dict (entropy tables included),
    not comneck's loaded model object: that one decodes through comneck's rANS decoder and scale-index search
    (``codecs.rans.bound_entropy_decoders``), which would put comneck's code on both sides."""
    import torch
    from compressai.registry import MODELS
    from compressai.zoo import models as zoo_models

    from comneck_cli import coding as api
    from comneck_cli.io.images import from_tensor, to_tensor
    from comneck_cli.formats import PAD_MULTIPLE, pack, unpack

    height, width = image.shape[:2]
    model = MODELS[codec.name](**config).eval()
    model.load_state_dict(codec.model.state_dict())

    def cai_encode():
        x = to_tensor(image, PAD_MULTIPLE)  # the example pads centred with zeros to 64, as comneck does
        with torch.no_grad():
            return model.compress(x)

    # warm-up calls: CompressAI's fresh model builds its kernels on its first call
    out, enc = measure({"comneck": lambda: api.encode(image, codec), "compressai": cai_encode}, **run)
    cai = out["compressai"]
    cai_strings = [s[0] for s in cai["strings"]]

    def cai_decode():
        with torch.no_grad():
            x_hat = model.decompress(cai["strings"], cai["shape"])["x_hat"]
        return from_tensor(x_hat, height, width, PAD_MULTIPLE)

    out, dec = measure({"comneck": lambda: api.decode(record, codec), "compressai": cai_decode}, **run)
    payload = sum(len(s) for s in cai_strings)
    shape = cai["shape"]
    writable = codec.name in zoo_models and len(shape) == 2 and not isinstance(shape, dict)
    header = compressai_header_bytes(len(cai_strings))
    return {
        # against the strings a reader of the .cnk file gets back, not only the in-memory record
        "payload_identical": cai_strings == list(unpack(pack(record)).strings),
        "decoded_identical": bool((out["comneck"] == out["compressai"]).all()),
        "strings": len(cai_strings),
        "payload_bytes": payload,
        "comneck_overhead_bytes": record.overhead_bytes(),
        "compressai_header_bytes": header,
        "compressai_example_can_write": writable,
        "compressai_model_id": list(zoo_models).index(codec.name) if codec.name in zoo_models else None,
        "encode": enc, "decode": dec,
        "encode_ratio": ratio(enc), "decode_ratio": ratio(dec),
    }


def ratio(stats: dict) -> dict:
    """comneck / CompressAI: ratio of medians, and the median of per-round ratios (robust to drifting load)."""
    a, b = stats["comneck"], stats["compressai"]
    pairs = [x / y for x, y in zip(a["samples_s"], b["samples_s"])]
    return {"of_medians": a["median_s"] / b["median_s"], "of_mins": a["min_s"] / b["min_s"],
            "median_of_rounds": statistics.median(pairs)}


# --------------------------------------------------------------------------- parent-side sections


def traditional(workdir: Path, sizes, target_bpp: float, repeat: int, budget: float) -> list[dict]:
    """Pillow JPEG (libjpeg-turbo, 4:2:0) and WebP (method 4) at the quality whose bpp is closest to the target."""
    import io

    import numpy as np
    from PIL import Image

    rows = []
    for size in sizes:
        path = workdir / f"image-{label(size)}-0.png"
        image = Image.open(path).convert("RGB")
        pixels = image.width * image.height
        for fmt, (lo, hi) in (("JPEG", (1, 95)), ("WEBP", (0, 100))):
            def encode(q, fmt=fmt):
                buf = io.BytesIO()
                image.save(buf, fmt, quality=q)
                return buf.getvalue()

            bpp = {}

            def bpp_at(q):
                if q not in bpp:
                    bpp[q] = 8 * len(encode(q)) / pixels
                return bpp[q]

            a, b = lo, hi  # smallest quality whose bpp reaches the target, then the closer of it and q-1
            while a < b:
                mid = (a + b) // 2
                a, b = (mid + 1, b) if bpp_at(mid) < target_bpp else (a, mid)
            quality = min({a, max(lo, a - 1)}, key=lambda q: abs(bpp_at(q) - target_bpp))
            data = encode(quality)

            def decode(data=data):
                with Image.open(io.BytesIO(data)) as im:
                    return np.asarray(im.convert("RGB"))

            _, stats = measure({"encode": lambda: encode(quality), "decode": decode}, repeat, budget)
            err = np.asarray(image, dtype=np.float64) - decode().astype(np.float64)
            psnr = 10 * np.log10(255**2 / max(np.mean(err**2), 1e-12))
            rows.append({"format": fmt, "size": label(size), "quality": quality, "bytes": len(data),
                         "bpp": 8 * len(data) / pixels, "target_bpp": target_bpp, "psnr_db": psnr,
                         "qualities_tried": len(bpp), "encode": stats["encode"], "decode": stats["decode"]})
    return rows


HEAVY = ("torch", "numpy", "compressai", "open_clip", "PIL", "rich", "safetensors", "click")
_PROBE = """
import json, sys
from comneck_cli.cli import main
try:
    main(sys.argv[2:], prog_name="comneck")
except SystemExit:
    pass
with open(sys.argv[1], "w") as f:
    json.dump([m for m in {heavy!r} if m in sys.modules], f)
"""


def startup(cnk: Path, repeat: int, workdir: Path) -> dict:
    """Wall time of the CLI as a user starts it, which heavy modules it loads, and its costliest imports."""
    commands = {}
    on_path = shutil.which("comneck")
    entry = Path(sys.executable).parent / "comneck"
    launchers = {"python -m comneck_cli": [sys.executable, "-m", "comneck_cli"]}
    if on_path:
        launchers["comneck"] = [on_path]  # the first on this process's PATH; its path is in the JSON
    if entry.is_file() and (not on_path or Path(on_path).resolve() != entry.resolve()):
        launchers["comneck (entry script beside python)"] = [str(entry)]
    shim = bool(on_path) and Path(on_path).read_bytes()[:64].startswith(b"#!/usr/bin/env bash")
    for launcher, argv in launchers.items():
        for args in (["--help"], ["info", str(cnk)]):
            cmd = argv + args
            subprocess.run(cmd, capture_output=True, check=True)  # warm the file cache
            times = []
            for _ in range(repeat):
                start = time.perf_counter()
                subprocess.run(cmd, capture_output=True, check=True)
                times.append(time.perf_counter() - start)
            commands[f"{launcher} {args[0]}"] = {"median_s": statistics.median(times), "min_s": min(times),
                                                 "runs": repeat, "samples_s": [round(t, 4) for t in times]}
    loaded = {}
    for args in (["--help"], ["info", str(cnk)]):
        marker = workdir / "modules.json"
        subprocess.run([sys.executable, "-c", _PROBE.format(heavy=HEAVY), str(marker), *args],
                       capture_output=True, check=True)
        loaded[args[0]] = json.loads(marker.read_text())
    baseline = []
    for _ in range(repeat):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-c", "pass"], check=True)
        baseline.append(time.perf_counter() - start)
    return {
        "commands": commands,
        "comneck_on_path": _home_relative(on_path),
        "comneck_entry_script": _home_relative(entry) if entry.is_file() else None,
        "path_comneck_is_pyenv_shim": shim,
        "python_c_pass_median_s": statistics.median(baseline),
        "heavy_modules_loaded": loaded,
        "torch_imported": {k: "torch" in v for k, v in loaded.items()},
        "importtime": {a[0]: importtime([sys.executable, "-X", "importtime", "-m", "comneck_cli", *a])
                       for a in (["--help"], ["info", str(cnk)])},
    }


def coding_startup(workdir: Path, image: Path, size: tuple[int, int], repeat: int, warmup: bool = True) -> dict:
    """`comneck encode`, `decode` and `features` of one image as a user starts them (issue #20): the shipped default
    codec, and for features a random-weight neck and ViT-S/32 registered in a temporary COMNECK_HOME (offline).
    Each is timed beside ``python -c "import torch"`` in interleaved rounds, after an untimed round that warms the
    file cache (with ``warmup``), so the ratio to importing torch holds on a machine whose load drifts; the ratio
    is the median of the per-round ratios."""
    made, error = run_child(["--child", "startup-models", "--workdir", str(workdir), "--size", label(size)],
                            timeout=600)
    if error:
        return {"error": f"preparing the neck and CLIP failed: {error}"}
    env = {**os.environ, "COMNECK_HOME": str(workdir / "startup-home"), "HF_HUB_OFFLINE": "1"}
    comneck = [sys.executable, "-m", "comneck_cli"]
    clip_name = f"clip-{STARTUP_CLIP.lower()}-none"  # clip.tower.weights_entry_name(STARTUP_CLIP, None)
    subprocess.run(comneck + ["weights", "import", clip_name, made["clip"], "--kind", "clip"], env=env,
                   capture_output=True, check=True)
    cnk, png, feats = workdir / "startup.cnk", workdir / "startup.png", workdir / "startup-features.npy"
    commands = {
        'python -c "import torch"': [sys.executable, "-c", "import torch"],
        "comneck encode": comneck + ["encode", str(image), "-o", str(cnk), "--force"],
        "comneck decode": comneck + ["decode", str(cnk), "-o", str(png), "--force"],
        "comneck features": comneck + ["features", str(cnk), "-o", str(feats), "--neck", made["neck"], "--force"],
    }
    times: dict[str, list[float]] = {k: [] for k in commands}
    for round_ in range(repeat + warmup):
        for key, cmd in commands.items():
            start = time.perf_counter()
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
            elapsed = time.perf_counter() - start
            if proc.returncode != 0:
                last = (proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1]
                return {"error": f"{key} failed: {last}"}
            if round_ or not warmup:
                times[key].append(elapsed)
    base = times['python -c "import torch"']
    return {
        "image": image.name, "codec": "mbt2018-mean-vbr (shipped)", "features_clip": f"{STARTUP_CLIP} (random)",
        "commands": {key: {"median_s": statistics.median(v), "min_s": min(v), "runs": len(v),
                           "samples_s": [round(t, 4) for t in v],
                           "ratio_to_import_torch": statistics.median(a / b for a, b in zip(v, base))}
                     for key, v in times.items()},
    }


def importtime(cmd: list[str], top: int = 12) -> dict:
    """Parse ``-X importtime``: total, and the top-level imports (and heaviest modules) by cumulative time."""
    proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
    rows = []
    for line in proc.stderr.splitlines():
        m = re.match(r"import time:\s+(\d+) \|\s+(\d+) \|( *)(\S+)", line)
        if m:
            rows.append({"module": m[4], "self_us": int(m[1]), "cumulative_us": int(m[2]),
                         "depth": len(m[3]) // 2})
    top_level = sorted((r for r in rows if r["depth"] == 0), key=lambda r: -r["cumulative_us"])
    return {
        "total_us": sum(r["self_us"] for r in rows),
        "modules": len(rows),
        "top_level": top_level[:top],
        "by_self": sorted(rows, key=lambda r: -r["self_us"])[:top],
    }


def run_child(argv: list[str], timeout: float) -> tuple[dict | None, str | None]:
    try:
        proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), *argv], capture_output=True,
                              text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return None, f"timed out after {timeout:g} s"
    if proc.returncode != 0:
        return None, proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}"
    return json.loads(proc.stdout.strip().splitlines()[-1]), None


def features(workdir: Path, repeat: int, threads: int, timeout: float) -> dict:
    """benchmarks/features_paths.py as it is (ELIC + ViT-L/14, one 256² image, each path in its own process)."""
    out = workdir / "features_paths.json"
    try:
        proc = subprocess.run([sys.executable, str(FEATURES_PATHS), "--repeat", str(repeat),
                               "--threads", str(threads), "-o", str(out)],
                              capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:g} s"}
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1]}
    return json.loads(out.read_text())


# --------------------------------------------------------------------------- report


def report_tables(report: dict) -> tuple[str, list[tuple[str, list[str], list[list[str]]]], list[str]]:
    """The report as (headline, [(title, columns, rows)], notes): one source for the terminal and for Markdown."""
    m = report["machine"]
    headline = (f"{report['date']}, {m['cpu_count']} CPUs ({m['platform']}), Python {m['python']}, torch "
                f"{m.get('torch')} with {m.get('torch_threads')} threads, load average {m['loadavg_start']} -> "
                f"{m['loadavg_end']}" + (", SMOKE: tiny codecs" if report["smoke"] else ""))
    tables, notes = [], []
    if report.get("noisy"):
        notes.append(f"warning: {report['noisy']}")

    rows = []
    for r in report["codecs"]:
        if "error" in r:
            rows.append([r["codec"], r["size"], f"error: {r['error'][:70]}"] + [""] * 9)
            continue
        b8, rss = r["batch8"], r["peak_rss_mib"]
        rows.append([r["codec"], r["size"], f"{r['encode']['median_s']:.3f}", f"{r['decode']['median_s']:.3f}",
                     f"{r['g_a']['median_s']:.3f}", f"{r['g_s']['median_s']:.3f}", f"{r['encode_img_per_s_b1']:.2f}",
                     f"{b8['img_per_s']:.2f}" if "img_per_s" in b8 else "skipped",
                     f"{b8['speedup_over_b1']:.2f}" if "img_per_s" in b8 else "-",
                     f"{rss['batch1']:.0f} / {rss['batch8']:.0f}" if "batch8" in rss else f"{rss['batch1']:.0f} / -",
                     str(r["payload_bytes"]), str(r["overhead_bytes"])])
    tables.append(("Codecs: random weights, medians in s; b8/b1 = the same 8 images batched vs one by one",
                   ["codec", "size", "encode", "decode", "g_a", "g_s", "enc img/s b1", "enc img/s b8", "b8/b1",
                    "peak RSS MiB b1 / b8", "payload B", "overhead B"], rows))

    rows = []
    for r in report["codecs"]:
        x = r.get("head_to_head")
        if x:
            header = str(x["compressai_header_bytes"]) + ("" if x["compressai_example_can_write"] else " (cannot write)")
            rows.append([r["codec"], r["size"], str(x["payload_identical"]).lower(),
                         str(x["decoded_identical"]).lower(), str(x["payload_bytes"]), str(x["comneck_overhead_bytes"]),
                         header, f"{x['encode_ratio']['median_of_rounds']:.2f}",
                         f"{x['decode_ratio']['median_of_rounds']:.2f}"])
    tables.append(("Head to head with CompressAI's compress/decompress (same model, weights and image; time ratios "
                   "comneck / CompressAI, median of interleaved rounds)",
                   ["codec", "size", "payload identical", "decoded identical", "payload B", "comneck overhead B",
                    "CompressAI header B", "encode ratio", "decode ratio"], rows))

    b = report.get("batch")
    if b and "img_per_s" in b["batch8"]:
        x = b["batch8"]
        notes.append(
            f"Batch ({b['codec']} {b['size']}, the same {BATCH} images, interleaved; medians, minima in brackets): "
            f"{x['img_per_s']:.2f} ({x['img_per_s_from_min']:.2f}) img/s at batch {BATCH} vs {x['img_per_s_b1']:.2f} "
            f"({x['img_per_s_b1_from_min']:.2f}) one by one = {x['speedup_over_b1']:.2f}x "
            f"({x['speedup_over_b1_from_min']:.2f}x). g_a per image {x['g_a_per_image_b1_s']:.3f} "
            f"({x['g_a_per_image_b1_s_from_min']:.3f}) s at batch 1 = {100 * x['g_a_share_of_b1_encode']:.0f}% "
            f"({100 * x['g_a_share_of_b1_encode_from_min']:.0f}%) of an encode, {x['g_a_per_image_b8_s']:.3f} "
            f"({x['g_a_per_image_b8_s_from_min']:.3f}) s at batch {BATCH}; after g_a (h_a, h_s, entropy coding) "
            f"{x['entropy_encode']['median_s']:.3f} ({x['entropy_encode']['min_s']:.3f}) s per image. Bound if "
            f"batching made g_a free: {x['speedup_bound_if_g_a_free']:.2f}x ({x['speedup_bound_if_g_a_free_from_min']:.2f}x).")

    f = report["features_paths"]
    if "rows" in f:
        tables.append((f"Feature paths: ELIC + ViT-L/14, one 256×256 image ({f['cnk_bytes']} B .cnk), "
                       f"reconstruction / neck = {f['reconstruction_over_neck']:.2f}",
                       ["path", "median s", "min s", "runs", "peak RSS MiB"],
                       [[r["path"], f"{r['median_s']:.3f}", f"{r['min_s']:.3f}", str(r["runs"]),
                         f"{r['peak_rss_mib']:.0f}"] for r in f["rows"]]))
    else:
        notes.append(f"Feature paths: {f.get('skipped') or f.get('error')}")

    tables.append((f"Pillow at the quality whose bpp is closest to {report['settings']['target_bpp']} (binary search)",
                   ["format", "size", "quality", "bpp", "PSNR dB", "encode ms", "decode ms"],
                   [[r["format"], r["size"], str(r["quality"]), f"{r['bpp']:.3f}", f"{r['psnr_db']:.2f}",
                     f"{1e3 * r['encode']['median_s']:.1f}", f"{1e3 * r['decode']['median_s']:.1f}"]
                    for r in report["traditional"]]))

    s = report["startup"]
    rows = [[cmd, f"{v['median_s']:.3f}"] for cmd, v in s["commands"].items()]
    rows.append(["python -c pass (the interpreter alone)", f"{s['python_c_pass_median_s']:.3f}"])
    tables.append(("Start-up (subprocess wall time, median)", ["command", "median s"], rows))
    coding = s.get("coding", {})
    if "commands" in coding:
        tables.append((f"Start-up of the coding commands on {coding['image']} ({coding['codec']}; features: a neck "
                       f"and {coding['features_clip']}), interleaved with importing torch",
                       ["command", "median s", "÷ import torch"],
                       [[cmd, f"{v['median_s']:.3f}", f"{v['ratio_to_import_torch']:.2f}"]
                        for cmd, v in coding["commands"].items()]))
    elif coding:
        notes.append(f"Start-up of the coding commands: {coding['error']}")
    notes.append(f"heavy modules imported: {s['heavy_modules_loaded']}")
    return headline, tables, notes


def left(index: int, column: str) -> bool:
    return index == 0 or column in ("size", "format")


def print_report(report: dict, markdown: bool = False) -> None:
    headline, tables, notes = report_tables(report)
    if markdown:
        print(headline + "\n")
        for title, columns, rows in tables:
            print(f"{title}:\n")
            print("| " + " | ".join(columns) + " |")
            print("|" + "|".join("---" if left(i, c) else "---:" for i, c in enumerate(columns)) + "|")
            for row in rows:
                print("| " + " | ".join(row) + " |")
            print()
        for note in notes:
            print(note + "\n")
        return
    from rich.console import Console
    from rich.table import Table

    console = Console()
    if not console.is_terminal:
        console.width = 160
    console.print(f"comneck benchmark {headline}", markup=False)
    for title, columns, rows in tables:
        table = Table(title=title)
        for i, col in enumerate(columns):
            table.add_column(col, justify="left" if left(i, col) else "right")
        for row in rows:
            table.add_row(*row)
        console.print(table)
    for note in notes:
        console.print(note, markup=False)


def machine_info() -> dict:
    import PIL

    return {"cpu_count": os.cpu_count(), "platform": platform.platform(), "processor": platform.processor(),
            "python": platform.python_version(), "pillow": PIL.__version__,
            "loadavg_start": [round(v, 2) for v in os.getloadavg()]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=5, help="Timed runs per measurement (after one warm-up).")
    parser.add_argument("--budget", type=float, default=5.0,
                        help="Seconds of timed runs per measurement before it stops repeating (at least one run).")
    parser.add_argument("--batch-budget", type=float, default=20.0,
                        help="Skip batch 8 where 8 × the batch-1 encode exceeds this many seconds.")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads in every child. Default: the CPU count (1 with --smoke). On a loaded "
                             "machine 1 is far steadier: OpenMP threads that wait on a descheduled sibling stall.")
    parser.add_argument("--target-bpp", type=float, default=0.5, help="bpp that JPEG and WebP qualities aim at.")
    parser.add_argument("--codecs", nargs="+", default=list(FULL), choices=list(FULL))
    parser.add_argument("--h2h-all-sizes", action="store_true",
                        help="Head to head with CompressAI at every size (default: the first size only).")
    parser.add_argument("--no-features", action="store_true", help="Skip the ViT-L/14 feature paths.")
    parser.add_argument("--smoke", action="store_true",
                        help="Tiny codec configs, 64×64 images, 1 repeat, no ViT-L: checks the script, not speed.")
    parser.add_argument("-o", "--output", type=Path, default=HERE / "results" / "run.json")
    parser.add_argument("--markdown", action="store_true", help="Print the tables as Markdown (for the README).")
    parser.add_argument("--show", type=Path, metavar="JSON", help="Print the tables of an earlier run; run nothing.")
    parser.add_argument("--child", choices=("prepare", "codec", "startup-models"), help=argparse.SUPPRESS)
    parser.add_argument("--workdir", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--codec", help=argparse.SUPPRESS)
    parser.add_argument("--size", help=argparse.SUPPRESS)
    parser.add_argument("--h2h", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.repeat < 1 or args.budget < 0:
        parser.error("--repeat must be at least 1 and --budget not negative")
    if args.smoke:
        args.repeat = 1
    if args.threads is None:
        args.threads = 1 if args.smoke else os.cpu_count()
    if args.show:
        print_report(json.loads(args.show.read_text()), args.markdown)
        return
    if args.child == "prepare":
        print(json.dumps(child_prepare(args.workdir, args.smoke)))
        return
    if args.child == "codec":
        print(json.dumps(child_codec(args)))
        return
    if args.child == "startup-models":
        print(json.dumps(child_startup_models(args.workdir, parse_size(args.size))))
        return

    began = time.perf_counter()
    sizes = SMOKE_SIZES if args.smoke else SIZES
    report: dict[str, Any] = {
        "benchmark": "run", "smoke": args.smoke, "date": time.strftime("%Y-%m-%d %H:%M"),
        "machine": machine_info(),
        "settings": {"repeat": args.repeat, "budget_s": args.budget, "batch_budget_s": args.batch_budget,
                     "threads": args.threads, "target_bpp": args.target_bpp, "batch": BATCH,
                     "sizes": [label(s) for s in sizes], "weights": "random (seed 0): timings only",
                     "configs": {k: {"quality": q, **c} for k, (q, c) in (SMOKE if args.smoke else FULL).items()}},
    }
    failures = []

    def log(message: str) -> None:
        print(f"[{time.perf_counter() - began:6.1f} s] {message}", file=sys.stderr, flush=True)

    with tempfile.TemporaryDirectory(prefix="comneck-bench-") as tmp:
        workdir = Path(tmp)
        common = ["--workdir", str(workdir)] + (["--smoke"] if args.smoke else [])
        log("preparing codecs and images")
        prepared, error = run_child(["--child", "prepare", *common], timeout=600)
        if error:
            raise SystemExit(f"run.py: preparing codecs failed: {error}")
        report["images"] = prepared["images"]

        rows = []
        for size in sizes:
            for name in args.codecs:
                log(f"{name} {label(size)}")
                h2h = args.h2h_all_sizes or size == sizes[0]
                child_start = time.perf_counter()
                row, error = run_child(
                    ["--child", "codec", *common, "--codec", name, "--size", label(size),
                     "--repeat", str(args.repeat), "--budget", str(args.budget),
                     "--batch-budget", str(args.batch_budget), "--threads", str(args.threads)]
                    + (["--h2h"] if h2h else []),
                    timeout=900,
                )
                if error:
                    failures.append(f"{name} {label(size)}: {error}")
                    row = {"codec": name, "size": label(size), "error": error}
                row["child_wall_s"] = time.perf_counter() - child_start  # process start, imports and all
                rows.append(row)
        report["codecs"] = rows
        ok = [r for r in rows if "error" not in r]
        if ok:
            report["machine"]["torch"] = ok[0]["torch"]
            report["machine"]["torch_threads"] = ok[0]["torch_threads"]
        report["batch"] = next((r for r in ok if r["codec"] == BATCH_ANALYSIS and r["size"] == label(sizes[0])),
                               None)

        if args.smoke or args.no_features:
            report["features_paths"] = {"skipped": "--smoke" if args.smoke else "--no-features"}
        else:
            log("feature paths (benchmarks/features_paths.py)")
            report["features_paths"] = features(workdir, args.repeat, args.threads, timeout=900)
            if "error" in report["features_paths"]:
                failures.append(f"features_paths: {report['features_paths']['error']}")

        log("JPEG and WebP")
        report["traditional"] = traditional(workdir, sizes, args.target_bpp, args.repeat, args.budget)

        log("start-up")
        cnk = next((workdir / f"{r['codec']}-{r['size']}.cnk" for r in ok), None)
        if cnk is None:
            raise SystemExit("run.py: no codec configuration succeeded; nothing to run `comneck info` on")
        report["startup"] = startup(cnk, 1 if args.smoke else 5, workdir)
        report["startup"]["coding"] = coding_startup(workdir, workdir / f"image-{label(sizes[0])}-0.png", sizes[0],
                                                     1 if args.smoke else 5, warmup=not args.smoke)
        if "error" in report["startup"]["coding"]:
            failures.append(f"start-up: {report['startup']['coding']['error']}")

    report["machine"]["loadavg_end"] = [round(v, 2) for v in os.getloadavg()]
    busiest = max(report["machine"]["loadavg_start"][0], report["machine"]["loadavg_end"][0])
    if busiest > 0.5 * (os.cpu_count() or 1):
        report["noisy"] = (f"1-minute load average reached {busiest:.1f} on {os.cpu_count()} CPUs: other work shared "
                           "the machine, so timings are noisy (compare min_s; rerun when quiet)")
    report["elapsed_s"] = time.perf_counter() - began
    report["failures"] = failures
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    print_report(report, args.markdown)
    print(f"wrote {args.output} in {report['elapsed_s']:.0f} s", file=sys.stderr)
    if failures:
        print("run.py: failed: " + "; ".join(failures), file=sys.stderr)
        raise SystemExit(1)


if __name__ == "__main__":
    main()
