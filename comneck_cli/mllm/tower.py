"""The MLLM's own CLIP vision tower, cut where comneck's paths enter it, and its identity.

LLaVA (``transformers``' ``LlavaModel.get_image_features``) runs the whole tower with hidden states, takes
``hidden_states[vision_feature_layer]`` (``[0]`` after ``pre_layrnorm``, ``[i]`` the output of layer i), drops the
class token when ``vision_feature_select_strategy`` is ``default`` and applies ``multi_modal_projector``. Here the
same computation starts from the tokens at any block: ``hidden_states[0]`` of the pixels (uncompressed,
reconstruction), ``E(x_hat) + A(y_hat)`` (adapter), or the neck's ``T(y_hat)`` standing for ``hidden_states[k]``
(neck), so C' is the tower's own encoder layers k+1.. and no second copy of CLIP is loaded.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from torch import Tensor, nn

from comneck_cli.clip.tower import MLLM_TAG
from comneck_cli.errors import ComneckError, ModelFileError

TOWER_KEY = "vision_tower."
STRATEGIES = ("default", "full")


class LlavaTower:
    """The tower, projector and feature preset of one ``LlavaForConditionalGeneration`` (shared, not copied)."""

    def __init__(self, model: nn.Module) -> None:
        config = model.config
        if not isinstance(config.vision_feature_layer, int):
            raise ModelFileError(f"vision_feature_layer {config.vision_feature_layer} concatenates several layers; "
                                 "comneck supports LLaVA models that read one layer (LLaVA-1.5)")
        if config.vision_feature_select_strategy not in STRATEGIES:
            raise ModelFileError(f"unknown vision_feature_select_strategy "
                                 f"{config.vision_feature_select_strategy!r}; comneck knows {', '.join(STRATEGIES)}")
        self.vision = model.model.vision_tower
        self.projector = model.model.multi_modal_projector
        self.layers = self.vision.encoder.layers
        self.layer = config.vision_feature_layer
        self.strategy = config.vision_feature_select_strategy
        vc = config.vision_config
        self.width, self.image_size, self.patch_size = vc.hidden_size, vc.image_size, vc.patch_size
        self.grid = (vc.image_size // vc.patch_size,) * 2

    @property
    def layer_index(self) -> int:
        """``vision_feature_layer`` as an index into the ``len(layers) + 1`` hidden states."""
        return self.layer % (len(self.layers) + 1)

    def embed(self, pixel_values: Tensor) -> Tensor:
        """``hidden_states[0]``: patch and position embedding, class token, ``pre_layrnorm``."""
        return self.vision.pre_layrnorm(self.vision.embeddings(pixel_values))

    def features(self, tokens: Tensor, start: int = 0) -> Tensor:
        """Tokens ``hidden_states[start]`` (B, 1 + P, width) -> the projected image features (B, rows, hidden) the
        language model reads: the tower's layers start+1..``vision_feature_layer``, the class token dropped when the
        strategy is ``default``, then ``multi_modal_projector``."""
        index = self.layer_index
        if index < start:
            raise ComneckError(f"the model reads hidden state {self.layer} (layer {index}), below the split k={start} "
                               "where the tokens enter; use a neck with a smaller k")
        x = tokens
        for block in self.layers[start:index]:
            x = block(x, None)  # the vision tower runs without an attention mask
        if self.strategy == "default":
            x = x[:, 1:]
        return self.projector(x)


def tower_name(vision_config) -> str:
    """A name for the tower's architecture, as necks record their CLIP model: ``hf-clip-w1024-l24-p14-336``."""
    vc = vision_config
    return f"hf-clip-w{vc.hidden_size}-l{vc.num_hidden_layers}-p{vc.patch_size}-{vc.image_size}"


def tower_digest(folder: Path) -> str:
    """The first 8 hex digits of the sha256 of the vision tower's tensors as stored in a checkpoint ``folder``'s
    safetensors files (sorted by name: name, dtype, shape, bytes), whatever dtype the model is loaded in: a neck
    records it as its CLIP weights tag (``mllm-DIGEST``), so it only serves the tower it was trained for."""
    from safetensors import safe_open

    stored = _stored_tower(folder)
    digest = hashlib.sha256()
    for name in sorted(stored):
        file, key = stored[name]
        with safe_open(str(file), framework="pt") as f:
            tensor = f.get_tensor(key)
        digest.update(json.dumps([name, str(tensor.dtype), list(tensor.shape)]).encode())
        digest.update(tensor.contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:8]


def _stored_tower(folder: Path) -> dict[str, tuple[Path, str]]:
    """The vision tower's tensors in a checkpoint ``folder``'s safetensors files: name inside the tower -> (file,
    key); older checkpoints nest them under ``vision_model.``."""
    from safetensors import safe_open

    files = sorted(Path(folder).glob("*.safetensors"))
    if not files:
        raise ModelFileError(f"{folder} has no .safetensors weights; comneck reads LLaVA checkpoints saved as "
                             "safetensors (save_pretrained's default)")
    stored = {}
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                if TOWER_KEY in key:
                    name = key.split(TOWER_KEY, 1)[1]
                    stored[name.removeprefix("vision_model.")] = (file, key)
    if not stored:
        raise ModelFileError(f"{folder}'s weights hold no vision_tower tensors; pass a LLaVA checkpoint folder")
    return stored


def load_vision_tower(folder: Path, vision_config) -> nn.Module:
    """The checkpoint's CLIP vision tower alone (``CLIPVisionModel``, float32, eval mode), read from its stored
    tensors without loading the language model."""
    from safetensors import safe_open
    from transformers import CLIPVisionModel

    tower = CLIPVisionModel(vision_config)
    state = {}
    for name, (file, key) in _stored_tower(folder).items():
        with safe_open(str(file), framework="pt") as f:
            state[name] = f.get_tensor(key).float()
    missing, unexpected = tower.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ModelFileError(f"{folder}'s vision tower does not fit its config ({len(missing)} tensor(s) missing, "
                             f"{len(unexpected)} unexpected, e.g. {(missing or unexpected)[0]})")
    return tower.eval()
