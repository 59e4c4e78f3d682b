"""``comneck ask`` and ``comneck_cli.mllm`` on a tiny random LLaVA built in code (tests/mllm_fixtures.py), offline:
the reference paths give the model's own ``generate`` token for token, and the injected features are the model's."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from comneck_cli.cli import main
from tests.mllm_fixtures import build_tiny_llava, llava_dir, mllm, mllm_neck  # noqa: F401 (fixtures)

PROMPT = "what is this ?"


def _image(path: Path) -> np.ndarray:
    from comneck_cli.io.images import read_image

    return read_image(path)


def _own_generate(mllm, image: np.ndarray, n: int = 6):
    """The model's own answer: its processor on the image and the prompt, then ``generate`` (greedy)."""
    from PIL import Image

    inputs = mllm.processor(images=Image.fromarray(image), text=mllm.prompt_text(PROMPT), return_tensors="pt")
    out = mllm.model.generate(**inputs, do_sample=False, max_new_tokens=n)
    return out[:, inputs["input_ids"].shape[1]:]


def test_uncompressed_is_the_models_own_generate(mllm, photos):
    """Same tokens as ``generate(**processor(images, text))``, and an image-blind path would fail: two photos give
    two answers."""
    ids = {}
    for name in ("chelsea", "rocket"):
        image = _image(photos[name])
        ours = mllm.generate_ids(mllm.image_features(image), PROMPT, 6)
        assert ours.tolist() == _own_generate(mllm, image).tolist()
        ids[name] = ours.tolist()
        answer, = mllm.ask([photos[name]], PROMPT, via="uncompressed", max_new_tokens=6)
        assert (answer.input, answer.via, answer.bpp) == (str(photos[name]), "uncompressed", None)
        assert answer.answer == mllm.processor.tokenizer.decode(ours[0], skip_special_tokens=True).strip()
    assert ids["chelsea"] != ids["rocket"]


def test_features_follow_the_models_preset(mllm, photos, monkeypatch):
    """The features equal ``get_image_features``; changing the layer, keeping CLS, skipping the padding or the
    projector each changes them, so the equality above would catch any of those."""
    import torch

    image = _image(photos["chelsea"])  # 451×300: LLaVA-1.5's padding to a square changes the pixels
    pixels = mllm.pixel_values(image)
    own = mllm.model.get_image_features(pixels, vision_feature_layer=mllm.model.config.vision_feature_layer,
                                        vision_feature_select_strategy="default").pooler_output[0]
    with torch.inference_mode():
        ours = mllm.image_features(image)[0]
        assert torch.equal(ours, own)
        tokens = mllm.tower.embed(pixels)
        monkeypatch.setattr(mllm.tower, "layer", -1)
        other_layer = mllm.tower.features(tokens)[0]
        monkeypatch.setattr(mllm.tower, "layer", -2)
        monkeypatch.setattr(mllm.tower, "strategy", "full")
        with_cls = mllm.tower.features(tokens)[0]
        monkeypatch.setattr(mllm.tower, "strategy", "default")
        monkeypatch.setattr(mllm.tower, "projector", torch.nn.Identity())
        unprojected = mllm.tower.features(tokens)[0]
        monkeypatch.undo()
        monkeypatch.setattr(mllm.processor.image_processor, "do_pad", False)
        unpadded = mllm.image_features(image)[0]
    assert not torch.allclose(other_layer, own, atol=1e-3)
    assert with_cls.shape[0] == own.shape[0] + 1
    assert unprojected.shape[-1] != own.shape[-1]  # the tower's width, not the language model's
    assert not torch.allclose(unpadded, own, atol=1e-3)


def test_reconstruction_is_generate_on_the_decoded_image(mllm, photos, codec_files, tmp_path):
    from comneck_cli import coding as api
    from comneck_cli import weights as registry
    from comneck_cli.codecs import load_codec
    from comneck_cli.formats import pack

    codec = load_codec("mbt2018-mean", 1, weights=codec_files["mbt2018-mean"])
    record = api.encode(_image(photos["rocket"]), codec)
    data = pack(record)
    registry.import_file("mbt2018-mean-q1", codec_files["mbt2018-mean"], "codec")  # found by the record's digest
    answer, = mllm.ask([data], PROMPT, via="reconstruction", max_new_tokens=6)
    decoded = api.decode(record, codec)
    own = _own_generate(mllm, decoded)
    assert answer.answer == mllm.processor.tokenizer.decode(own[0], skip_special_tokens=True).strip()
    assert answer.input == "input 1" and answer.bpp == pytest.approx(8 * len(data) / (record.height * record.width))
    # a stream of two records gives two answers, named by record
    both = mllm.ask([data + data], PROMPT, via="reconstruction", max_new_tokens=6)
    assert [a.input for a in both] == ["input 1 record 1", "input 1 record 2"]


