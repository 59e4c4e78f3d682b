"""`comneck serve` under load: N concurrent clients on 127.0.0.1 against the same work done by the CLI.

A codec of the real mbt2018-mean architecture at the zoo's size for qualities 1–4 (N=128, M=192, random weights:
timing only), a random neck for it and the tests' tiny open_clip ViT (tests/tiny_configs, 56 px), so the load is
the server's own (HTTP, queueing, batching, entropy decoding) more than CLIP's. ``--distinct`` 64×64 crops of
scikit-image photos are coded once; each is also run through ``comneck features REC -o F.npy`` in its own
process, which gives both the expected bytes and the CLI's cost per request. Then ``comneck serve --port 0``
starts, ``--clients`` threads send ``--requests`` POST /v1/features?format=npy in all (bounded by ``--time-limit``
seconds), and every answer is compared with the CLI's bytes: a lost answer (no response, not 200) or a wrong one (other bytes) is
counted, and both must be 0.

    python benchmarks/serve_load.py [--clients 8] [--requests 400] [--distinct 8] [-o benchmarks/results/serve_load.json]
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "tests" / "tiny_configs"
TINY_CLIP = "comneck-tiny-ViT-14"
BOOT = ("import sys, open_clip; open_clip.add_model_config(sys.argv.pop(1)); "
        "from comneck_cli.cli import main; main(prog_name='comneck')")
PHOTOS = ["astronaut.png", "coffee.png", "chelsea.png", "rocket.jpg", "motorcycle_left.png", "hubble_deep_field.jpg"]


def comneck(*args: object, env: dict, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", BOOT, str(CONFIGS), *map(str, args)], env=env, check=True,
                          capture_output=True, **kwargs)


def prepare(work: Path, distinct: int) -> list[str]:
    """The codec, CLIP and neck files and ``distinct`` coded crops; the CLI options that name the models."""
    import numpy as np
    import open_clip
    import skimage.data
    import torch
    from compressai.models import MeanScaleHyperprior
    from PIL import Image
    from safetensors.torch import save_file

    from comneck_cli import weights as registry
    from comneck_cli.codecs import save_codec
    from comneck_cli.models.neck import NeckInfo, TransformNeck, save_neck

    torch.manual_seed(0)
    config = {"N": 128, "M": 192}
    save_codec(MeanScaleHyperprior(**config).eval(), work / "codec.safetensors", "mbt2018-mean", 1, config)
    open_clip.add_model_config(CONFIGS)
    clip = open_clip.create_model(TINY_CLIP, pretrained=None)
    save_file({k: v.contiguous() for k, v in clip.state_dict().items()}, str(work / "clip.safetensors"))
    neck = TransformNeck(latent_channels=192, width=64, heads=4, grid=(4, 4))
    save_neck(neck, work / "neck.safetensors",
              NeckInfo(codec="mbt2018-mean", quality=1, codec_digest=registry.file_sha256(work / "codec.safetensors")[:8],
                       clip_model=TINY_CLIP, clip_tag="bench", k=2, scenario="d1", config=neck.config))
    folder = Path(skimage.data.__file__).parent
    rng = np.random.default_rng(0)
    for i in range(distinct):
        photo = np.asarray(Image.open(folder / PHOTOS[i % len(PHOTOS)]).convert("RGB"))
        top, left = (int(rng.integers(0, photo.shape[k] - 64 + 1)) for k in (0, 1))
        Image.fromarray(photo[top : top + 64, left : left + 64]).save(work / f"img{i}.png")
    return ["--neck", work / "neck.safetensors", "--clip-weights", work / "clip.safetensors",
            "--weights", work / "codec.safetensors"]


def post(port: int, body: bytes) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        conn.request("POST", "/v1/features?format=npy", body=body)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument("--distinct", type=int, default=8)
    parser.add_argument("--time-limit", type=float, default=300)
    parser.add_argument("--batch-wait", type=float, default=5, help="the server's --batch-wait, milliseconds")
    parser.add_argument("-o", "--output", type=Path, default=None)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        env = dict(os.environ, COMNECK_HOME=str(work / "home"), HF_HUB_OFFLINE="1")
        models = prepare(work, args.distinct)
        names = [work / f"img{i}.png" for i in range(args.distinct)]
        comneck("encode", *names, "--codec", "mbt2018-mean", "-q", "1", "--weights", work / "codec.safetensors",
                env=env)
        bodies = [n.with_suffix(".cnk").read_bytes() for n in names]
        cli_seconds, expected = [], []
        for i, name in enumerate(names):  # the CLI, one process per request, as a per-batch job runs today
            started = time.perf_counter()
            comneck("features", name.with_suffix(".cnk"), "-o", work / f"f{i}.npy", *models, env=env)
            cli_seconds.append(time.perf_counter() - started)
            expected.append((work / f"f{i}.npy").read_bytes())
        started = time.perf_counter()
        comneck("features", *[n.with_suffix(".cnk") for n in names], "-o", f"{work / 'all'}/", "--format", "npy",
                *models, env=env)
        cli_batch = time.perf_counter() - started

        server = subprocess.Popen([sys.executable, "-c", BOOT, str(CONFIGS), "serve", "--port", "0", "--batch-wait",
                                   str(args.batch_wait), *map(str, models)], env=env, stderr=subprocess.PIPE,
                                  stdout=subprocess.DEVNULL, text=True)
        line = ""
        while "serving on" not in line:
            line = server.stderr.readline()
            if not line and server.poll() is not None:
                raise SystemExit("the server did not start")
        threading.Thread(target=server.stderr.read, daemon=True).start()
        port = int(line.split("127.0.0.1:")[1].split()[0])
        for body in bodies:  # warm up: the models load on the first request
            post(port, body)

        latencies, lost, wrong = [], 0, 0
        lock = threading.Lock()
        deadline = time.monotonic() + args.time_limit
        counter = iter(range(args.requests))

        def client() -> None:
            nonlocal lost, wrong
            for i in counter:
                if time.monotonic() > deadline:
                    return
                begun = time.perf_counter()
                try:
                    status, body = post(port, bodies[i % len(bodies)])
                except (OSError, http.client.HTTPException):
                    status, body = 0, b""
                with lock:
                    latencies.append(time.perf_counter() - begun)
                    lost += status != 200
                    wrong += status == 200 and body != expected[i % len(bodies)]

        started = time.perf_counter()
        with ThreadPoolExecutor(args.clients) as pool:
            for _ in range(args.clients):
                pool.submit(client)
        wall = time.perf_counter() - started
        metrics = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        metrics.request("GET", "/metrics")
        text = metrics.getresponse().read().decode()
        server.terminate()
        server.wait(60)

    series = {ln.split()[0]: float(ln.split()[1]) for ln in text.splitlines() if ln.startswith("comneck_batch_size_")}
    result = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, {platform.platform()}",
        "date": time.strftime("%Y-%m-%d"),
        "clients": args.clients, "requests": len(latencies), "batch_wait_ms": args.batch_wait,
        "server_requests_per_s": round(len(latencies) / wall, 1),
        "p50_ms": round(1000 * statistics.median(latencies), 1),
        "p99_ms": round(1000 * percentile(latencies, 0.99), 1),
        "lost": lost, "wrong": wrong,
        "mean_batch": round(series.get("comneck_batch_size_sum", 0) / max(1, series.get("comneck_batch_size_count", 1)), 2),
        "cli_process_per_request_s": round(statistics.mean(cli_seconds), 2),
        "cli_requests_per_s": round(1 / statistics.mean(cli_seconds), 2),
        "cli_one_run_requests_per_s": round(len(names) / cli_batch, 2),
    }
    print(json.dumps(result, indent=2))
    if args.output:
        args.output.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
