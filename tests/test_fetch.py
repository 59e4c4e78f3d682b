"""Downloads (issue #18): ``hub.download`` and ``weights fetch`` against a local HTTP server on 127.0.0.1 (a thread
serving fixture files, with or without HTTP ranges), never the internet: resumed partial downloads, the sha256
recorded, the offline sentence."""

from __future__ import annotations

import _socket
import http.server
import socket
import threading

import pytest
import torch

from comneck_cli import weights as registry
from comneck_cli.errors import ComneckError
from comneck_cli.hub.download import DownloadError, download


class Server:
    """Serves ``files`` (name -> bytes) on 127.0.0.1; honours ``Range: bytes=N-`` unless ``ranges`` is False."""

    def __init__(self, files: dict[str, bytes], ranges: bool = True):
        self.files, self.ranges, self.requests = files, ranges, []
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                name = self.path.rsplit("/", 1)[-1]
                server.requests.append((name, self.headers.get("Range")))
                if name not in server.files:
                    self.send_error(404)
                    return
                data, start = server.files[name], 0
                wanted = self.headers.get("Range")
                if wanted and server.ranges:
                    start = int(wanted.removeprefix("bytes=").rstrip("-"))
                    if start >= len(data):
                        self.send_error(416)
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    self.send_response(200)
                self.send_header("Content-Length", str(len(data) - start))
                self.end_headers()
                self.wfile.write(data[start:])

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def local_only(monkeypatch):
    """conftest forbids every connection; here 127.0.0.1 is allowed, anything else still fails."""
    def connect(self, address):
        if self.family == socket.AF_INET and address[0] == "127.0.0.1":
            return _socket.socket.connect(self, address)
        raise OSError(f"tests must not use the network (tried {address})")

    monkeypatch.setattr(socket.socket, "connect", connect)


@pytest.fixture
def serve(local_only):
    servers = []

    def start(files, ranges=True):
        servers.append(Server(files, ranges))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


DATA = bytes(range(256)) * 4000  # ~1 MB: more than one read chunk


def test_download_records_the_sha256_and_reports_progress(serve, tmp_path):
    import hashlib

    server = serve({"f.bin": DATA})
    seen = []
    digest = download(f"{server.url}/f.bin", tmp_path / "f.bin", fix="run it",
                      progress=lambda done, total: seen.append((done, total)))
    assert (tmp_path / "f.bin").read_bytes() == DATA and digest == hashlib.sha256(DATA).hexdigest()
    assert seen[0] == (0, len(DATA)) and seen[-1] == (len(DATA), len(DATA))
    assert not (tmp_path / "f.bin.part").exists()


def test_a_partial_download_resumes_with_a_range_request(serve, tmp_path):
    server = serve({"f.bin": DATA})
    (tmp_path / "f.bin.part").write_bytes(DATA[:300_000])  # what an interrupted download left
    download(f"{server.url}/f.bin", tmp_path / "f.bin", fix="run it")
    assert server.requests == [("f.bin", "bytes=300000-")]
    assert (tmp_path / "f.bin").read_bytes() == DATA


def test_a_server_without_ranges_sends_everything_again(serve, tmp_path):
    server = serve({"f.bin": DATA}, ranges=False)
    (tmp_path / "f.bin.part").write_bytes(b"x" * 1000)
    download(f"{server.url}/f.bin", tmp_path / "f.bin", fix="run it")
    assert (tmp_path / "f.bin").read_bytes() == DATA  # the part started over, not appended to


def test_offline_fetch_says_which_url_and_which_import(monkeypatch):
    """No connection (conftest's guard): one sentence with the authors' URL and the import command."""
    from comneck_cli.models.release import fetch_release

    monkeypatch.delenv("COMNECK_RELEASE_URL", raising=False)
    with pytest.raises(DownloadError) as info:
        fetch_release(["d1_1.pth.tar"])
    message = str(info.value)
    assert message.startswith("cannot reach https://github.com/NYCU-MAPL/BridgingCompressionMLLM/releases/download/"
                              "v1.0/d1_1.pth.tar (")
    assert message.endswith("download it on a connected machine and run `comneck weights import-comneck "
                            "d1_1.pth.tar` (the other release files are beside it)")
    assert "\n" not in message


