"""open_clip loading and the split of the CLIP visual encoder C into its first k blocks and the rest, C'.

In the paper (§3.3) the transform-neck T turns the codec's quantized latents ``y_hat`` into the tokens that
enter block k+1 of the CLIP visual encoder C (k = 2 for ViT-L/14), so the features an MLLM reads are
``C'(T(y_hat))`` instead of ``C(x)``. This module cuts an open_clip ``VisionTransformer`` there:

- :class:`ClipHead` is C's first part: patch embedding, class token, positional embedding, ``ln_pre`` and
  blocks ``1..k``. It is what the teacher runs on an image and what the neck replaces.
- :class:`ClipTail` is C': blocks ``k+1..L``, then ``ln_post``, pooling and ``proj`` as open_clip does it.
  ``ClipTail(ClipHead(x))`` equals ``model.encode_image(x)``.

Hidden states follow Hugging Face ``transformers``' numbering, which MLLM code is written against:
``hidden_states[0]`` is the embedding after ``ln_pre`` and ``hidden_states[i]`` the output of block i, so
``hidden_states[-2]`` is the output of block 23 of 24 in ViT-L/14 (what LLaVA reads). The tail computes
``hidden_states[k..L]``; ``hidden_states[k]`` is its own input (the neck's output). States below k live in
C, which the neck replaces, and asking for them is an error.

Everything here is batch-first: tokens are ``(B, 1 + P, width)`` with the class token first, whatever
``transformer.batch_first`` says inside open_clip.
"""

from __future__ import annotations

import logging
import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Literal, Sequence

import torch
from torch import Tensor, nn

from comneck_cli.errors import ComneckError, ModelFileError

if TYPE_CHECKING:  # open_clip costs ~2.5 s to import: only functions that need it import it
    from open_clip.transformer import VisionTransformer

Select = Literal["patch", "cls", "all", "pooled", "projected"]
SELECTS: tuple[str, ...] = ("patch", "cls", "all", "pooled", "projected")


RANDOM_TAG = "none"
"""The weights tag of a randomly initialised tower (``--clip-tag none``), as model files record it."""


def open_clip_tag(tag: str | None) -> str | None:
    """open_clip's ``pretrained`` for a weights tag: None for :data:`RANDOM_TAG` (any case) or no tag."""
    return None if tag is None or str(tag).lower() == RANDOM_TAG else str(tag)


def tag_name(tag: str | None) -> str:
    """A weights tag as model files and messages write it: :data:`RANDOM_TAG` for random weights, never "None"."""
    return open_clip_tag(tag) or RANDOM_TAG


def weights_entry_name(model_name: str, tag: str | None) -> str:
    """The ``comneck weights`` registry name for a CLIP model and weights tag (``clip-vit-l-14-openai``)."""
    return f"clip-{model_name}-{tag_name(tag)}".lower().replace("/", "-")


def resolve_clip(model_name: str, tag: str | None, weights_file: Path | None = None,
                 device: torch.device | str = "cpu", *, seed: int | None = None, owner: str | None = None
                 ) -> nn.Module:
    """CLIP from ``weights_file`` (a file or a registered name, :func:`comneck_cli.hub.resolve`), else the registry
    entry ``clip-<model>-<tag>`` (sha256-checked), else open_clip's Hugging Face cache or hub (:func:`load_clip`).

    Random weights (tag ``none``) are rebuilt from ``seed`` when a model file recorded the one it was trained
    against (:func:`random_clip`); ``owner`` (e.g. ``"neck FILE"``) is a model trained against random weights that
    recorded none, which no new draw would match: then the tower must come as a file, or the error says how."""
    from comneck_cli import hub

    if weights_file is not None:
        weights_file = hub.resolve(weights_file, "clip", param="clip_weights")
    else:
        weights_file = hub.find(weights_entry_name(model_name, tag), "clip")
    if weights_file is None and open_clip_tag(tag) is None:
        if seed is not None:
            return random_clip(model_name, seed, device)
        if owner is not None:
            entry = weights_entry_name(model_name, tag)
            raise ModelFileError(
                f"{owner} was trained against CLIP {model_name} with random weights (`clip_tag` none) that it does "
                f"not record; pass that tower's weights file as `clip_weights`, or register it once with "
                f"`comneck weights import {entry} FILE --kind clip`", params=("clip_weights", "clip_tag"))
    return load_clip(model_name, tag, weights_file=weights_file, device=device)


