"""An MLLM's Hugging Face CLIP vision tower as an open_clip ``VisionTransformer``: the same weights in the layout
comneck's training code (``clip.tower``'s C and C', the neck's teacher) runs, so a neck can be trained for the tower
a LLaVA model reads.

Hugging Face -> open_clip: ``embeddings.patch_embedding`` -> ``conv1``, ``class_embedding``, ``position_embedding``
-> ``positional_embedding``, ``pre_layrnorm`` -> ``ln_pre``; per layer ``layer_norm1/2`` -> ``ln_1/2``, ``q/k/v_proj``
-> ``attn.in_proj`` (stacked q, k, v), ``out_proj``, ``mlp.fc1/fc2`` -> ``mlp.c_fc/c_proj``; ``post_layernorm`` ->
``ln_post``. ``quick_gelu`` towers (OpenAI's weights) get QuickGELU. LLaVA keeps no CLIP projection, so ``proj`` is
None: the tower gives patch features, not an image embedding.
"""

from __future__ import annotations

import torch
from torch import nn

from comneck_cli.errors import ModelFileError


def open_clip_tower(vision: nn.Module, config) -> nn.Module:
    """A float32 open_clip ``VisionTransformer`` (eval mode) computing what the HF CLIP vision tower ``vision`` (of
    ``config``, a ``CLIPVisionConfig``) computes, hidden state for hidden state."""
    from open_clip.transformer import QuickGELU, VisionTransformer

    acts = {"quick_gelu": QuickGELU, "gelu": nn.GELU}
    if config.hidden_act not in acts:
        raise ModelFileError(f"the vision tower's activation {config.hidden_act!r} has no open_clip counterpart; "
                             f"comneck converts towers with {' or '.join(acts)}")
    tower = VisionTransformer(image_size=config.image_size, patch_size=config.patch_size, width=config.hidden_size,
                              layers=config.num_hidden_layers, heads=config.num_attention_heads,
                              mlp_ratio=config.intermediate_size / config.hidden_size, output_dim=config.hidden_size,
                              act_layer=acts[config.hidden_act])
    tower.proj = None
    src = {k: v.detach().float().cpu() for k, v in vision.state_dict().items()}
    state = {
        "conv1.weight": src["embeddings.patch_embedding.weight"],
        "class_embedding": src["embeddings.class_embedding"],
        "positional_embedding": src["embeddings.position_embedding.weight"],
        **_norm(src, "pre_layrnorm", "ln_pre"),
        **_norm(src, "post_layernorm", "ln_post"),
    }
    for i in range(config.num_hidden_layers):
        hf, oc = f"encoder.layers.{i}.", f"transformer.resblocks.{i}."
        attn = hf + "self_attn."
        state.update({
            oc + "attn.in_proj_weight": torch.cat([src[f"{attn}{p}_proj.weight"] for p in "qkv"]),
            oc + "attn.in_proj_bias": torch.cat([src[f"{attn}{p}_proj.bias"] for p in "qkv"]),
            oc + "attn.out_proj.weight": src[attn + "out_proj.weight"],
            oc + "attn.out_proj.bias": src[attn + "out_proj.bias"],
            **_norm(src, hf + "layer_norm1", oc + "ln_1"),
            **_norm(src, hf + "layer_norm2", oc + "ln_2"),
            **{f"{oc}mlp.{c}.{w}": src[f"{hf}mlp.{f}.{w}"] for f, c in (("fc1", "c_fc"), ("fc2", "c_proj"))
               for w in ("weight", "bias")},
        })
    tower.load_state_dict(state, strict=True)
    return tower.eval()


def _norm(src: dict, hf: str, oc: str) -> dict:
    return {f"{oc}.weight": src[f"{hf}.weight"], f"{oc}.bias": src[f"{hf}.bias"]}


class VisionOnlyClip(nn.Module):
    """An open_clip-style CLIP model that holds only a visual tower (``visual``), as comneck's code that takes a CLIP
    model reads one: enough for C, C' and distillation targets; it has no text tower, so nothing here classifies
    zero-shot with it."""

    def __init__(self, visual: nn.Module) -> None:
        super().__init__()
        self.visual = visual


def open_clip_model(vision: nn.Module, config, image_processor) -> VisionOnlyClip:
    """:func:`open_clip_tower` of ``vision`` wrapped as a CLIP model, preprocessing as the checkpoint's
    ``image_processor`` (its mean, std and size; bicubic resize of the short side and centre crop, as
    ``CLIPImageProcessor`` does), frozen."""
    tower = open_clip_tower(vision, config)
    tower.preprocess_cfg = {"size": config.image_size, "mean": tuple(image_processor.image_mean),
                            "std": tuple(image_processor.image_std), "interpolation": "bicubic",
                            "resize_mode": "shortest"}
    return VisionOnlyClip(tower).eval().requires_grad_(False)
