"""A tiny random LLaVA (``LlavaForConditionalGeneration``: a 4-block CLIP vision tower, a 2-layer Llama) built from
configs in code and saved with ``save_pretrained``, so the MLLM tests load it back offline as a user's folder."""

from __future__ import annotations

from pathlib import Path

import pytest

# The tower's geometry matches the tiny codecs' latents: a 56² input is a 4×4 patch grid, as 64² images code to a
# 4×4 latent grid.
TOWER = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 4, "num_attention_heads": 4,
         "image_size": 56, "patch_size": 14, "hidden_act": "quick_gelu", "projection_dim": 32}
WORDS = ["<unk>", "<pad>", "<s>", "</s>", "<image>", "USER:", "ASSISTANT:", "what", "is", "this", "?", "a", "cat",
         "dog", "cup", "rocket", "red", "blue", "green", "big", "small", "photo", "of", "the", "and", "no", "yes"]
WORDS += [f"w{i}" for i in range(64 - len(WORDS))]


def build_tiny_llava(folder: Path, *, seed: int = 0, pad: bool = True, select: str = "default", layer: int = -2,
                     vision_model: str = "clip") -> Path:
    """Save a tiny random LLaVA and its processor in ``folder``; returns ``folder``.

    ``pad``: the processor pads to a square with the mean colour (LLaVA-1.5's ``expand2square``); ``select`` and
    ``layer`` are the config's ``vision_feature_select_strategy`` and ``vision_feature_layer``; ``vision_model``
    ``siglip`` builds a tower that is not CLIP (to be refused)."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import (CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration,
                              LlavaImageProcessor, LlavaProcessor, PreTrainedTokenizerFast, SiglipVisionConfig)

    vocab = {w: i for i, w in enumerate(WORDS)}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", pad_token="<pad>",
                                        bos_token="<s>", eos_token="</s>", extra_special_tokens={"image_token": "<image>"})
    if vision_model == "clip":
        vision = CLIPVisionConfig(**TOWER)
    else:
        vision = SiglipVisionConfig(**{k: v for k, v in TOWER.items() if k not in ("projection_dim", "hidden_act")})
    text = LlamaConfig(vocab_size=len(WORDS), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128,
                       bos_token_id=2, eos_token_id=3, pad_token_id=1,
                       initializer_range=0.3)  # at the default 0.02 the tiny model gives every image one answer
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_id=vocab["<image>"],
                         vision_feature_layer=layer, vision_feature_select_strategy=select,
                         projector_hidden_act="gelu")
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).eval()
    processor = LlavaProcessor(
        image_processor=LlavaImageProcessor(do_pad=pad, size={"shortest_edge": 56},
                                            crop_size={"height": 56, "width": 56}),
        tokenizer=tokenizer, patch_size=14, vision_feature_select_strategy=select, num_additional_image_tokens=1)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def llava_dir(tmp_path_factory) -> Path:
    """The tiny LLaVA saved once per test session (import this fixture into a test module to use it)."""
    return build_tiny_llava(tmp_path_factory.mktemp("llava") / "tiny-llava")


def train_mllm_neck(llava_dir: Path, data: Path, codec_file: Path, out: Path, *extra: str):
    """``comneck train neck --clip-from-mllm`` on the tiny codec and LLaVA, 64² crops (the tower's 4×4 grid); the
    Click result."""
    from click.testing import CliRunner

    from comneck_cli.cli import main

    return CliRunner().invoke(main, ["train", "neck", "--codec", "mbt2018-mean", "-q", "1", "--codec-weights",
                                     str(codec_file), "--clip-from-mllm", str(llava_dir), "--data", str(data),
                                     "--crop", "64", "--batch-size", "2", "--device", "cpu", "--no-register",
                                     "-o", str(out), "--run-dir", str(out.parent / "run"), "--quiet", *extra])


@pytest.fixture(scope="session")
def mllm_neck(llava_dir, codec_files, tmp_path_factory) -> Path:
    """A neck for the tiny mbt2018-mean codec trained 3 distillation steps against the tiny LLaVA's own tower (a few
    seconds), once per test session."""
    from tests.conftest import make_image_folder

    folder = tmp_path_factory.mktemp("mllm-neck")
    with pytest.MonkeyPatch.context() as patch:  # session fixtures run before conftest's per-test isolation
        patch.setenv("COMNECK_HOME", str(folder / "home"))
        patch.setenv("HF_HUB_OFFLINE", "1")
        result = train_mllm_neck(llava_dir, make_image_folder(folder / "data"), codec_files["mbt2018-mean"],
                                 folder / "neck.safetensors", "--steps", "0,0,3")
    assert result.exit_code == 0, result.output
    return folder / "neck.safetensors"


@pytest.fixture(scope="module")
def mllm(llava_dir):
    """The tiny LLaVA loaded through comneck_cli.mllm, once per test module."""
    from comneck_cli.mllm import load_mllm

    return load_mllm(llava_dir)
