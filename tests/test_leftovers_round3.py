"""Leftovers of the last new-user pass over `ask`, `serve`, `eval --mllm` and `train neck --clip-from-mllm`: a refused
`eval` leaves no empty `-o` folder; `serve --mllm` refuses a checkpoint without weights before it listens; one answer
length bound for `ask`, `serve` and `eval`; `--clip-from-mllm` takes one length as stage 3's; `serve`'s errors
name no path of the server."""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.conftest import make_image_folder
from tests.mllm_fixtures import llava_dir  # noqa: F401 (a fixture)
from tests.mllm_fixtures import train_mllm_neck
from tests.test_hostile_round2 import errors, run

PROMPT = "what is this ?"


# --------------------------------------------------------------------------- eval: no empty -o left behind
@pytest.fixture
def eval_args(tmp_path, photos, codec_files) -> list:
    data = tmp_path / "data" / "cat"
    data.mkdir(parents=True)
    Image.open(photos["chelsea"]).convert("RGB").resize((64, 64)).save(data / "chelsea.png")
    return ["eval", "--data", tmp_path / "data", "--codec", "mbt2018-mean", "--qualities", "1", "--weights",
            f"q1={codec_files['mbt2018-mean']}", "--methods", "jpeg", "--size", "64", "--quiet"]


def test_eval_with_bad_prompts_leaves_no_output_folder(eval_args, llava_dir, tmp_path):
    """Empty, undecodable and malformed (two image placeholders) prompts files are refused in one line, and the
    `-o` folder the run made, with the parents it made, is gone again; one that was there is kept as it was."""
    bad = {"empty": (b"\n  \n", 1, "holds no prompt"),
           "latin1": ("qu'est-ce que c'est ? \xe9t\xe9\n".encode("latin-1"), 1, "cannot read the prompts file"),
           "placeholders": (b"what is this ?\n<image> <image> what\n", 2, "prompt 2: the prompt holds 2 image")}
    for name, (content, code, reason) in bad.items():
        prompts = tmp_path / f"{name}.txt"
        prompts.write_bytes(content)
        out = tmp_path / "new" / name / "report"
        result = run(*eval_args, "--mllm", llava_dir, "--prompts", prompts, "-o", out)
        assert result.exit_code == code, (name, result.output)
        said = [line for line in result.stderr.splitlines() if line.startswith(("comneck: error:", "Error:"))]
        assert len(said) == 1 and reason in said[0], (name, result.stderr)  # usage errors in Click's form
        assert not (tmp_path / "new").exists(), name
    missing = run(*eval_args, "--mllm", llava_dir, "--prompts", tmp_path / "nope.txt", "-o", tmp_path / "new" / "r")
    assert missing.exit_code == 2 and "nope.txt" in missing.stderr and not (tmp_path / "new").exists()
    good = tmp_path / "good.txt"
    good.write_text(PROMPT + "\n")
    no_model = run(*eval_args, "--mllm", tmp_path / "no-model", "--prompts", good, "-o", tmp_path / "new" / "r")
    assert no_model.exit_code == 1 and "does not exist" in no_model.stderr and not (tmp_path / "new").exists()

    # A folder that was there before the run stays as it was, empty or not; so does an existing parent.
    empty, kept = tmp_path / "empty-report", tmp_path / "kept"
    empty.mkdir()
    kept.mkdir()
    (kept / "notes.txt").write_text("mine")
    for out in (empty, kept / "report"):
        result = run(*eval_args, "--mllm", llava_dir, "--prompts", tmp_path / "empty.txt", "-o", out)
        assert result.exit_code == 1 and "holds no prompt" in result.stderr, result.output
    assert empty.is_dir() and not any(empty.iterdir())
    assert sorted(p.name for p in kept.iterdir()) == ["notes.txt"] and (kept / "notes.txt").read_text() == "mine"