def test_records_of_unregistered_weights_are_answered_with_weights(llava_dir, mllm, photos, other_weights,
                                                                   codec_files, tmp_path):
    """A record coded with a codec file that is not registered (the registry's mbt2018-mean-q1 is another file):
    `ask --weights FILE` (and ``MLLM.ask(weights=)``) decodes it and answers as the model's own `generate` on the
    decoded image; without it the record is refused in one line naming both digests; --weights with --via
    uncompressed is a usage error."""
    from comneck_cli import coding as api
    from comneck_cli import weights as registry
    from comneck_cli.codecs import load_codec
    from comneck_cli.formats import pack

    registry.import_file("mbt2018-mean-q1", codec_files["mbt2018-mean"], "codec")  # the default, not the record's
    codec = load_codec("mbt2018-mean", 1, weights=other_weights)
    record = api.encode(_image(photos["rocket"]), codec)
    path = tmp_path / "rocket.cnk"
    path.write_bytes(pack(record))
    own = _own_generate(mllm, api.decode(record, codec))
    expected = mllm.processor.tokenizer.decode(own[0], skip_special_tokens=True).strip()
    answer, = mllm.ask([path], PROMPT, via="reconstruction", weights=other_weights, max_new_tokens=6)
    assert answer.answer == expected
    args = ["ask", str(path), "--prompt", PROMPT, "--mllm", str(llava_dir), "--via", "reconstruction",
            "--max-new-tokens", "6"]
    runner = CliRunner()
    given = runner.invoke(main, args + ["--weights", str(other_weights)])
    assert given.exit_code == 0, given.output
    assert given.stdout == expected + "\n"
    refused = runner.invoke(main, args)
    assert refused.exit_code == 1 and refused.stdout == "" and "Traceback" not in refused.output
    assert refused.stderr.startswith(f"comneck: error: {path}: record was coded with codec weights "
                                     f"{record.weights_digest.hex()}, but ")
    assert refused.stderr.count("\n") == 1 and refused.stderr.endswith("(--weights FILE)\n")
    usage = runner.invoke(main, ["ask", str(photos["rocket"]), "--prompt", PROMPT, "--mllm", str(llava_dir),
                                 "--via", "uncompressed", "--weights", str(other_weights)])
    assert usage.exit_code == 2 and "--weights decode .cnk records" in usage.output


def test_a_tower_that_is_not_clip_is_refused(tmp_path):
    from comneck_cli.errors import ModelFileError
    from comneck_cli.mllm import load_mllm

    folder = build_tiny_llava(tmp_path / "siglip", vision_model="siglip")
    with pytest.raises(ModelFileError, match="siglip_vision_model vision tower; comneck asks "
                                             "LlavaForConditionalGeneration checkpoints whose vision tower is CLIP"):
        load_mllm(folder)


def test_cli_answers_one_line_per_input(llava_dir, photos, mllm):
    runner = CliRunner()
    args = ["ask", str(photos["chelsea"]), "--prompt", PROMPT, "--mllm", str(llava_dir), "--via", "uncompressed",
            "--max-new-tokens", "6"]
    one = runner.invoke(main, args)
    assert one.exit_code == 0, one.output
    expected = mllm.ask([photos["chelsea"]], PROMPT, via="uncompressed", max_new_tokens=6)[0].answer
    assert one.stdout == expected + "\n"
    two = runner.invoke(main, args + [str(photos["rocket"]), "--json"])
    rows = [json.loads(line) for line in two.stdout.splitlines()]
    assert [r["input"] for r in rows] == [str(photos["chelsea"]), str(photos["rocket"])]
    assert rows[0] == {"input": str(photos["chelsea"]), "via": "uncompressed", "answer": expected, "bpp": None}
    plain = runner.invoke(main, args + [str(photos["rocket"])])
    assert plain.stdout.splitlines()[0] == f"{photos['chelsea']}: {expected}"