def test_a_missing_file_is_one_sentence(serve, tmp_path):
    server = serve({})
    with pytest.raises(DownloadError, match=r"cannot download .*/nope\.bin \(HTTP 404 .*\); fetch it by hand and run"):
        download(f"{server.url}/nope.bin", tmp_path / "nope.bin", fix="run it")


@pytest.mark.slow  # converts a full-size released codec
def test_fetch_release_downloads_resumes_and_imports(serve, tmp_path, monkeypatch):
    from comneck_cli.models.release import downloads_dir, fetch_release
    from tests.test_comneck_release import _layout, _save_release

    codec, neck = _layout()
    data = _save_release(tmp_path / "d2_3.pth.tar", codec, neck).read_bytes()
    server = serve({"d2_3.pth.tar": data})
    monkeypatch.setenv("COMNECK_RELEASE_URL", server.url + "/v1.0/")
    downloads_dir().mkdir(parents=True)
    (downloads_dir() / "d2_3.pth.tar.part").write_bytes(data[:1000])
    (imported,) = fetch_release(["d2_3.pth.tar"])
    assert server.requests == [("d2_3.pth.tar", "bytes=1000-")]
    entry = registry.lookup("elic-comneck-q3-d2")
    assert imported.codec == entry and entry.info["source"] == f"{server.url}/v1.0/d2_3.pth.tar"
    import hashlib

    assert entry.info["release_sha256"] == hashlib.sha256(data).hexdigest()
    assert registry.lookup("elic-comneck-q3-d2-neck").info["codec_digest"] == entry.sha256[:8]
    assert not downloads_dir().exists()  # the download is gone once imported, and its emptied folder too (#32.9)


def _zoo_file(tmp_path):
    from compressai.registry import MODELS

    torch.manual_seed(0)
    path = tmp_path / "zoo.pth.tar"
    model = MODELS["mbt2018-mean"](N=8, M=12)
    model.update(force=True)  # zoo files carry their entropy tables
    torch.save(model.state_dict(), path)
    return path.read_bytes()


def test_fetch_zoo_checks_the_name_hash_and_registers(serve, tmp_path, monkeypatch):
    import hashlib

    from compressai.zoo.image import model_urls

    from comneck_cli.models.release import fetch_zoo

    data = _zoo_file(tmp_path)
    name = f"mbt2018-mean-3-{hashlib.sha256(data).hexdigest()[:8]}.pth.tar"
    server = serve({name: data, "mbt2018-mean-4-00000000.pth.tar": data})
    monkeypatch.setitem(model_urls["mbt2018-mean"]["mse"], 3, f"https://zoo.invalid/models/{name}")
    monkeypatch.setitem(model_urls["mbt2018-mean"]["mse"], 4, "https://zoo.invalid/m/mbt2018-mean-4-00000000.pth.tar")
    monkeypatch.setenv("COMNECK_ZOO_URL", server.url)
    entry = fetch_zoo("mbt2018-mean-q3")
    assert entry.kind == "codec" and entry.sha256 == hashlib.sha256(data).hexdigest()
    assert entry.info == {"codec": "mbt2018-mean", "quality": 3, "source": f"{server.url}/{name}"}
    with pytest.raises(DownloadError, match="not 00000000… as its name says; it was damaged on the way"):
        fetch_zoo("mbt2018-mean-q4")
    assert registry.lookup("mbt2018-mean-q4") is None
    with pytest.raises(ComneckError, match="'elic-comneck-q1' is not a CompressAI zoo codec"):
        fetch_zoo("elic-comneck-q1")


def _invoke(*args):
    from click.testing import CliRunner

    from comneck_cli.cli.release_commands import fetch

    return CliRunner().invoke(fetch, list(args))


def test_fetch_command_offline_is_one_line_and_exit_1(monkeypatch):
    monkeypatch.delenv("COMNECK_RELEASE_URL", raising=False)
    result = _invoke("comneck")
    assert result.exit_code == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("comneck: error: cannot reach https://github.com/NYCU-MAPL/")
    assert "`comneck weights import-comneck d1_1.pth.tar`" in lines[0]


def test_fetch_command_refuses_what_it_cannot_fetch():
    result = _invoke("mbt2018-mean-q99")
    assert result.exit_code == 2 and "'mbt2018-mean-q99' is not a CompressAI zoo codec" in result.stderr