# --------------------------------------------------------------------------- serve: no weights, no start
def _without_weights(llava_dir: Path, folder: Path) -> Path:
    """The checkpoint's config and processor files, not its weights."""
    folder.mkdir()
    for path in llava_dir.iterdir():
        if not path.name.startswith("model"):
            shutil.copy(path, folder)
    return folder


def test_serve_refuses_an_mllm_folder_without_weights_before_it_listens(llava_dir, tmp_path, monkeypatch):
    """A config and processor but no weights (or an index whose shard is gone) started the server, which then failed
    every /v1/ask: now one line names the folder and the missing weights, and no port is bound."""
    pytest.importorskip("uvicorn", reason="the serve extra is not installed (pip install 'comneck[serve]')")
    from comneck_cli.serve import engines

    def bound(*args, **kwargs):
        raise AssertionError("the server bound its port")

    monkeypatch.setattr(engines, "listen", bound)
    assert (llava_dir / "model.safetensors").is_file()  # what the broken copies lack
    bare = _without_weights(llava_dir, tmp_path / "bare")
    sharded = _without_weights(llava_dir, tmp_path / "sharded")
    (sharded / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}))
    shutil.copy(llava_dir / "model.safetensors", sharded / "model-00001-of-00002.safetensors")
    for folder, missing in ((bare, "no weights: none of model.safetensors, model.safetensors.index.json"),
                            (sharded, "1 of the 2 weight files its model.safetensors.index.json names are missing, "
                                      "e.g. model-00002-of-00002.safetensors")):
        result = run("serve", "--mllm", folder, "--port", "0")
        assert result.exit_code == 1, result.output
        assert errors(result) == [result.stderr.strip()], result.stderr
        assert result.stderr.startswith(f"comneck: error: {folder} is not a usable LLaVA checkpoint folder "
                                        f"({missing}"), result.stderr


# --------------------------------------------------------------------------- one answer-length bound
def test_ask_serve_and_eval_take_answers_up_to_4096_tokens(eval_args, tmp_path):
    """4096 passes every command's option (the run then stops at the missing model, exit 1); 4097 is a usage error
    of each. `serve` capped at 1024."""
    from comneck_cli.mllm import MAX_NEW_TOKENS

    assert MAX_NEW_TOKENS == 4096
    model, prompts = tmp_path / "no-model", tmp_path / "prompts.txt"
    prompts.write_text(PROMPT + "\n")
    commands = {"ask": ["ask", tmp_path / "x.cnk", "--prompt", PROMPT, "--mllm", model],
                "serve": ["serve", "--mllm", model, "--port", "0"],
                "eval": [*eval_args, "--mllm", model, "--prompts", prompts, "-o", tmp_path / "r"]}
    for name, args in commands.items():
        taken = run(*args, "--max-new-tokens", 4096)
        assert taken.exit_code == 1 and f"MLLM folder {model} does not exist" in taken.stderr, (name, taken.output)
        refused = run(*args, "--max-new-tokens", 4097)
        assert refused.exit_code == 2 and "4097 is not in the range 1<=x<=4096" in refused.stderr, (name, refused.output)