@pytest.mark.parametrize("via", ["uncompressed", "reconstruction"])
def test_cli_reads_stdin_as_it_arrives(llava_dir, photos, mllm, tmp_path, via):
    """`ask -`: an image on stdin answers as its file does, and an endless stdin (`< /dev/zero`) is refused within
    the limits instead of being read whole."""
    import io

    from tests.test_hostile_round2 import Endless

    args = ["ask", "-", "--prompt", PROMPT, "--mllm", str(llava_dir), "--via", via, "--max-new-tokens", "4"]
    if via == "uncompressed":
        piped = CliRunner().invoke(main, args, input=photos["chelsea"].read_bytes())
        expected = mllm.ask([photos["chelsea"]], PROMPT, via=via, max_new_tokens=4)[0].answer
        assert piped.exit_code == 0 and piped.stdout == expected + "\n"
    stream = Endless()
    endless = CliRunner().invoke(main, args, input=io.BufferedReader(stream))
    assert endless.exit_code == 1 and "Traceback" not in endless.output
    assert endless.stderr.startswith("comneck: error: ") and stream.count <= 2 << 20


def test_cli_a_fifo_input_is_refused_unread(llava_dir, tmp_path):
    import os

    fifo = tmp_path / "x.cnk"
    os.mkfifo(fifo)
    result = CliRunner().invoke(main, ["ask", str(fifo), "--prompt", PROMPT, "--mllm", str(llava_dir)])
    assert result.exit_code == 1
    assert result.stderr == f"comneck: error: {fifo}: not a regular file (a folder, FIFO, socket or device)\n"


def test_cli_missing_model_is_one_line_before_anything_loads(tmp_path, photos):
    result = CliRunner().invoke(main, ["ask", str(photos["chelsea"]), "--prompt", PROMPT, "--mllm",
                                       "llava-hf/llava-1.5-7b-hf", "--via", "uncompressed"])
    assert result.exit_code == 1
    assert result.stderr.startswith("comneck: error: MLLM llava-hf/llava-1.5-7b-hf is neither a folder nor in the "
                                    "Hugging Face cache (HF_HOME=")
    assert len(result.stderr.splitlines()) == 1 and "Traceback" not in result.output


def test_cli_bad_input_fails_alone(llava_dir, photos, tmp_path):
    bad = tmp_path / "bad.cnk"
    bad.write_bytes(b"not a record")
    result = CliRunner().invoke(main, ["ask", str(bad), str(photos["chelsea"]), "--prompt", PROMPT, "--mllm",
                                       str(llava_dir), "--via", "uncompressed", "--max-new-tokens", "2"])
    assert result.exit_code == 1
    assert result.stdout.startswith(f"{photos['chelsea']}: ")
    assert "comneck: error:" in result.stderr and "Traceback" not in result.output
    usage = CliRunner().invoke(main, ["ask", str(photos["chelsea"]), "--prompt", PROMPT, "--mllm", str(llava_dir),
                                      "--via", "uncompressed", "--neck", "n.safetensors"])
    assert usage.exit_code == 2 and "--neck applies to --via neck only" in usage.output