def random_clip(model_name: str, seed: int, device: torch.device | str = "cpu") -> nn.Module:
    """The randomly initialised tower ``torch.manual_seed(seed)`` gives, leaving the caller's random state as it
    was: what a training run with ``clip_tag`` none seeds before it builds its tower (open_clip initialises on the
    CPU, whatever the device), so a model trained against it can be used without the tower's file."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return load_clip(model_name, None, device="cpu").to(device)


# The weights tag of an MLLM's own vision tower (comneck_cli.mllm), before its digest: open_clip has no such weights.
MLLM_TAG = "mllm-"


def load_clip(
    model_name: str = "ViT-L-14",
    pretrained: str | None = "openai",
    *,
    weights_file: Path | None = None,
    device: torch.device | str = "cpu",
    cache_dir: Path | None = None,
) -> nn.Module:
    """Build an open_clip CLIP model in eval mode, with weights from a tag or a local file.

    ``pretrained`` is an open_clip weights tag (``"openai"``) or None for random weights. OpenAI's weights
    were trained with QuickGELU while open_clip's ``ViT-L-14`` config uses GELU (it only warns), so a tag
    whose open_clip entry says ``quick_gelu`` (every ``openai`` tag) forces QuickGELU. ``weights_file`` (a
    local .bin/.pt/.safetensors state dict) replaces the download; the tag still decides QuickGELU.
    Downloads go through the Hugging Face cache (``HF_HOME``, or ``cache_dir``); offline, a missing file is a
    :class:`ComneckError` saying how to supply it.
    """
    import open_clip

    if str(pretrained).startswith(MLLM_TAG):
        raise ComneckError(
            f"CLIP {model_name}/{pretrained} is the vision tower of an MLLM, which open_clip cannot load: models "
            "trained for it run inside that MLLM (`comneck ask`, `eval` with `mllm`, `serve`'s /v1/ask)",
            params=("mllm",))
    pretrained = open_clip_tag(pretrained)  # "none" (as model files record it): random weights
    name = model_name.replace("/", "-")
    if name not in open_clip.list_models():
        raise ComneckError(
            f"unknown CLIP model {model_name!r}; pass `clip_model` an open_clip model name such as ViT-L-14 "
            "(see open_clip.list_models())", params=("clip_model",)
        )
    tag_cfg = open_clip.get_pretrained_cfg(name, pretrained) if pretrained else {}
    quick_gelu = pretrained == "openai" or bool(tag_cfg.get("quick_gelu", False))
    source = pretrained
    if weights_file is not None:
        weights_file = Path(weights_file)
        if not weights_file.is_file():
            raise ModelFileError(
                f"CLIP weights file {weights_file} does not exist; pass `clip_weights` an existing "
                ".bin/.pt/.safetensors file", params=("clip_weights",)
            )
        source = str(weights_file)
    elif pretrained and not tag_cfg:
        tags = ", ".join(open_clip.list_pretrained_tags_by_model(name)) or "none"
        raise ComneckError(
            f"unknown weights tag {pretrained!r} for CLIP model {name}; use one of: {tags} "
            "(or pass a local weights file as `clip_weights`)", params=("clip_weights",)
        )
    download = weights_file is None and bool(pretrained) and not _hub_cached(tag_cfg, cache_dir)
    if download:
        # Not cached: fail at once rather than after a minute of Hugging Face's retries when nothing can be fetched.
        why = "HF_HUB_OFFLINE is set" if _hub_offline() else _hub_unreachable()
        if why is not None:
            raise ModelFileError(
                f"CLIP weights {name}/{pretrained} are not in the local cache and cannot be downloaded ({why}); "
                "download them on a connected machine (HF_HOME cache) or register a local file with "
                f"`comneck weights import {weights_entry_name(name, pretrained)} FILE`"
            )
    try:
        # open_clip's raw root-logger lines (WARNING:root:No pretrained weights loaded..., ERROR:root:...) and the
        # hub's retry warnings: what comneck has to say about the tower it says itself, in one line
        with _quiet_logs():
            model = open_clip.create_model(
                name,
                pretrained=source,
                force_quick_gelu=quick_gelu,
                device=device,
                cache_dir=None if cache_dir is None else str(cache_dir),
            )
    except Exception as exc:  # open_clip wraps hub/url/state-dict failures in RuntimeError and others
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if weights_file is not None:
            raise ModelFileError(
                f"CLIP weights file {weights_file} could not be loaded into {name} ({first}); "
                f"pass a state dict saved from open_clip's {name}"
            ) from exc
        if isinstance(exc, RuntimeError) and first.startswith("Failed to download weights"):
            raise ModelFileError(
                f"CLIP weights {name}/{pretrained} are not in the local cache and cannot be downloaded; download "
                "them on a connected machine (HF_HOME cache) or register a local file with "
                f"`comneck weights import {weights_entry_name(name, pretrained)} FILE` (offline, HF_HUB_OFFLINE=1 "
                "makes this fail at once)"
            ) from exc
        raise ComneckError(f"CLIP model {name}/{pretrained} could not be built ({first})") from exc
    return model.eval()


def _hub_cached(tag_cfg: dict, cache_dir: Path | None) -> bool:
    """Whether open_clip would find the tag's weights in the Hugging Face cache (True for tags it does not fetch
    from the hub: their URL download is open_clip's own business). Looks only in the cache, never on the network."""
    from huggingface_hub import hf_hub_download
    from open_clip.pretrained import HF_WEIGHTS_NAME, _get_safe_alternatives  # open_clip's own choice of file

    model_id, filename = os.path.split(tag_cfg.get("hf_hub", ""))
    if not model_id:
        return True
    filename = filename or HF_WEIGHTS_NAME
    for candidate in (*_get_safe_alternatives(filename), filename):
        try:
            hf_hub_download(model_id, candidate, cache_dir=None if cache_dir is None else str(cache_dir),
                            local_files_only=True)
            return True
        except Exception:  # noqa: BLE001 - LocalEntryNotFoundError and kin: not cached under this name
            continue
    return False