def _request(config, path: str, query: str = "", body: bytes = b"") -> tuple[int, dict]:
    """One POST through the app in this process, its lifespan (the batcher) running: (status, JSON body)."""
    from comneck_cli.serve.app import build_app

    app = build_app(config)
    sent: list[dict] = []

    async def call() -> None:
        incoming = [{"type": "http.request", "body": body, "more_body": False}]

        async def receive() -> dict:
            return incoming.pop(0) if incoming else {"type": "http.disconnect"}

        async def send(message: dict) -> None:
            sent.append(message)

        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
                 "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": query.encode(),
                 "root_path": "", "headers": [(b"content-length", str(len(body)).encode())],
                 "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80)}
        async with app.router.lifespan_context(app):
            await app(scope, receive, send)

    asyncio.run(call())
    status = next(m["status"] for m in sent if m["type"] == "http.response.start")
    return status, json.loads(b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body"))


def test_the_servers_ask_takes_answers_up_to_4096_tokens():
    """/v1/ask's max_new_tokens: 4096 passes validation (this server has no MLLM: 501), 4097 is refused (400)."""
    pytest.importorskip("starlette", reason="the serve extra is not installed (pip install 'comneck[serve]')")
    from comneck_cli.serve import ServeConfig

    config = ServeConfig(device="cpu")
    assert _request(config, "/v1/ask", "prompt=hi&max_new_tokens=4096", b"x")[0] == 501
    status, answer = _request(config, "/v1/ask", "prompt=hi&max_new_tokens=4097", b"x")
    assert (status, answer) == (400, {"error": "max_new_tokens must be an integer from 1 to 4096, not '4097'"})


# --------------------------------------------------------------------------- train neck --clip-from-mllm: one length
def test_clip_from_mllm_takes_one_length_as_stage_3s(llava_dir, codec_files, tmp_path):
    """`--steps N` or `--epochs N` alone (no stage list) trains stage 3 only, as 0,0,N: the run records those
    stage lengths and logs distillation steps only. No length at all, and cross-entropy steps, are refused in one
    line."""
    from comneck_cli.train import checkpoint

    data = make_image_folder(tmp_path / "data")  # 6 images: an epoch at --batch-size 2 is 3 steps
    for given, lengths in ((("--steps", "2"), [0, 0, 2]), (("--epochs", "1"), [0, 0, 3])):
        out = tmp_path / given[0][2:] / "neck.safetensors"
        result = train_mllm_neck(llava_dir, data, codec_files["mbt2018-mean"], out, *given, "--log-every", "1")
        assert result.exit_code == 0 and out.is_file(), result.output
        run_dir = out.parent / "run"
        assert list(checkpoint.load(run_dir / "checkpoint.pt", "neck")["stage_steps"]) == lengths
        logged = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        assert [row["step"] for row in logged] == list(range(1, lengths[2] + 1)), logged
        assert {row["stage"] for row in logged} == {"dist"}, logged  # d1 names its stages ce, ce+dist, dist
    for given, reason in ((("--steps", "2,0,3"), "give them no steps (--steps 0,0,N)"),
                          ((), "give its length as --steps N or --epochs N")):
        out = tmp_path / "refused" / "neck.safetensors"
        result = train_mllm_neck(llava_dir, data, codec_files["mbt2018-mean"], out, *given)
        assert result.exit_code == 1 and not out.exists(), result.output
        assert errors(result) == [result.stderr.strip()] and result.stderr.strip().endswith(reason), result.stderr


# --------------------------------------------------------------------------- serve: no server path in an error
def test_serve_errors_name_the_servers_files_by_base_name(codec_files, other_weights, photos, tmp_path,
                                                          monkeypatch):
    """A record coded with other weights gets 422 naming the server's weights file: by its base name, never its
    path on the server, whether the server was given it as an absolute or a relative path."""
    pytest.importorskip("starlette", reason="the serve extra is not installed (pip install 'comneck[serve]')")
    from comneck_cli import coding as api
    from comneck_cli.formats import pack
    from comneck_cli.serve import ServeConfig

    crop = np.ascontiguousarray(np.asarray(Image.open(photos["coffee"]).convert("RGB"))[100:164, 200:264])
    record = pack(api.encode(crop, api.load_codec("mbt2018-mean", 1, weights=other_weights)))
    weights = codec_files["mbt2018-mean"]
    monkeypatch.chdir(weights.parent.parent)
    relative = Path(weights.parent.name) / weights.name
    for given in (weights, relative):
        status, answer = _request(ServeConfig(weights=str(given), device="cpu"), "/v1/decode", body=record)
        assert status == 422 and answer["error"].startswith("record was coded with codec weights "), answer
        assert f"but {weights.name} is " in answer["error"], answer
        assert str(weights.parent) not in answer["error"] and str(relative) not in answer["error"], answer
