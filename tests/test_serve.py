"""`comneck serve` against real server processes on 127.0.0.1: the endpoints answer what the CLI writes, byte for
byte, under concurrency and through hostile requests, and the process stops and restarts cleanly."""

from __future__ import annotations

import _socket
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from comneck_cli.cli import main
from tests.mllm_fixtures import llava_dir, mllm_neck  # noqa: F401 (fixtures)

pytest.importorskip("starlette", reason="the serve extra is not installed (pip install 'comneck[serve]')")
pytest.importorskip("uvicorn", reason="the serve extra is not installed (pip install 'comneck[serve]')")

CONFIGS = Path(__file__).parent / "tiny_configs"  # the tiny CLIP's open_clip config (conftest.tiny_clip_file)
TOKEN = "s3cret-token"


@pytest.fixture(autouse=True)
def loopback(_isolated, monkeypatch):
    """conftest forbids every connection; these tests need 127.0.0.1 (the server under test) and nothing else."""
    guarded = socket.socket.connect

    def connect(self, address):
        if self.family in (socket.AF_INET, socket.AF_INET6) and address[0] in ("127.0.0.1", "::1"):
            return _socket.socket.connect(self, address)
        return guarded(self, address)

    monkeypatch.setattr(socket.socket, "connect", connect)


def cli(*args, input=None):
    result = CliRunner().invoke(main, [str(a) for a in args], input=input, catch_exceptions=False)
    assert "Traceback" not in result.stderr
    return result


