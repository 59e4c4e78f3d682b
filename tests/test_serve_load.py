"""benchmarks/serve_load.py in a small run: a real server under concurrent clients, every answer compared with the
CLI's bytes. Outcomes only (nothing lost, nothing wrong, the fields README quotes), never timings."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "serve_load.py"


@pytest.mark.slow
def test_serve_load_loses_nothing(tmp_path):
    pytest.importorskip("uvicorn")
    out = tmp_path / "load.json"
    env = {**os.environ, "COMNECK_HOME": str(tmp_path / "home")}
    proc = subprocess.run([sys.executable, str(SCRIPT), "--clients", "3", "--requests", "12", "--distinct", "2",
                           "--time-limit", "120", "-o", str(out)], capture_output=True, text=True, timeout=600,
                          env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["requests"] == 12 and result["lost"] == 0 and result["wrong"] == 0
    assert {"server_requests_per_s", "p50_ms", "p99_ms", "mean_batch", "cli_process_per_request_s",
            "machine"} <= set(result)