def test_converted_tower_gives_the_hf_hidden_states(mllm):
    """The open_clip tower a neck trains against is the model's tower: every hidden state agrees."""
    import torch

    from comneck_cli.clip.tower import split_clip
    from comneck_cli.mllm.convert import open_clip_tower

    vision = mllm.model.model.vision_tower
    head, tail = split_clip(open_clip_tower(vision, mllm.model.config.vision_config), 0)
    pixels = torch.randn(2, 3, 56, 56, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        theirs = vision(pixels, output_hidden_states=True).hidden_states
        ours = tail(head(pixels), layer=None, embedding=False).hidden_states
    assert len(ours) == len(theirs) == 5
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.fixture(scope="module")
def tower_neck(mllm, codec_files, photos, tmp_path_factory) -> Path:
    """A tiny neck trained for the tiny LLaVA's tower (k = 2): 40 steps of MSE between T(y_hat) and the converted
    tower's tokens entering block 3, on 64² crops of shipped photos (a 4×4 latent grid, the tower's 4×4 patches)."""
    import torch
    from PIL import Image

    from comneck_cli import coding as api
    from comneck_cli import weights as registry
    from comneck_cli.clip.tower import ClipHead
    from comneck_cli.codecs import load_codec
    from comneck_cli.mllm.convert import open_clip_tower
    from comneck_cli.models.neck import NeckInfo, TransformNeck, save_neck

    codec = load_codec("mbt2018-mean", 1, weights=codec_files["mbt2018-mean"])
    head = ClipHead(open_clip_tower(mllm.model.model.vision_tower, mllm.model.config.vision_config), 2)
    images = [np.asarray(Image.open(photos[n]).convert("RGB").resize((64, 64))) for n in ("chelsea", "rocket",
                                                                                        "coffee", "astronaut")]
    with torch.no_grad():
        y_hat = torch.cat([api.decode_latents(api.encode(im, codec), codec) for im in images]).clone()
        target = head(torch.cat([mllm.pixel_values(im).float() for im in images])).clone()
    torch.manual_seed(0)
    neck = TransformNeck(latent_channels=12, width=64, heads=4, grid=(4, 4))
    opt = torch.optim.Adam(neck.parameters(), lr=3e-3)
    first = None
    for _ in range(40):
        loss = torch.nn.functional.mse_loss(neck(y_hat), target)
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.5 * first
    model, tag = mllm.tower_id
    info = NeckInfo(codec="mbt2018-mean", quality=1, codec_digest=registry.file_sha256(codec_files["mbt2018-mean"])[:8],
                    clip_model=model, clip_tag=tag, k=2, scenario="d1", config=neck.config)
    path = tmp_path_factory.mktemp("tower-neck") / "neck.safetensors"
    save_neck(neck.eval(), path, info)
    return path


def test_neck_path_runs_in_the_models_tower(mllm, tower_neck, codec_files, photos, neck_file):
    """y_hat -> the neck -> the model's own layers 3.. -> layer -2, CLS dropped -> projector -> generate; a neck of
    another tower is refused naming both."""
    import torch
    from PIL import Image

    from comneck_cli import coding as api
    from comneck_cli import weights as registry
    from comneck_cli.codecs import load_codec
    from comneck_cli.errors import MismatchError
    from comneck_cli.formats import pack
    from comneck_cli.models.neck import load_neck

    registry.import_file("mbt2018-mean-q1", codec_files["mbt2018-mean"], "codec")  # found by the record's digest
    codec = load_codec("mbt2018-mean", 1, weights=codec_files["mbt2018-mean"])
    image = np.asarray(Image.open(photos["rocket"]).convert("RGB").resize((64, 64)))
    record = api.encode(image, codec)
    answer, = mllm.ask([pack(record)], PROMPT, via="neck", neck=tower_neck, max_new_tokens=6)
    assert answer.via == "neck" and answer.bpp == pytest.approx(record.bits_per_pixel)
    neck, _ = load_neck(tower_neck)
    y_hat = api.decode_latents(record, codec)
    with torch.inference_mode():  # the same as the model's own tower run from block 3 on the neck's tokens
        tokens = neck(y_hat)
        x = tokens
        for block in mllm.model.model.vision_tower.encoder.layers[2:3]:
            x = block(x, None)
        expected = mllm.model.model.multi_modal_projector(x[:, 1:])
        torch.testing.assert_close(mllm.neck_features(record, tower_neck), expected)
    assert answer.answer == mllm.generate(expected, PROMPT, 6)
    model, tag = mllm.tower_id
    with pytest.raises(MismatchError, match=rf"neck {neck_file} was trained for CLIP comneck-tiny-ViT-14/test "
                                            rf"\(4×4 tokens, k=2\), but .*'s tower is {model}/{tag}"):
        mllm.ask([pack(record)], PROMPT, via="neck", neck=neck_file)


def test_adapter_path_runs_in_the_models_tower(mllm, codec_files, photos, tmp_path):
    """E(x_hat) + A(y_hat) through the model's own embedding and layers; a zero adapter gives the reconstruction's
    features exactly, and an adapter of another tower is refused."""
    import torch
    from PIL import Image

    from comneck_cli import coding as api
    from comneck_cli import weights as registry
    from comneck_cli.codecs import load_codec
    from comneck_cli.errors import MismatchError
    from comneck_cli.formats import pack
    from comneck_cli.mllm.convert import open_clip_tower
    from comneck_cli.models.adapter import AdapterInfo, DecoderAdapter, save_adapter

    registry.import_file("mbt2018-mean-q1", codec_files["mbt2018-mean"], "codec")
    codec = load_codec("mbt2018-mean", 1, weights=codec_files["mbt2018-mean"])
    record = api.encode(np.asarray(Image.open(photos["coffee"]).convert("RGB").resize((64, 64))), codec)
    tower = open_clip_tower(mllm.model.model.vision_tower, mllm.model.config.vision_config)
    model, tag = mllm.tower_id
    paths = {}
    for name, clip_tag in (("random", tag), ("zero", tag), ("other", "openai")):
        torch.manual_seed(1)
        adapter = DecoderAdapter(latent_channels=12, width=64, heads=4, grid=tuple(tower.grid_size))
        if name == "zero":
            with torch.no_grad():
                for p in adapter.parameters():
                    p.zero_()
        paths[name] = tmp_path / f"{name}.safetensors"
        save_adapter(adapter, paths[name], AdapterInfo(
            codec="mbt2018-mean", codec_digest=registry.file_sha256(codec_files["mbt2018-mean"])[:8],
            clip_model=model, clip_tag=clip_tag, shallow_layer=0, loss_weights=(0.1, 1.0), warmup_epochs=0.0))
    answer, = mllm.ask([pack(record)], PROMPT, via="adapter", adapter=paths["random"], max_new_tokens=6)
    assert answer.via == "adapter" and answer.answer == mllm.generate(
        mllm.adapter_features(record, paths["random"]), PROMPT, 6)
    torch.testing.assert_close(mllm.adapter_features(record, paths["zero"]),
                               mllm.image_features(api.decode(record, codec)))
    assert not torch.allclose(mllm.adapter_features(record, paths["random"]),
                              mllm.image_features(api.decode(record, codec)), atol=1e-3)
    with pytest.raises(MismatchError, match=rf"adapter {paths['other']} was trained for CLIP {model}/openai, not "
                                            rf"{model}/{tag}"):
        mllm.ask([pack(record)], PROMPT, via="adapter", adapter=paths["other"])


def test_without_transformers_one_line(monkeypatch, photos):
    import sys

    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers -> ImportError
    result = CliRunner().invoke(main, ["ask", str(photos["chelsea"]), "--prompt", PROMPT, "--mllm", "x"])
    assert result.exit_code == 1
    assert result.stderr == ("comneck: error: asking an MLLM needs the transformers package: "
                             "pip install 'comneck[mllm]'\n")


def test_ask_batches_inputs_into_one_generate_call(mllm, photos, monkeypatch):
    """Issue #29: several inputs are answered by one ``generate`` call, and each answer is the one it gets alone."""
    names = ("chelsea", "rocket", "coffee", "astronaut")
    alone = [mllm.ask([photos[n]], PROMPT, via="uncompressed", max_new_tokens=6, batch_size=1)[0] for n in names]
    assert len({a.answer for a in alone}) > 1  # the images are told apart, so a mixed-up batch would show
    calls = []
    generate = mllm.model.generate
    monkeypatch.setattr(mllm.model, "generate", lambda **kw: calls.append(kw["input_ids"].shape) or generate(**kw))
    batched = mllm.ask([photos[n] for n in names], PROMPT, via="uncompressed", max_new_tokens=6)
    assert batched == alone
    assert [shape[0] for shape in calls] == [len(names)]


def test_ask_has_no_force_option(llava_dir, photos):
    """ask writes no files, so it offers no --force that would do nothing."""
    result = CliRunner().invoke(main, ["ask", str(photos["chelsea"]), "--prompt", PROMPT, "--mllm", str(llava_dir),
                                       "--via", "uncompressed", "--force"])
    assert result.exit_code == 2 and "No such option '--force'" in result.output
    assert "--force" not in CliRunner().invoke(main, ["ask", "--help"]).output


def test_features_with_a_neck_for_an_mllm_tower_is_one_line(mllm_neck, codec_files, photos, tmp_path):
    """`features` cannot run such a neck (open_clip has no MLLM tower): one line saying where it runs, not "unknown
    CLIP model"."""
    record = tmp_path / "a.cnk"
    coded = CliRunner().invoke(main, ["encode", str(photos["chelsea"]), "--codec", "mbt2018-mean", "-q", "1",
                                      "--weights", str(codec_files["mbt2018-mean"]), "-o", str(record)])
    assert coded.exit_code == 0, coded.output
    result = CliRunner().invoke(main, ["features", str(record), "--neck", str(mllm_neck), "--weights",
                                       str(codec_files["mbt2018-mean"]), "-o", str(tmp_path / "f.pt")])
    assert result.exit_code == 1 and result.stderr.count("\n") == 1, result.output
    assert result.stderr.startswith(f"comneck: error: {record}: CLIP hf-clip-w64-l4-p14-56/mllm-")
    assert "is the vision tower of an MLLM, which open_clip cannot load" in result.stderr
    assert not (tmp_path / "f.pt").exists()