class Server:
    """``comneck serve --port 0 ARGS`` in a subprocess; its stderr is collected by a thread."""

    def __init__(self, *args, home: Path) -> None:
        env = dict(os.environ, COMNECK_HOME=str(home), HF_HUB_OFFLINE="1")
        self.proc = subprocess.Popen([sys.executable, "-m", "comneck_cli", "serve", "--port", "0",
                                      "--clip-config", str(CONFIGS), *map(str, args)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                     text=True, env=env)
        self.lines: list[str] = []
        self.ready = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()
        if not self.ready.wait(180) or self.proc.poll() is not None:
            self.stop()
            raise AssertionError("server did not start:\n" + "".join(self.lines))
        line = next(line for line in self.lines if "serving on" in line)
        self.port = int(line.split("serving on http://127.0.0.1:")[1].split()[0])

    def _read(self) -> None:
        for line in self.proc.stderr:
            self.lines.append(line)
            if "serving on" in line:
                self.ready.set()
        self.ready.set()

    def request(self, method: str, path: str, body: bytes | None = None, headers: dict | None = None,
                timeout: float = 60) -> tuple[int, dict, bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            conn.request(method, path, body=body, headers=headers or {})
            response = conn.getresponse()
            return response.status, dict(response.getheaders()), response.read()
        finally:
            conn.close()

    def post(self, path: str, body: bytes, token: str | None = TOKEN, **kw) -> tuple[int, dict, bytes]:
        return self.request("POST", path, body, {"Authorization": f"Bearer {token}"} if token else {}, **kw)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(30)


def error_of(status_headers_body) -> str:
    """The one-sentence JSON error of a refusal (never a traceback)."""
    status, headers, body = status_headers_body
    assert 400 <= status < 600 and headers["content-type"] == "application/json", (status, body)
    message = json.loads(body)["error"]
    assert "\n" not in message and "Traceback" not in message
    return message


@pytest.fixture(scope="module")
def records(tmp_path_factory, photos, codec_files) -> dict[str, bytes]:
    """Two 64×64 crops coded by `comneck encode` (4×4 latent grid = the tiny ViT's patch grid), and a 128×128 one."""
    folder = tmp_path_factory.mktemp("records")
    out = {}
    for key, box in (("astronaut", (100, 200, 64)), ("coffee", (100, 200, 64)), ("big", (0, 0, 128))):
        top, left, side = box
        photo = photos["coffee" if key == "big" else key]
        crop = np.asarray(Image.open(photo).convert("RGB"))[top : top + side, left : left + side]
        Image.fromarray(crop).save(folder / f"{key}.png")
        r = cli("encode", folder / f"{key}.png", "--codec", "mbt2018-mean", "-q", "1",
                "--weights", codec_files["mbt2018-mean"])
        assert r.exit_code == 0, r.stderr
        out[key] = (folder / f"{key}.cnk").read_bytes()
    return out


@pytest.fixture(scope="module")
def models(neck_file, tiny_clip_file, codec_files) -> list:
    return ["--neck", neck_file, "--clip-weights", tiny_clip_file, "--weights", codec_files["mbt2018-mean"]]


def cli_features(record: bytes, models: list, tmp_path: Path, suffix: str, *options) -> bytes:
    """What `comneck features - -o F` writes for the record on stdin."""
    out = tmp_path / f"cli-{len(list(tmp_path.iterdir()))}.{suffix}"
    r = cli("features", "-", "-o", out, *models, *options, input=record)
    assert r.exit_code == 0, r.stderr
    return out.read_bytes()


@pytest.fixture(scope="module")
def server(models, tmp_path_factory):
    """The shared server: a token, a small body limit, the CLI's pixel limit lowered to refuse the 128² record,
    and a batch window wide enough that concurrent requests share it."""
    folder = tmp_path_factory.mktemp("serve")
    (folder / "token").write_text(TOKEN + "\n")
    s = Server(*models, "--token-file", folder / "token", "--max-body", 65536, "--max-pixels", 5000,
               "--batch-wait", 200, home=folder / "home")
    yield s
    s.stop()


# --------------------------------------------------------------------------- the CLI's bytes
@pytest.mark.parametrize("fmt", ["safetensors", "npy"])
def test_features_are_the_cli_bytes(server, records, models, tmp_path, fmt):
    status, headers, body = server.post(f"/v1/features?format={fmt}", records["astronaut"])
    assert status == 200, body
    assert body == cli_features(records["astronaut"], models, tmp_path, fmt)
    status, _, body = server.post(f"/v1/features?format={fmt}&select=pooled&layer=-1", records["coffee"])
    assert status == 200, body
    expected = cli_features(records["coffee"], models, tmp_path, fmt, "--select", "pooled", "--layer", "-1")
    assert body == expected


def test_a_stream_gives_the_cli_stack_and_decode_the_cli_png(server, records, models, tmp_path):
    stream = records["astronaut"] + records["coffee"]
    status, _, body = server.post("/v1/features", stream)
    assert status == 200 and body == cli_features(stream, models, tmp_path, "safetensors")
    status, headers, png = server.post("/v1/decode", records["coffee"])
    assert status == 200 and headers["content-type"] == "image/png"
    r = cli("decode", "-", "-o", tmp_path / "d.png", "--weights", models[-1], input=records["coffee"])
    assert r.exit_code == 0 and png == (tmp_path / "d.png").read_bytes()
    assert "one record per request" in error_of(server.post("/v1/decode", stream))


def test_concurrent_requests_share_a_forward_pass_and_each_gets_its_own_answer(server, records, models, tmp_path):
    expected = {k: cli_features(records[k], models, tmp_path, "npy") for k in ("astronaut", "coffee")}
    before = server.request("GET", "/metrics", headers={"Authorization": f"Bearer {TOKEN}"})[2].decode()
    keys = ["astronaut", "coffee"] * 6
    with ThreadPoolExecutor(len(keys)) as pool:
        answers = list(pool.map(lambda k: server.post("/v1/features?format=npy", records[k]), keys))
    assert [a[0] for a in answers] == [200] * len(keys)
    assert all(body == expected[k] for k, (_, _, body) in zip(keys, answers))
    after = server.request("GET", "/metrics", headers={"Authorization": f"Bearer {TOKEN}"})[2].decode()

    def batches(text: str) -> tuple[float, float]:
        values = {line.split()[0]: float(line.split()[1]) for line in text.splitlines() if line.startswith("comneck_")}
        return values.get("comneck_batch_size_count", 0), values.get("comneck_batch_size_sum", 0)

    (n0, s0), (n1, s1) = batches(before), batches(after)
    assert s1 - s0 == len(keys) and n1 - n0 < len(keys)  # 12 requests in fewer forward passes
    assert 'comneck_requests_total{endpoint="features",status="200"}' in after
    for series in ("comneck_request_seconds_bucket", "comneck_queue_depth", "comneck_errors_total"):
        assert series in after


# --------------------------------------------------------------------------- hostile clients
def test_token_is_required_except_for_healthz(server, records):
    assert server.request("GET", "/healthz")[0] == 200
    for token in (None, "wrong", TOKEN + "x", TOKEN[:-1]):
        answer = server.post("/v1/features", records["astronaut"], token=token)
        assert answer[0] == 401 and answer[1]["www-authenticate"] == "Bearer"
        assert "Authorization: Bearer" in error_of(answer)
    assert server.request("GET", "/metrics")[0] == 401


def raw_exchange(port: int, head: bytes, chunks=(), timeout: float = 20) -> bytes:
    """Send ``head`` and ``chunks`` without finishing the body, then read what the server says."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(head)
        for chunk in chunks:
            sock.sendall(chunk)
        reply = b""
        while True:  # the head and the body may arrive in separate segments: read up to Content-Length
            head, _, body = reply.partition(b"\r\n\r\n")
            length = [int(line.split(b":")[1]) for line in head.lower().split(b"\r\n")
                      if line.startswith(b"content-length:")]
            if length and len(body) >= length[0]:
                return reply
            data = sock.recv(65536)
            if not data:
                return reply
            reply += data


def test_oversized_bodies_get_413_before_they_are_read_whole(server):
    auth = f"Authorization: Bearer {TOKEN}\r\n".encode()
    # A Content-Length over the limit: answered before one byte of the body arrives.
    head = b"POST /v1/features HTTP/1.1\r\nHost: x\r\n" + auth + b"Content-Length: 1000000000\r\n\r\n"
    reply = raw_exchange(server.port, head)
    assert reply.startswith(b"HTTP/1.1 413") and b"over this server's limit of 65536 bytes" in reply
    # Chunked, no length: refused once the count passes the limit, though the body never ends.
    head = b"POST /v1/features HTTP/1.1\r\nHost: x\r\n" + auth + b"Transfer-Encoding: chunked\r\n\r\n"
    chunk = b"%x\r\n%s\r\n" % (8192, b"C" * 8192)
    reply = raw_exchange(server.port, head, [chunk] * 9)
    assert reply.startswith(b"HTTP/1.1 413"), reply[:200]


def test_bad_records_get_one_sentence_and_the_server_goes_on(server, records):
    record = records["astronaut"]
    cases = {
        "not a .cnk": b"PNG\x89 surely not a record",
        "truncated": record[: len(record) // 2],
        "damaged": record[:-6] + bytes(b ^ 0xFF for b in record[-6:-3]) + record[-3:],
        "over the pixel limit": records["big"],
        "empty": b"",
    }
    for name, body in cases.items():
        answer = server.post("/v1/features", body)
        assert answer[0] == 400, (name, answer)
        error_of(answer)
    assert "5000 pixels" in error_of(server.post("/v1/features", records["big"]))
    assert "via must be one of" in error_of(server.post("/v1/features?via=nope", record))
    assert "unknown query parameter" in error_of(server.post("/v1/features?color=1", record))
    assert "for=llava sets layer -2" in error_of(server.post("/v1/features?for=llava&layer=3", record))
    assert server.post("/v1/ask?prompt=hi", record)[0] == 501  # started without --mllm
    assert server.request("GET", "/healthz")[0] == 200 and server.proc.poll() is None
    assert server.post("/v1/features", record)[0] == 200


def test_ask_answers_what_the_library_answers_to_each_request(records, codec_files, other_weights, photos,
                                                               tmp_path):
    """/v1/ask through comneck_cli.mllm (engineer C's tiny LLaVA): concurrent questions share one `ask` call and each
    gets the answer `comneck ask` gives for its record alone."""
    pytest.importorskip("transformers")
    from comneck_cli import weights as registry
    from comneck_cli.mllm import load_mllm
    from tests.mllm_fixtures import build_tiny_llava

    llava = build_tiny_llava(tmp_path / "llava")
    registry.import_file("mbt2018-mean-q1", codec_files["mbt2018-mean"], "codec")  # found by the record's digest
    prompt = "what is this ?"
    expected = load_mllm(llava).ask([records["coffee"]], prompt, via="reconstruction", max_new_tokens=6)[0]
    Image.open(photos["coffee"]).convert("RGB").crop((0, 0, 64, 64)).save(tmp_path / "crop.png")
    coded = cli("encode", tmp_path / "crop.png", "--codec", "mbt2018-mean", "-q", 1, "--weights", other_weights)
    assert coded.exit_code == 0, coded.stderr
    unregistered = (tmp_path / "crop.cnk").read_bytes()
    server = Server("--mllm", llava, "--batch-wait", 300, home=Path(os.environ["COMNECK_HOME"]))
    try:
        path = "/v1/ask?prompt=what%20is%20this%20%3F&via=reconstruction&max_new_tokens=6"
        with ThreadPoolExecutor(3) as pool:
            answers = list(pool.map(lambda _: server.post(path, records["coffee"], None), range(3)))
        assert [a[0] for a in answers] == [200] * 3, answers
        assert all(json.loads(a[2]) == {"answer": expected.answer, "via": "reconstruction", "bpp": expected.bpp}
                   for a in answers)
        assert "prompt is required" in error_of(server.post("/v1/ask?via=reconstruction", records["coffee"], None))
        assert "one record per request" in error_of(server.post(path, records["coffee"] * 2, None))
        refused = server.post(path, unregistered, None)  # the server has no --weights for it
        assert refused[0] == 422 and error_of(refused).startswith(
            f"record was coded with codec weights {registry.file_sha256(other_weights)[:8]}, but ")
        assert error_of(refused).endswith("decode with the weights that encoded it (the server's weights FILE)")
    finally:
        server.stop()


def test_ask_via_neck_answers_what_the_cli_answers_with_the_servers_weights(records, codec_files, other_weights,
                                                                            llava_dir, mllm_neck):
    """/v1/ask?via=neck with a neck trained for the tiny LLaVA's own tower (`train neck --clip-from-mllm`) gives
    `comneck ask --via neck`'s answer for the same record; the records' codec file is not the registry's
    mbt2018-mean-q1, so the server decodes them with its --weights (a server without it refuses them: the test
    above)."""
    from comneck_cli import weights as registry

    registry.import_file("mbt2018-mean-q1", other_weights, "codec")  # the default, not the records' (as a server's)
    path = "/v1/ask?prompt=what%20is%20this%20%3F&via={via}&max_new_tokens=6"
    expected = {}
    for via in ("neck", "reconstruction"):
        r = cli("ask", "-", "--prompt", "what is this ?", "--mllm", llava_dir, "--via", via, "--max-new-tokens", 6,
                "--weights", codec_files["mbt2018-mean"], *(["--neck", mllm_neck] if via == "neck" else []),
                input=records["coffee"])
        assert r.exit_code == 0, r.stderr
        expected[via] = r.stdout.strip()
    bpp = 8 * len(records["coffee"]) / (64 * 64)
    home = Path(os.environ["COMNECK_HOME"])
    server = Server("--mllm", llava_dir, "--neck", mllm_neck, "--weights", codec_files["mbt2018-mean"], home=home)
    try:
        for via in ("neck", "reconstruction"):
            status, _, body = server.post(path.format(via=via), records["coffee"], None)
            assert status == 200, body
            assert json.loads(body) == {"answer": expected[via], "via": via, "bpp": pytest.approx(bpp)}
    finally:
        server.stop()


# --------------------------------------------------------------------------- load, signals, restarts
def test_full_queue_answers_503_and_sigterm_finishes_what_is_in_flight(models, records, tmp_path):
    """One request waits 1.5 s for a batch partner; the queue holds one, so a second is refused with Retry-After;
    SIGTERM during the wait still answers the first, then the process exits and accepts nothing more."""
    server = Server(*models, "--max-queue", 1, "--batch-size", 2, "--batch-wait", 1500, home=tmp_path / "home")
    try:
        with ThreadPoolExecutor(1) as pool:
            first = pool.submit(server.post, "/v1/features?format=npy", records["astronaut"], None)
            time.sleep(0.5)
            busy = server.post("/v1/features", records["coffee"], None)
            assert busy[0] == 503 and int(busy[1]["retry-after"]) >= 1 and "busy" in error_of(busy)
            server.proc.send_signal(signal.SIGTERM)
            status, _, body = first.result(30)
        assert status == 200 and body == cli_features(records["astronaut"], models, tmp_path, "npy")
        assert server.proc.wait(30) in (143, -signal.SIGTERM)
        assert "stopped; every request in flight was answered" in "".join(server.lines)
        with pytest.raises(OSError):
            server.request("GET", "/healthz", timeout=5)
    finally:
        server.stop()


def test_a_kill_under_load_corrupts_no_response_and_a_restart_serves_again(models, records, tmp_path):
    expected = cli_features(records["coffee"], models, tmp_path, "safetensors")
    server = Server(*models, home=tmp_path / "home")
    outcomes: list = []
    stop = threading.Event()

    def client() -> None:
        while not stop.is_set():
            try:
                status, _, body = server.post("/v1/features", records["coffee"], None, timeout=10)
                right = status == 200 and body == expected
                outcomes.append("ok" if right else ("wrong", status, body[:200]))
            except (OSError, http.client.HTTPException):
                outcomes.append("lost")
                return

    try:
        threads = [threading.Thread(target=client) for _ in range(4)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 60
        while outcomes.count("ok") < 8 and time.monotonic() < deadline:
            time.sleep(0.05)
        server.proc.kill()
        stop.set()
        for t in threads:
            t.join(30)
    finally:
        server.stop()
    assert outcomes.count("ok") >= 8
    assert not [o for o in outcomes if o not in ("ok", "lost")]  # a response is whole and right, or none at all
    again = Server(*models, home=tmp_path / "home")
    try:
        status, _, body = again.post("/v1/features", records["coffee"], None)
        assert status == 200 and body == expected
    finally:
        again.stop()


@pytest.mark.slow
def test_the_ray_engine_serves_the_same_app(models, records, tmp_path):
    """`--engine ray`: the same endpoints and bytes from a Ray Serve replica; SIGTERM shuts it down."""
    pytest.importorskip("ray.serve", reason="Ray Serve is not installed (pip install 'comneck[serve]')")
    expected = cli_features(records["coffee"], models, tmp_path, "npy")
    server = Server(*models, "--engine", "ray", "--replicas", "1", home=tmp_path / "home")
    try:
        deadline = time.monotonic() + 120
        while server.request("GET", "/healthz", timeout=30)[0] != 200 and time.monotonic() < deadline:
            time.sleep(1)
        status, _, body = server.post("/v1/features?format=npy", records["coffee"], None, timeout=120)
        assert status == 200 and body == expected
        assert server.post("/v1/features", b"nonsense", None)[0] == 400
        server.proc.send_signal(signal.SIGTERM)
        assert server.proc.wait(120) in (143, -signal.SIGTERM)
    finally:
        server.stop()
