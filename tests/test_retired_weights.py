"""Issue #34.4: a record coded with a default codec file that no longer ships keeps decoding. `weights/shipped.json`
lists every default that has shipped (checked here against git history), and `decode`, `features` and `info` name,
in one line, the commit that holds a retired file and the command that restores it."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from click.testing import CliRunner

from comneck_cli.cli import main
from comneck_cli.formats import CODEC_IDS, Record, pack

REPO = Path(__file__).resolve().parents[1]
TABLE = json.loads((REPO / "weights" / "shipped.json").read_text(encoding="utf-8"))["defaults"]
RETIRED = "4d3ec7a4962fdb79bd547c1879646c1a6c6585533c6b77493a1541f727b60932"  # issue #10's default, replaced in #19
RETIRED_COMMIT = "2d670eae25a31db7dea3cee285fb95a2f69f5896"


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def _git(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, check=False)


GIT_DIR = Path(_git("rev-parse", "--absolute-git-dir").stdout.decode().strip() or REPO / ".git")


def _history_available() -> bool:
    return shutil.which("git") is not None and _git("cat-file", "-e", f"{RETIRED_COMMIT}^{{commit}}").returncode == 0


needs_history = pytest.mark.skipif(not _history_available(), reason="needs comneck's git history (a full clone)")


def _forged(tmp_path: Path, digest: str = RETIRED[:8]) -> Path:
    """A record header as the retired default wrote it; nothing may reach its strings before the refusal."""
    record = Record(codec_id=CODEC_IDS["mbt2018-mean-vbr"], quality=3, rate=3000, weights_digest=bytes.fromhex(digest),
                    height=64, width=64, strings=(b"\x01\x02", b"\x03"))
    path = tmp_path / "old.cnk"
    path.write_bytes(pack(record))
    return path


def _restore_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    assert f"git show {RETIRED_COMMIT[:12]}:weights/mbt2018-mean-vbr.safetensors > " in lines[0], lines[0]
    assert "--weights mbt2018-mean-vbr-4d3ec7a4.safetensors" in lines[0], lines[0]
    return lines[0]


def test_table_lists_the_shipped_default():
    """The default shipped now is in the table already, so replacing it cannot forget it."""
    manifest = json.loads((REPO / "weights" / "manifest.json").read_text(encoding="utf-8"))
    listed = {row["sha256"] for row in TABLE}
    assert {e["sha256"] for e in manifest.values() if e["kind"] == "codec"} <= listed
    assert RETIRED in listed


@needs_history
def test_table_is_the_git_history():
    """Every codec digest weights/manifest.json ever held is listed, and each row's commit holds that very file."""
    log = _git("log", "--follow", "-p", "--format=", "--", "weights/manifest.json").stdout.decode()
    ever = set(re.findall(r'^\+\s*"sha256": "([0-9a-f]{64})"', log, flags=re.M))
    assert ever and ever <= {row["sha256"] for row in TABLE}
    for row in TABLE:
        blob = _git("show", f"{row['commit']}:{row['file']}")
        assert blob.returncode == 0, blob.stderr
        assert hashlib.sha256(blob.stdout).hexdigest() == row["sha256"], row


def test_decode_features_info_name_the_restore(tmp_path):
    record = _forged(tmp_path)
    out = run("decode", record, "-o", tmp_path / "out.png")
    assert out.exit_code == 1
    assert _restore_line(out.stderr).startswith("comneck: error: ")
    assert not (tmp_path / "out.png").exists()

    out = run("features", record, "-o", tmp_path / "f.pt")
    assert out.exit_code == 1
    assert _restore_line(out.stderr).startswith("comneck: error: ")
    assert not (tmp_path / "f.pt").exists()

    out = run("info", record)  # info still shows the header; the line says what decoding it needs
    assert out.exit_code == 0 and "4d3ec7a4" in out.stdout
    assert _restore_line(out.stderr).startswith("comneck: warning: ")


def test_wrong_weights_still_name_the_retired_file(tmp_path):
    """With `--weights` of another file (here the shipped default) the mismatch names the file that would work."""
    out = run("decode", _forged(tmp_path), "--weights", REPO / "weights" / "mbt2018-mean-vbr.safetensors",
              "-o", tmp_path / "out.png")
    assert out.exit_code == 1
    _restore_line(out.stderr)


def test_other_digests_keep_the_generic_refusal(tmp_path):
    out = run("decode", _forged(tmp_path, "00112233"), "-o", tmp_path / "out.png")
    assert out.exit_code == 1
    assert "git show" not in out.stderr and "00112233" in out.stderr


@needs_history
def test_the_named_command_restores_a_decodable_file(tmp_path, photos):
    """The end to end promise: encode with the retired file, then follow the refusal's own command to decode."""
    from PIL import Image

    first = _restore_line(run("decode", _forged(tmp_path), "-o", tmp_path / "x.png").stderr)
    command = re.search(r"run `(git show [^`]+)`", first)[1]
    restored = tmp_path / "restore"
    restored.mkdir()
    # the line's own command, verbatim, in a folder that is not the checkout (GIT_DIR: the clone it speaks of)
    subprocess.run(command, shell=True, check=True, cwd=restored, env={**os.environ, "GIT_DIR": str(GIT_DIR)})
    old = restored / "mbt2018-mean-vbr-4d3ec7a4.safetensors"
    image = tmp_path / "p.png"
    Image.open(photos["chelsea"]).convert("RGB").resize((64, 64)).save(image)
    assert run("encode", image, "--weights", old, "-q", 3, "-o", tmp_path / "p.cnk").exit_code == 0

    again = _restore_line(run("decode", tmp_path / "p.cnk", "-o", tmp_path / "a.png").stderr)
    assert again.partition(" record ")[2] == first.partition(" record ")[2]
    out = run("decode", tmp_path / "p.cnk", "--weights", old, "-o", tmp_path / "a.png")
    assert out.exit_code == 0, out.stderr
    assert Image.open(tmp_path / "a.png").size == (64, 64)