def _hub_offline() -> bool:
    from huggingface_hub import constants

    # huggingface_hub reads the variable once, at import; a change since then counts too.
    return constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")


def _hub_unreachable() -> str | None:
    """Why the Hugging Face endpoint cannot be reached (a 3-second connection attempt), or None; with a proxy set,
    None (the download goes through it)."""
    import socket
    from urllib.parse import urlsplit

    from huggingface_hub import constants

    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return None
    url = urlsplit(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout=3).close()
    except OSError as exc:
        return f"{url.hostname} is unreachable: {exc.strerror or exc}; HF_HUB_OFFLINE=1 skips trying"
    return None


@contextmanager
def _quiet_logs() -> Iterator[None]:
    logging.disable(logging.ERROR)
    try:
        yield
    finally:
        logging.disable(logging.NOTSET)


def _vision_tower(visual: nn.Module) -> "VisionTransformer":
    from open_clip.transformer import VisionTransformer

    if not isinstance(visual, VisionTransformer):
        raise ModelFileError(
            f"the CLIP visual tower is a {type(visual).__name__}, not an open_clip VisionTransformer; "
            "comneck can split only ViT CLIP models such as ViT-L-14"
        )
    if visual.attn_pool is not None:
        raise ModelFileError(
            "the CLIP visual tower uses attentional pooling (CoCa), which comneck cannot split; "
            "use a plain ViT CLIP model"
        )
    return visual


def _check_k(visual: nn.Module, k: int) -> int:
    layers = len(visual.transformer.resblocks)
    if not 0 <= k <= layers:
        raise ComneckError(f"split k={k} is outside the CLIP tower's 0..{layers} blocks; choose k in that range")
    return layers


class _Blocks(nn.Module):
    """Residual attention blocks of C run batch-first, transposing when open_clip's transformer is not."""

    def __init__(self, blocks: Sequence[nn.Module], batch_first: bool):
        super().__init__()
        self.resblocks = nn.ModuleList(blocks)
        self.batch_first = batch_first

    def forward(self, x: Tensor, keep: list[Tensor] | None = None) -> Tensor:
        if not self.batch_first:
            x = x.transpose(0, 1)
        for block in self.resblocks:
            x = block(x)  # the vision tower runs without an attention mask
            if keep is not None:
                keep.append(x if self.batch_first else x.transpose(0, 1))
        return x if self.batch_first else x.transpose(0, 1)


