"""Issue #33 ("Hostile inputs, round 2") items 2-7 and issue #32 items 6 and 9: nothing hangs, nothing allocates what a
file asks, every crafted input is one error line. Every input is generated here from its description in the issues."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from comneck_cli.cli import main
from comneck_cli.errors import ModelFileError
from comneck_cli.formats import CODEC_IDS, pack, read_file


def run(*args, input=None):
    result = CliRunner().invoke(main, [str(a) for a in args], input=input, catch_exceptions=False)
    assert "Traceback" not in result.stderr and "Traceback" not in result.stdout
    return result


def errors(result) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.startswith("comneck: error:")]


def noise(path: Path, height: int = 64, width: int = 64, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), np.uint8)).save(path)
    return path


def altered(source: Path, target: Path, tensors: dict | None = None, meta: dict | None = None) -> Path:
    """``source`` (a safetensors model file) with some tensors or metadata entries replaced."""
    with safe_open(str(source), "pt") as f:
        metadata = dict(f.metadata() or {})
    save_file({**load_file(str(source)), **(tensors or {})}, str(target), metadata={**metadata, **(meta or {})})
    return target


@pytest.fixture
def mbt(codec_files):
    return codec_files["mbt2018-mean"]


def _scaled(path: Path, name: str, value: float) -> dict:
    tensor = load_file(str(path))[name].clone()
    tensor.view(-1)[0] = value
    return {name: tensor}


# --------------------------------------------------------------------------- item 2: hangs
@pytest.mark.parametrize("name,value", [("g_a.0.weight", float("nan")), ("h_a.0.weight", float("inf")),
                                        ("h_s.0.weight", float("-inf"))])
def test_codec_files_with_non_finite_weights_are_refused_at_import_and_load(mbt, tmp_path, name, value):
    bad = altered(mbt, tmp_path / "bad.safetensors", _scaled(mbt, name, value))
    result = run("weights", "import", "mbt2018-mean-q1", bad)
    assert result.exit_code == 1 and errors(result) == [
        f"comneck: error: codec weights {bad} is damaged: tensor {name} holds NaN or infinite values; re-export the "
        "codec or fetch the file again"]
    result = run("encode", noise(tmp_path / "x.png"), "--codec", "mbt2018-mean", "-q", "1", "--weights", bad)
    assert result.exit_code == 1 and "holds NaN or infinite values" in errors(result)[0]
    assert not (tmp_path / "x.cnk").exists()


@pytest.mark.parametrize("gain", [0.0, float("nan")])
def test_a_variable_rate_codec_with_a_zero_or_nan_gain_is_refused(tmp_path, gain):
    from compressai.registry import MODELS

    from comneck_cli.codecs import save_codec

    torch.manual_seed(0)
    model = MODELS["mbt2018-mean-vbr"](N=8, M=12).eval()
    with torch.no_grad():
        model.Gain[3] = gain
    path = tmp_path / "vbr.safetensors"
    save_codec(model, path, "mbt2018-mean-vbr", 0, {"N": 8, "M": 12})
    result = run("weights", "import", "mbt2018-mean-vbr", path)
    assert result.exit_code == 1 and ("Gain" in errors(result)[0])


def test_a_release_file_with_nan_in_g_a_is_refused(tmp_path):
    from tests.test_comneck_release import _layout, _save_release

    codec, neck = _layout()
    codec = {**codec, "g_a.0.weight": torch.full(codec["g_a.0.weight"].shape, float("nan"))}
    path = _save_release(tmp_path / "d1_1.pth.tar", codec, neck)
    result = run("weights", "import-comneck", path)
    assert result.exit_code == 1 and errors(result) == [
        f"comneck: error: release file ('state_dict') {path} is damaged: tensor g_a.0.weight holds NaN or infinite "
        "values; download it again"]


def test_encoding_always_ends_when_finite_weights_overflow_the_latents(mbt, tmp_path):
    """Weights 1e30 times too large pass the finite check, and g_a overflows to inf and NaN: CompressAI's encoder
    spun forever on the INT_MIN symbols. A child process, so that a hang is a failed test, not a stuck suite."""
    big = altered(mbt, tmp_path / "big.safetensors", {"g_a.0.weight": load_file(str(mbt))["g_a.0.weight"] * 1e30})
    image = noise(tmp_path / "x.png")
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    done = subprocess.run([sys.executable, "-m", "comneck_cli", "encode", str(image), "--codec", "mbt2018-mean", "-q",
                           "1", "--weights", str(big)], capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert "cannot entropy-code this input: the codec's latents are not finite" in done.stderr
    assert not (tmp_path / "x.cnk").exists()


# --------------------------------------------------------------------------- item 3: sizes chosen by the file
def test_a_codec_config_larger_than_its_tensors_is_refused_before_building(mbt, tmp_path):
    bad = altered(mbt, tmp_path / "bad.safetensors", meta={"config": json.dumps({"N": 400000, "M": 12})})
    result = run("weights", "import", "mbt2018-mean-q1", bad)
    assert result.exit_code == 1 and errors(result) == [
        f"comneck: error: weights {bad} carry a codec config '{{\"N\": 400000, \"M\": 12}}' with a size of 400000, "
        "but no tensor in the file is that wide (at most 64); re-export the codec or fetch the file again"]


def _neck_file(folder: Path) -> Path:
    from comneck_cli.models.neck import NeckInfo, TransformNeck, save_neck

    torch.manual_seed(0)
    neck = TransformNeck(latent_channels=12, width=64, heads=4, grid=(4, 4))
    info = NeckInfo(codec="mbt2018-mean", quality=1, codec_digest="00112233", clip_model="m", clip_tag="t", k=2,
                    scenario="d1", config=neck.config)
    save_neck(neck, folder / "neck.safetensors", info)
    return folder / "neck.safetensors"


NECK_CONFIG = {"latent_channels": 12, "width": 64, "heads": 4, "grid": [4, 4], "mlp_ratio": 4.0}


@pytest.mark.parametrize("config,problem", [
    ("[" * 100_000 + "]" * 100_000, "has damaged metadata (RecursionError"),  # item 6
    (json.dumps({**NECK_CONFIG, "heads": 0}), "records a config that builds no model (integer modulo by zero)"),
    (json.dumps({**NECK_CONFIG, "width": 0}), "records a config that builds no model"),
    (json.dumps({**NECK_CONFIG, "mlp_ratio": float("inf")}),
     "records a config that builds no model (cannot convert float infinity to integer)"),
    (json.dumps({**NECK_CONFIG, "grid": [2**31, 2**31]}), "records a config that builds no model"),  # 16 EB asked
    (json.dumps({**NECK_CONFIG, "width": 1 << 22}),  # 40 GB asked: the meta build sees the shapes do not fit
     "holds tensors that do not fit its recorded config (tensor block.attn.in_proj_bias has shape [192], the config "
     "builds [12582912])"),
], ids=["nested", "no-heads", "no-width", "infinite-mlp", "huge-grid", "huge-width"])
def test_neck_metadata_that_builds_nothing_or_too_much_is_one_error(tmp_path, config, problem):
    from comneck_cli.models.neck import load_neck

    bad = altered(_neck_file(tmp_path), tmp_path / "bad.safetensors", meta={"config": config})
    with pytest.raises(ModelFileError, match="^neck .*bad.safetensors") as caught:
        load_neck(bad)
    assert problem in str(caught.value)


def test_nan_neck_weights_are_refused_not_turned_into_nan_features(tmp_path):  # item 7
    from comneck_cli.models.neck import load_neck

    good = _neck_file(tmp_path)
    bad = altered(good, tmp_path / "bad.safetensors", _scaled(good, "proj.weight", float("nan")))
    with pytest.raises(ModelFileError, match="tensor proj.weight holds NaN or infinite values; re-export the neck"):
        load_neck(bad)


# --------------------------------------------------------------------------- item 5: stdin is never read whole
class Endless(io.RawIOBase):
    """An endless stream of one byte value (``< /dev/zero``) that fails the test once more than 64 MiB are read."""

    def __init__(self, byte: bytes = b"\0", head: bytes = b"") -> None:
        self.byte, self.head, self.count = byte, head, 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        n = len(buffer)
        self.count += n
        assert self.count < 64 << 20, "stdin was read far past what any record or image can hold"
        data = (self.head + self.byte * n)[:n]
        self.head = self.head[n:]
        buffer[:n] = data
        return n


@pytest.mark.parametrize("command", [["decode", "-", "-o", "out.png"], ["features", "-", "-o", "f.pt"],
                                     ["encode", "-", "--codec", "mbt2018-mean", "-q", "1", "-o", "out.cnk"],
                                     ["features", "-", "--via", "uncompressed", "-o", "f.pt"]])
def test_endless_stdin_is_refused_at_its_first_bytes(tmp_path, monkeypatch, command):
    monkeypatch.chdir(tmp_path)
    stream = Endless()
    result = run(*command, input=io.BufferedReader(stream))
    assert result.exit_code == 1 and len(errors(result)) == 1 and stream.count <= 2 << 20
    assert not list(tmp_path.iterdir())


def test_an_endless_image_on_stdin_stops_at_the_pixel_limit(tmp_path, monkeypatch, mbt):
    monkeypatch.chdir(tmp_path)
    stream = Endless(b"\1", head=b"\x89PNG\r\n\x1a\n")
    result = run("encode", "-", "--codec", "mbt2018-mean", "-q", "1", "--weights", mbt, "-o", "out.cnk",
                 "--max-pixels", "100000", input=io.BufferedReader(stream))
    assert result.exit_code == 1 and errors(result) == [
        "comneck: error: stdin: more than 1848576 bytes, more than an image within the limit of 100000 pixels "
        "holds; if the input is trusted, raise --max-pixels"]
    assert stream.count < 4 << 20


# --------------------------------------------------------------------------- item 7: a damaged record in a stream
def _stream(tmp_path: Path, mbt: Path) -> tuple[Path, bytes]:
    """Three records, the second with a flipped byte (its CRC no longer matches)."""
    image = noise(tmp_path / "x.png")
    assert run("encode", image, "--codec", "mbt2018-mean", "-q", "1", "--weights", mbt).exit_code == 0
    good = (tmp_path / "x.cnk").read_bytes()
    bad = bytearray(good)
    bad[-6] ^= 0xFF
    (tmp_path / "s.cnk").write_bytes(good + bytes(bad) + good)
    return tmp_path / "s.cnk", good


def test_a_damaged_record_is_reported_and_the_good_ones_of_its_stream_are_decoded(tmp_path, mbt):
    stream, good = _stream(tmp_path, mbt)
    result = run("decode", stream, "--weights", mbt, "-o", f"{tmp_path}/out/")
    assert result.exit_code == 1 and errors(result) == [
        f"comneck: error: {stream}: record 2 (at byte {len(good)}): corrupt .cnk record (CRC mismatch): the file was "
        "damaged in transfer or storage"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["s_0001.png", "s_0003.png"]
    result = run("decode", "-", "--weights", mbt, "-o", f"{tmp_path}/piped/", input=stream.read_bytes())
    assert result.exit_code == 1 and sorted(p.name for p in (tmp_path / "piped").iterdir()) == [
        "stdin_0001.png", "stdin_0003.png"]


# --------------------------------------------------------------------------- item 7: decode's words, memory
def test_decode_errors_about_a_records_level_name_no_encoder_flag(tmp_path, mbt):
    record = read_file(_stream(tmp_path, mbt)[0].with_name("x.cnk"))[0]
    (tmp_path / "q.cnk").write_bytes(pack(replace(record, quality=99)))
    (tmp_path / "r.cnk").write_bytes(pack(replace(record, codec_id=CODEC_IDS["mbt2018-mean-vbr"], quality=3,
                                                  rate=60_000)))
    result = run("decode", tmp_path / "q.cnk", tmp_path / "r.cnk", "--weights", mbt, "-o", f"{tmp_path}/out/")
    assert result.exit_code == 1 and errors(result) == [
        f"comneck: error: {tmp_path / 'q.cnk'}: record holds quality 99, but codec mbt2018-mean has levels 1..8; the "
        "file is damaged or was written by another program",
        f"comneck: error: {tmp_path / 'r.cnk'}: record holds rate 60, but codec mbt2018-mean-vbr has levels 1..8; the "
        "file is damaged or was written by another program"]


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RLIMIT_AS as Linux applies it")
def test_running_out_of_memory_in_decode_is_said_so_not_called_a_corrupt_record(tmp_path, mbt):
    """A 4096×4096 record decodes within a few hundred MB; the child lowers its own address-space limit below that
    once the codec is loaded, so the allocation fails for real (no stub)."""
    from comneck_cli.codecs import load_codec
    from comneck_cli.coding import ImageEncoder

    codec = load_codec("mbt2018-mean", 1, weights=mbt)
    record = ImageEncoder(codec)([np.zeros((4096, 4096, 3), np.uint8)])[0]
    (tmp_path / "big.cnk").write_bytes(pack(record))
    child = f"""