class ClipHead(nn.Module):
    """C, first part: the image -> tokens entering block k+1 (``hidden_states[k]``).

    Shares its parameters with ``visual`` (no copy): ``conv1`` patch embedding, ``class_embedding``,
    ``positional_embedding``, patch dropout (identity in eval), ``ln_pre``, then ``resblocks[:k]``.
    This is what the transform-neck T replaces and what the teacher runs on the uncompressed image x.
    """

    def __init__(self, visual: nn.Module, k: int):
        super().__init__()
        visual = _vision_tower(visual)
        _check_k(visual, k)
        self.k = k
        self.conv1 = visual.conv1
        self.class_embedding = visual.class_embedding
        self.positional_embedding = visual.positional_embedding
        self.patch_dropout = visual.patch_dropout
        self.ln_pre = visual.ln_pre
        self.blocks = _Blocks(visual.transformer.resblocks[:k], visual.transformer.batch_first)

    def embed(self, images: Tensor) -> Tensor:
        """``hidden_states[0]``: patch embedding, class token, positions and ``ln_pre`` (open_clip's ``_embeds``)."""
        x = self.conv1(images)  # (B, width, gh, gw)
        x = x.flatten(2).transpose(1, 2)  # (B, P, width)
        cls = self.class_embedding.to(x.dtype).view(1, 1, -1).expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype)
        return self.ln_pre(self.patch_dropout(x))

    def forward(self, images: Tensor) -> Tensor:
        """Images ``(B, 3, H, W)``, normalised as CLIP expects -> tokens ``(B, 1 + P, width)``."""
        return self.blocks(self.embed(images))


@dataclass
class ClipFeatures:
    """What C' computed: ``hidden_states`` has one entry per HF index ``0..L`` (None where not computed or
    not kept), ``embedding`` is the projected image embedding (``encode_image``), ``k`` the split,
    ``projected`` every last-layer token through ``ln_post`` and ``proj`` when asked for."""

    hidden_states: tuple[Tensor | None, ...]
    embedding: Tensor | None
    k: int
    projected: Tensor | None = None

    def select(self, layer: int, select: Select) -> Tensor:
        """The features an MLLM reads; see :func:`select_features`."""
        if select == "projected":
            if self.projected is None:
                raise ComneckError("projected tokens were not computed; run the CLIP tail with projected=True")
            return self.projected
        return select_features(self.hidden_states, self.embedding, layer, select, k=self.k)


def resolve_layer(layer: int, num_states: int, k: int | None) -> int:
    if not -num_states <= layer < num_states:
        raise ComneckError(
            f"hidden-state layer {layer} does not exist: the CLIP tower has {num_states - 1} blocks, "
            f"so use a layer in {-num_states}..{num_states - 1}"
        )
    index = layer % num_states
    if k is not None and index < k:
        what = "the embedding after ln_pre" if index == 0 else f"the output of block {index}"
        raise ComneckError(
            f"hidden-state layer {layer} ({what}) is computed inside C's first k={k} blocks, which the "
            f"transform-neck replaces, so it does not exist for compressed latents; use a layer from {k} "
            f"to {num_states - 1} (or {k - num_states}..-1)"
        )
    return index


def select_features(
    hidden_states: Sequence[Tensor | None],
    embedding: Tensor | None,
    layer: int,
    select: Select,
    *,
    k: int | None = None,
) -> Tensor:
    """Pick the features an MLLM reads from the CLIP tower.

    ``hidden_states`` is indexed as Hugging Face does (``[0]`` = embedding after ``ln_pre``, ``[i]`` = output
    of block i), ``layer`` may be negative (``-2`` = block 23 of 24 in ViT-L/14, LLaVA's choice). Hidden
    states are taken before ``ln_post``:

    - ``patch``: the patch tokens of that layer, class token dropped, ``(B, P, width)`` (LLaVA, Shikra);
    - ``cls``: the class token of that layer, ``(B, width)``;
    - ``all``: every token of that layer, ``(B, 1 + P, width)``;
    - ``pooled``: the projected image embedding ``encode_image`` returns, ``(B, output_dim)``; ``layer``
      is ignored.

    ``k`` (the split) turns a request for a state inside C into an error that says why.
    """
    if select not in SELECTS:
        raise ComneckError(f"unknown feature selection {select!r}; use one of {', '.join(SELECTS)}")
    if select == "pooled":
        if embedding is None:
            raise ComneckError("the pooled embedding was not computed; run the CLIP tail to the end")
        return embedding
    index = resolve_layer(layer, len(hidden_states), k)
    state = hidden_states[index]
    if state is None:
        raise ComneckError(
            f"hidden-state layer {layer} was not kept by the CLIP tail; run it with layer={layer} or layer=None"
        )
    if select == "patch":
        return state[:, 1:]
    if select == "cls":
        return state[:, 0]
    return state


class ClipTail(nn.Module):
    """C': tokens ``hidden_states[k]`` -> blocks ``k+1..L`` -> ``ln_post``, pooling, ``proj``.

    Shares its parameters with ``visual``. Pooling follows open_clip's ``_pool`` for towers without
    attentional pooling: ``ln_post`` on all tokens then the class token (``pool_type="tok"``) or the mean
    of the patch tokens (``"avg"``), or ``ln_post`` after pooling when ``final_ln_after_pool`` is set;
    the result times ``proj`` is ``encode_image``'s output.

    ``ln_post_twice`` applies ``ln_post`` twice wherever it applies once (before pooling and projection): the ComNeck
    authors' C' and teacher do (their ``CLIP_modify`` ``VisionTransformer.forward``), so their released necks were
    trained against, and must be used with, that C' (``NeckInfo.ln_post_twice``). Hidden states are unaffected.
    """

    def __init__(self, visual: nn.Module, k: int, *, ln_post_twice: bool = False):
        super().__init__()
        visual = _vision_tower(visual)
        self.num_layers = _check_k(visual, k)
        self.k = k
        self.ln_post_twice = ln_post_twice
        self.blocks = _Blocks(visual.transformer.resblocks[k:], visual.transformer.batch_first)
        self.ln_post = visual.ln_post
        self.proj = visual.proj  # a Parameter (pool_dim, output_dim), or None when pruned
        self.pool_type = visual.pool_type
        self.final_ln_after_pool = visual.final_ln_after_pool

    def pool(self, x: Tensor) -> Tensor:
        """Last hidden state -> projected image embedding (open_clip's ``_pool`` and ``proj``)."""
        if self.final_ln_after_pool:
            pooled = self._ln_post(self._global_pool(x))
        else:
            pooled = self._global_pool(self._ln_post(x))
        return pooled if self.proj is None else pooled @ self.proj

    def _ln_post(self, x: Tensor) -> Tensor:
        x = self.ln_post(x)
        return self.ln_post(x) if self.ln_post_twice else x

    def _global_pool(self, x: Tensor) -> Tensor:
        if self.pool_type == "avg":
            return x[:, 1:].mean(dim=1)
        if self.pool_type == "tok":
            return x[:, 0]
        return x

    def project_tokens(self, x: Tensor) -> Tensor:
        """Every token of the last hidden state through ``ln_post`` and ``proj`` (what LLaMA-Adapter reads)."""
        x = self._ln_post(x)
        return x if self.proj is None else x @ self.proj

    def forward(
        self, tokens: Tensor, *, layer: int | None = None, embedding: bool = True, projected: bool = False
    ) -> ClipFeatures:
        """Tokens ``(B, 1 + P, width)`` entering block k+1 -> :class:`ClipFeatures`.

        With ``layer`` (HF numbering, negative allowed) only that hidden state is kept; with None every
        state from k to L is kept. A layer inside C raises :class:`ComneckError`. Without ``embedding`` (and
        ``projected``) the blocks after ``layer`` are not run at all: LLaVA's layer -2 skips the last block.
        """
        num_states = self.num_layers + 1
        index = None if layer is None else resolve_layer(layer, num_states, self.k)
        computed = [tokens]
        run_all = embedding or projected or index is None
        blocks = self.blocks if run_all else _Blocks(self.blocks.resblocks[: index - self.k], self.blocks.batch_first)
        x = blocks(tokens, keep=computed)
        states: list[Tensor | None] = [None] * self.k + computed + [None] * (num_states - self.k - len(computed))
        if index is not None:
            states = [s if i == index else None for i, s in enumerate(states)]
        return ClipFeatures(
            hidden_states=tuple(states),
            embedding=self.pool(x) if embedding else None,
            k=self.k,
            projected=self.project_tokens(x) if projected else None,
        )


def split_clip(model: nn.Module, k: int, *, ln_post_twice: bool = False) -> tuple[ClipHead, ClipTail]:
    """C and C' of a CLIP model (or its ``visual`` tower) at split k, sharing the model's parameters (``ln_post_twice``:
    see :class:`ClipTail`)."""
    visual = getattr(model, "visual", model)
    return ClipHead(visual, k), ClipTail(visual, k, ln_post_twice=ln_post_twice)