import resource, sys, warnings
warnings.simplefilter("ignore")
from comneck_cli.cli import main
from comneck_cli.codecs import load_codec
load_codec("mbt2018-mean", 1, weights={str(mbt)!r})  # everything imported and loaded once before the limit
import torch; torch.zeros(1) + 1
with open("/proc/self/statm") as f:
    pages = int(f.read().split()[0])
limit = pages * resource.getpagesize() + (120 << 20)
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
sys.argv = ["comneck", "decode", {str(tmp_path / "big.cnk")!r}, "--weights", {str(mbt)!r},
            "-o", {str(tmp_path / "big.png")!r}]
main()
"""
    done = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert "not enough memory to" in done.stderr and "corrupt" not in done.stderr
    assert not (tmp_path / "big.png").exists()


# --------------------------------------------------------------------------- item 6/7: weights import names
def test_weights_import_checks_every_codec_name_and_its_quality_metadata(tmp_path, mbt):
    result = run("weights", "import", "mycodec", mbt, "--kind", "codec")
    assert result.exit_code == 2 and "a codec is registered as CODEC-qQUALITY" in result.stderr
    abc = altered(mbt, tmp_path / "abc.safetensors", meta={"quality": "abc"})
    result = run("weights", "import", "mbt2018-mean-q1", abc)
    assert result.exit_code == 1 and errors(result) == [
        f"comneck: error: codec weights {abc} have damaged metadata: quality 'abc' is not a whole number; export or "
        "import the file again"]
    nan = altered(mbt, tmp_path / "nan.safetensors", _scaled(mbt, "g_a.0.weight", float("nan")))
    assert run("weights", "import", "mbt2018-mean-q1-mine", nan, "--kind", "codec").exit_code == 1  # a variant name
    assert run("weights", "import", "mbt2018-mean-q1-mine", mbt, "--kind", "codec").exit_code == 0


# --------------------------------------------------------------------------- item 6: names and folders
LONG = "x" * 300


@pytest.mark.parametrize("command", [
    ["encode", "{image}", "-o", f"{LONG}.cnk"], ["encode", "{image}", "-o", f"{LONG}/"],
    ["decode", "{record}", "-o", f"{LONG}.png"], ["decode", "{record}", "-o", f"{LONG}/"],
    ["features", "{record}", "-o", f"{LONG}.pt"],
    ["batch", "encode", "--input", "{folder}", "--output", LONG],
])
def test_a_name_too_long_for_the_file_system_is_one_line(tmp_path, monkeypatch, mbt, command):
    monkeypatch.chdir(tmp_path)
    image = noise(tmp_path / "in" / "x.png")
    assert run("encode", image, "--codec", "mbt2018-mean", "-q", "1", "--weights", mbt).exit_code == 0
    values = {"image": image, "record": image.with_suffix(".cnk"), "folder": image.parent}
    args = [a.format(**values) for a in command]
    weights = ["--weights", mbt] if command[0] in ("decode", "batch") else []
    codec = ["--codec", "mbt2018-mean", "-q", "1", "--weights", mbt] if "encode" in command else []
    result = run(*args, *(codec or weights))
    assert result.exit_code == 1 and len(errors(result)) == 1 and "File name too long" in errors(result)[0]


def test_train_codec_into_a_run_folder_that_cannot_be_written_is_one_line(tmp_path, mbt):
    noise(tmp_path / "data" / "a.png")
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    result = run("train", "codec", "--codec", "mbt2018-mean", "-q", "1", "--data", tmp_path / "data", "--steps", "1",
                 "--config", '{"N": 8, "M": 12}', "--run-dir", blocker / "run", "-o", tmp_path / "out.safetensors")
    assert result.exit_code == 1 and errors(result) == [
        f"comneck: error: cannot write {blocker / 'run' / 'metrics.jsonl'}: Not a directory; pass a writable --run-dir"]
    assert not (tmp_path / "out.safetensors").exists()


# --------------------------------------------------------------------------- item 7 and #32.6: what images lose
def _png16(height: int, width: int, alpha: bool = False) -> bytes:
    """A 16-bit RGB(A) PNG, written chunk by chunk (Pillow writes no 16-bit colour PNG)."""
    import struct
    import zlib

    channels = 4 if alpha else 3
    row = (np.arange(width * channels, dtype=">u2") * 251).tobytes()
    raw = b"".join(b"\0" + row for _ in range(height))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 16, 6 if alpha else 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


def _conversions(data: bytes) -> list[str]:
    from comneck_cli.io.images import read_image

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        read_image(data, "in")
    return [str(w.message) for w in caught]


def test_a_16_bit_colour_png_warns_that_samples_are_reduced():
    assert _conversions(_png16(4, 5)) == ["in: 16-bit samples reduced to 8 bits"]


@pytest.mark.parametrize("fmt", ["GIF", "PNG", "WEBP", "TIFF"])
def test_animated_and_multi_page_images_warn_that_only_the_first_frame_is_encoded(fmt):
    frames = [Image.new("RGB", (16, 16), (60 * i, 0, 0)) for i in range(3)]
    buffer = io.BytesIO()
    frames[0].save(buffer, fmt, save_all=True, append_images=frames[1:])
    assert _conversions(buffer.getvalue()) == [
        "in: 3 frames or pages; only the first is encoded (for every frame, encode a folder of frames or a video)"]
    single = io.BytesIO()
    frames[0].save(single, fmt)
    assert _conversions(single.getvalue()) == []


def test_the_alpha_warning_says_what_happens_the_alpha_channel_is_discarded(tmp_path, mbt):
    """#32.6: the record of an RGBA image is that of its RGB channels (nothing is composited), and the warning says
    so."""
    rgb = np.random.default_rng(1).integers(0, 256, (64, 64, 3), np.uint8)
    alpha = np.full((64, 64, 1), 255, np.uint8)
    alpha[:32] = 0
    Image.fromarray(np.concatenate([rgb, alpha], axis=2), "RGBA").save(tmp_path / "a.png")
    Image.fromarray(rgb).save(tmp_path / "b.png")
    result = run("encode", tmp_path / "a.png", tmp_path / "b.png", "--codec", "mbt2018-mean", "-q", "1",
                 "--weights", mbt)
    assert result.exit_code == 0
    assert f"{tmp_path / 'a.png'}: transparency dropped (the alpha channel is discarded: transparent pixels keep " \
           "the colour stored under them)" in result.stderr
    assert (tmp_path / "a.cnk").read_bytes() == (tmp_path / "b.cnk").read_bytes()


# --------------------------------------------------------------------------- item 4 and #32.9: downloads
class Hostile:
    """A server on 127.0.0.1 whose every GET is answered by ``respond(handler)``: crafted headers and bodies."""

    def __init__(self, respond) -> None:
        import http.server
        import threading

        self.requests = []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                outer.requests.append(self.headers.get("Range"))
                try:
                    respond(self)
                except (BrokenPipeError, ConnectionResetError):  # the client gave up, as it should
                    pass

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/f.bin"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()


@pytest.fixture
def hostile(local_only):
    servers = []
    yield lambda respond: servers.append(Hostile(respond)) or servers[-1]
    for server in servers:
        server.httpd.shutdown()
        server.httpd.server_close()


from tests.test_fetch import local_only  # noqa: E402,F401  (the fixture that lets 127.0.0.1 through)

DATA = bytes(range(256)) * 1000


def _headers(handler, status: int, **headers) -> None:
    handler.send_response(status)
    for name, value in headers.items():
        handler.send_header(name.replace("_", "-"), value)
    handler.end_headers()


def _fetch(url: str, target: Path, **kwargs) -> str:
    from comneck_cli.hub.download import download

    return download(url, target, fix="run it", **kwargs)


def test_an_endless_body_stops_at_the_size_such_a_file_can_have(hostile, tmp_path):
    def endless(handler):
        _headers(handler, 200)
        while True:
            handler.wfile.write(b"\0" * 65536)

    from comneck_cli.hub.download import DownloadError

    server = hostile(endless)
    with pytest.raises(DownloadError, match=r"sent more than its 1048576 bytes; check the URL"):
        _fetch(server.url, tmp_path / "d" / "f.bin", max_bytes=1 << 20)
    assert (tmp_path / "d" / "f.bin.part").stat().st_size <= (1 << 20) + (1 << 20)  # at most one read past the cap


@pytest.mark.parametrize("length,problem", [
    (str(10**12), "is 1000000000000 bytes, more than such a file can be"),
    ("abc", "answered with an invalid Content-Length 'abc'"),
    ("-5", "answered with an invalid Content-Length '-5'"),
])
def test_a_length_over_the_cap_or_not_a_number_is_refused_before_any_byte_is_kept(hostile, tmp_path, length, problem):
    from comneck_cli.hub.download import DownloadError

    server = hostile(lambda handler: _headers(handler, 200, Content_Length=length))
    with pytest.raises(DownloadError, match=problem):
        _fetch(server.url, tmp_path / "d" / "f.bin", max_bytes=1 << 20)
    assert not (tmp_path / "d").exists()  # no part, and no folder made for it (#32.9)


def test_a_silent_or_trickling_server_is_given_up(hostile, tmp_path, monkeypatch):
    import time

    from comneck_cli.hub import download as module

    def silent(handler):
        _headers(handler, 200, Content_Length=str(len(DATA)))
        handler.wfile.write(DATA[:10])
        handler.wfile.flush()
        time.sleep(3)

    def trickle(handler):  # a byte every 50 ms, for 4 s: then it hangs up (an unbounded client stops there too)
        _headers(handler, 200, Content_Length=str(len(DATA)))
        for byte in DATA[:80]:
            handler.wfile.write(bytes([byte]))
            handler.wfile.flush()
            time.sleep(0.05)

    monkeypatch.setattr(module, "STALL_S", 1)
    with pytest.raises(module.DownloadError, match=r"stalled \(no data for 1 s\); run the command again to resume"):
        _fetch(hostile(silent).url, tmp_path / "a.bin")
    assert (tmp_path / "a.bin.part").read_bytes() == DATA[:10]  # kept, to resume
    monkeypatch.setattr(module, "DEADLINE_S", 1)
    with pytest.raises(module.DownloadError, match=r"took over 1 s and was given up at \d+ bytes"):
        _fetch(hostile(trickle).url, tmp_path / "b.bin")


def _ranged(first: int | None, status: int = 206):
    """A server that answers a range request with bytes from ``first`` (None: from where it was asked), or, with
    ``status`` 416, with ``Content-Range: bytes */len``."""
    def respond(handler):
        asked = int((handler.headers.get("Range") or "bytes=0-").removeprefix("bytes=").rstrip("-"))
        if status == 416 and asked:
            _headers(handler, 416, Content_Range=f"bytes */{len(DATA)}", Content_Length="0")
            return
        start = asked if first is None else first
        if not asked:
            _headers(handler, 200, Content_Length=str(len(DATA)))
        else:
            _headers(handler, 206, Content_Length=str(len(DATA) - start),
                     Content_Range=f"bytes {start}-{len(DATA) - 1}/{len(DATA)}")
        handler.wfile.write(DATA[start:])

    return respond


def test_ranges_are_checked_a_restart_at_zero_rewrites_and_an_early_start_is_refused(hostile, tmp_path):
    from comneck_cli.hub.download import DownloadError

    (tmp_path / "a.bin.part").write_bytes(DATA[:5000])
    _fetch(hostile(_ranged(0)).url, tmp_path / "a.bin")  # a 206 from byte 0: the whole file, not appended
    assert (tmp_path / "a.bin").read_bytes() == DATA
    (tmp_path / "b.bin.part").write_bytes(DATA[:5000])
    with pytest.raises(DownloadError, match=r"answered the request for bytes 5000- with the range 'bytes 4000-"):
        _fetch(hostile(_ranged(4000)).url, tmp_path / "b.bin")
    assert not (tmp_path / "b.bin").exists()


def test_a_416_completes_only_a_part_of_the_files_length(hostile, tmp_path):
    server = hostile(_ranged(None, status=416))
    (tmp_path / "a.bin.part").write_bytes(DATA)  # complete: named so without another byte
    _fetch(server.url, tmp_path / "a.bin")
    assert (tmp_path / "a.bin").read_bytes() == DATA and server.requests == [f"bytes={len(DATA)}-"]
    (tmp_path / "b.bin.part").write_bytes(DATA + b"junk")  # longer than the file: dropped, fetched afresh
    _fetch(server.url, tmp_path / "b.bin")
    assert (tmp_path / "b.bin").read_bytes() == DATA and server.requests[-2:] == [f"bytes={len(DATA) + 4}-", None]


def test_a_damaged_release_file_is_never_named_complete_nor_reused(hostile, tmp_path, monkeypatch):
    from comneck_cli.hub.download import DownloadError
    from comneck_cli.models.release import downloads_dir, fetch_release

    def garbage(handler):
        _headers(handler, 200, Content_Length="100")
        handler.wfile.write(b"\0" * 100)

    server = hostile(garbage)
    monkeypatch.setenv("COMNECK_RELEASE_URL", server.url.rsplit("/", 1)[0])
    with pytest.raises(DownloadError, match=r"the file downloaded from .*/d1_1.pth.tar is damaged \("):
        fetch_release(["d1_1.pth.tar"])
    assert not downloads_dir().exists()
    downloads_dir().mkdir(parents=True)
    (downloads_dir() / "d1_1.pth.tar").write_bytes(b"left by an older comneck")  # "complete", but not a release
    with pytest.raises(DownloadError, match="is damaged"):
        fetch_release(["d1_1.pth.tar"])
    assert server.requests == [None, None] and not list(downloads_dir().iterdir())


def test_a_failed_offline_fetch_leaves_no_empty_downloads_folder(tmp_path, monkeypatch):  # #32.9
    from comneck_cli.models.release import downloads_dir

    monkeypatch.delenv("COMNECK_RELEASE_URL", raising=False)
    home = Path(os.environ["COMNECK_HOME"])
    result = run("weights", "fetch", "comneck")
    assert result.exit_code == 1 and "cannot reach" in errors(result)[0]
    assert not downloads_dir().exists() and home.exists()


@pytest.mark.parametrize("command", ["encode", "decode"])
def test_an_endless_list_on_stdin_is_refused_at_its_first_line(tmp_path, monkeypatch, command):
    """`batch --input - < /dev/zero`: one endless line is no list of paths; refused once a path's length is passed."""
    from comneck_cli.cli.batch_commands import batch

    monkeypatch.chdir(tmp_path)
    stream = Endless()
    result = CliRunner().invoke(batch, [command, "--input", "-", "--output", "out"], input=io.BufferedReader(stream))
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    assert result.stderr.splitlines() == ["comneck: error: --input - is not a list of paths: a line longer than 4096 "
                                          "characters or with a NUL byte; give one path a line"]
    assert stream.count <= 2 << 20


def test_a_fifo_given_as_the_list_of_inputs_is_refused_unread(tmp_path):
    from comneck_cli.cli.batch_commands import batch

    fifo = tmp_path / "list.txt"
    os.mkfifo(fifo)
    result = CliRunner().invoke(batch, ["encode", "--input", str(fifo), "--output", str(tmp_path / "out")])
    assert result.exit_code == 1 and result.stderr.startswith(f"comneck: error: --input {fifo} is not a regular file")
