"""CLIP features for MLLMs, three ways (paper Fig. 2 and §4.1):

- ``neck`` (the product): ``.cnk`` -> entropy-decode ``y_hat`` -> transform-neck T -> C' -> features.
  The image is never decoded: ``g_s`` does not run.
- ``reconstruction`` (the paper's *Reconstruction* baseline): ``.cnk`` -> ``g_s`` -> x_hat -> full C -> features.
- ``uncompressed`` (the upper bound): image -> full C -> features, i.e. C(x).
- ``adapter`` (CoTAM, :mod:`comneck_cli.models.adapter`): ``.cnk`` -> ``g_s`` -> x_hat -> C's embedding E, plus the
  decoder adapter's A(y_hat) -> C's blocks 1..L, i.e. C_{1..L}(E(x_hat) + A(y_hat)).

Feature selection follows Hugging Face's hidden-state numbering (see :func:`comneck_cli.clip.tower.select_features`);
the default, layer -2 patch tokens, is what LLaVA and Shikra feed their projector.

:class:`FeatureExtractor` holds one (neck, CLIP) pair; :class:`FeatureRunner` is the one feature path of
``comneck features`` and ``comneck batch features``: the extractors of a run and their batching.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from comneck_cli import coding as api
from comneck_cli import hub
from comneck_cli import weights as registry
from comneck_cli.clip.preprocess import ClipPreprocess
from comneck_cli.clip.tower import ClipHead, ClipTail, resolve_clip, weights_entry_name
from comneck_cli.codecs import Codec
from comneck_cli.errors import ComneckError, MismatchError, RegistryError, UsageError
from comneck_cli.formats import Limits, Record, latent_grids
from comneck_cli.models.adapter import AdapterInfo, DecoderAdapter, adapted_tokens, load_adapter, resolve_adapter
from comneck_cli.models.neck import NeckInfo, TransformNeck, load_neck

VIAS = ("neck", "reconstruction", "uncompressed", "adapter")


def neck_registry_name(codec: str, quality: int) -> str:
    """Where ``features`` looks for a neck when none is named: ``{codec}-q{quality}-neck``, or ``{codec}-neck`` for a
    variable-rate codec, whose one neck serves every rate."""
    from comneck_cli.codecs import CODECS

    spec = CODECS.get(codec)
    return f"{codec}-neck" if spec is not None and spec.variable_rate else f"{codec}-q{quality}-neck"


def resolve_neck(neck: str | Path | None, record: Record | None = None, *, tower: str | None = None) -> Path:
    """``neck`` by :func:`comneck_cli.hub.resolve`'s rule (a file, else a registered name), else the registry's neck
    for the record's codec. ``tower``: the MLLM checkpoint the neck must feed, for the training command the error
    names when none is registered (a neck of open_clip's ViT-L-14 would not fit it)."""
    trained = neck is None and record is not None and record.codec_name is not None
    return hub.resolve(neck, "neck", default=_trained_neck(record, tower) if trained else None)


def _trained_neck(record: Record, tower: str | None = None) -> str:
    """The registered neck trained on the record's codec weights, found by the digest its entry records (a d2/d3
    codec has its own neck); the codec's default name when it is one of them or none records the digest."""
    digest = record.weights_digest.hex()
    entries = registry.entries().values()
    trained = sorted(e.name for e in entries if e.kind == "neck" and e.info.get("codec_digest") == digest)
    name = neck_registry_name(record.codec_name, record.quality)
    if trained:
        return name if name in trained else trained[0]
    if registry.lookup(name) is not None:
        return name  # a neck of other weights: FeatureExtractor.check says which weights it needs
    if record.codec_name == "elic-comneck" and tower is None:  # the authors' release: the file of its scenario
        scenario = next((e.info.get("scenario") for e in entries
                         if e.kind == "codec" and e.sha256.startswith(digest)), None) or "d{S}"
        how = f"import its release file with `comneck weights import-comneck {scenario}_{record.quality}.pth.tar`"
        raise RegistryError(f"no neck is registered for {record.codec_name} quality {record.quality} codec weights "
                            f"{digest}; {how}, or pass `neck` FILE", params=("neck",))
    variable = name == f"{record.codec_name}-neck"  # one neck serves every rate: no quality to name
    what = f"{record.codec_name} records (one neck serves every rate)" if variable else (
        f"{record.codec_name} quality {record.quality} records")
    train = f"comneck train neck --codec {record.codec_name}" + ("" if variable else f" -q {record.quality}")
    if tower is not None:
        raise RegistryError(f"no neck for {what} of codec weights {digest}: the registry has none trained on them and "
                            f"no {name}; pass `neck` FILE trained for {tower}'s tower, or train one with `{train} "
                            f"--clip-from-mllm {tower} --steps 0,0,N`", params=("neck",))
    raise RegistryError(
        f"no neck for {what} of codec weights {digest}: the registry has none trained on them and no {name}; pass "
        f"`neck` FILE, or train one with `{train}`, which distils CLIP ViT-L-14's openai weights (offline: import "
        f"them first with `comneck weights import {weights_entry_name('ViT-L-14', 'openai')} FILE --kind clip`, or "
        "train against a random tower with `--clip-tag none`, for trying the pipeline only)", params=("neck",))


@dataclass
class FeatureExtractor:
    """The loaded pieces for one (neck, CLIP) pair, reused over many inputs.

    ``tail`` is C' (blocks k+1..L); ``head`` is C (patch embedding + first k blocks), used only by the
    reference paths that start from pixels. With a decoder ``adapter`` (:meth:`attach_adapter`; k = 0) the tail
    reads E(x_hat) + A(y_hat) (:meth:`adapted`) instead of E(x_hat).
    """

    clip: nn.Module
    k: int
    device: torch.device
    neck: TransformNeck | None = None
    info: NeckInfo | None = None
    neck_path: Path | None = None
    pad_to_square: bool = False  # LLaVA-1.5's expand2square before CLIP's own preprocessing
    clip_model: str | None = None  # the tower's open_clip name and weights tag, for the features' metadata;
    clip_tag: str | None = None  # a neck's info says them where there is one
    limits: Limits | None = None  # max_tokens bounds the latent grids the neck and C' take (default: environment's)
    adapter: DecoderAdapter | None = None
    adapter_info: AdapterInfo | None = None
    adapter_path: Path | None = None
    adapter_digest: str | None = None  # first 16 hex digits of the adapter file's sha256, for metadata and eval rows
    _prep: ClipPreprocess | None = field(default=None, repr=False)

    @property
    def tail(self) -> ClipTail:
        if not hasattr(self, "_tail"):
            # C' as the neck was trained against it (the authors' released necks: ln_post applied twice)
            twice = self.info is not None and self.info.ln_post_twice
            self._tail = ClipTail(self.clip.visual, self.k, ln_post_twice=twice)
        return self._tail

    @property
    def head(self) -> ClipHead:
        if not hasattr(self, "_head"):
            self._head = ClipHead(self.clip.visual, self.k)
        return self._head

    @classmethod
    def for_neck(cls, neck_path: Path, *, clip_weights: Path | None = None, device="cpu") -> "FeatureExtractor":
        neck, info = load_neck(neck_path, device=device)
        clip = resolve_clip(info.clip_model, info.clip_tag, clip_weights, device=device, seed=info.clip_seed,
                            owner=f"neck {neck_path}")
        return cls(clip=clip, k=info.k, device=torch.device(device), neck=neck, info=info, neck_path=neck_path)

    @classmethod
    def for_clip(cls, model_name: str, tag: str | None, *, clip_weights: Path | None = None, k: int = 0,
                 device="cpu", seed: int | None = None, owner: str | None = None) -> "FeatureExtractor":
        """The tower alone; ``seed``/``owner`` as :func:`resolve_clip` takes them, for a random tower."""
        clip = resolve_clip(model_name, tag, clip_weights, device=device, seed=seed, owner=owner)
        return cls(clip=clip, k=k, device=torch.device(device), clip_model=model_name, clip_tag=tag)

    def attach_adapter(self, path: Path, codec: Codec,
                       loaded: tuple[DecoderAdapter, AdapterInfo] | None = None) -> None:
        """Load the decoder adapter A at ``path`` (or take it ``loaded``) for this extractor's tower C (k = 0: C
        runs from its first block on E(x_hat) + A(y_hat)), refusing one trained on latents of another codec than
        ``codec`` (or of other codec weights) or to correct another CLIP's tokens."""
        adapter, info = loaded or load_adapter(path, device=self.device)
        info.check_codec(codec, path)
        info.check_clip(self.clip_model, self.clip_tag, path)
        self.adapter, self.adapter_info = adapter, info
        self.adapter_path, self.adapter_digest = Path(path), registry.file_sha256(Path(path))[:16]

    def check_adapter(self, codec: Codec) -> None:
        """Refuse latents of a codec (or codec weights) other than the one the attached adapter was trained on."""
        self.adapter_info.check_codec(codec, self.adapter_path)

    def adapted(self, y_hat: Tensor, x_hat: np.ndarray) -> Tensor:
        """E(x_hat) + A(y_hat) (1, 1 + P, width) for one record: its decoded image ``x_hat`` (uint8 H×W×3) through
        CLIP's preprocessing and C's embedding E, plus the adapter's tokens of its latents ``y_hat`` (1, M, h, w).
        They enter C's first block (:meth:`from_tokens`)."""
        clip_input = self.preprocess(x_hat)[None].to(self.device)
        return adapted_tokens(self.adapter, self.head.embed, y_hat, clip_input, *x_hat.shape[:2])

    def preprocess(self, image: np.ndarray) -> Tensor:
        """open_clip's own eval transform (resize shortest side, centre crop, normalise) for one uint8 image."""
        if self._prep is None:
            self._prep = ClipPreprocess(self.clip)
        return self._prep.image(image, pad_to_square=self.pad_to_square)

    @torch.inference_mode()
    def from_latents(self, y_hats: Sequence[Tensor], layer: int, select: str) -> Tensor:
        """C'(T(y_hat)) for latents of one grid size, batched: (B, ...) features."""
        if self.neck is None:
            raise ComneckError("no neck loaded; pass `neck`", params=("neck",))
        for y_hat in y_hats:
            self.check_tokens(*y_hat.shape[-2:], "latents")
        return self._tail_features(self.neck(torch.cat(list(y_hats)).to(self.device)), layer, select)

    @torch.inference_mode()
    def from_tokens(self, tokens: Sequence[Tensor], layer: int, select: str) -> Tensor:
        """C_{1..L} on layer-0 tokens (:meth:`adapted`), batched."""
        return self._tail_features(torch.cat(list(tokens)).to(self.device), layer, select)

    @torch.inference_mode()
    def from_images(self, images: Sequence[np.ndarray], layer: int, select: str) -> Tensor:
        """C(x) through the full tower, batched."""
        x = torch.stack([self.preprocess(im) for im in images]).to(self.device)
        return self._tail_features(self.head(x), layer, select)

    def _tail_features(self, tokens: Tensor, layer: int, select: str) -> Tensor:
        # Only what the selection needs: LLaVA's layer -2 never runs the last block.
        out = self.tail(tokens, layer=None if select in ("pooled", "projected") else layer,
                        embedding=select == "pooled", projected=select == "projected")
        return out.select(layer, select).float().cpu()

    def check_tokens(self, rows: int, cols: int, subject: str) -> None:
        """Refuse a latent grid with more positions than ``limits.max_tokens``: the neck and C' attend over all of
        them at once, so their memory grows with its square (README, "Reliability")."""
        (self.limits or Limits.from_env()).check_tokens(rows, cols, subject)

    def check(self, record: Record, codec: Codec) -> None:
        """Refuse, before anything is decoded, a record the neck was not trained for (codec, quality, or codec
        weights) or whose latent grid is over the token limit."""
        self.check_tokens(*latent_grids(record.height, record.width)[0], "record")
        if self.info is None:
            return
        self.info.check_matches(
            record.codec_name or f"id {record.codec_id}", record.quality, record.weights_digest,
            self.info.clip_model, self.info.clip_tag, self.info.k, neck=self.neck_path or "this neck",
        )
        api.check_record(record, codec)


@dataclass(frozen=True)
class Resolved:
    """What :meth:`FeatureRunner.resolve` found for one input: the extractor it runs through (neck or decoder adapter
    with its CLIP, or the tower alone) and the record's codec (None for an image)."""

    extractor: FeatureExtractor
    codec: Codec | None = None


class FeatureRunner:
    """The one feature extractor of ``comneck features`` and ``comneck batch features``: the models of one run,
    loaded once, and the per-input steps.

    ``via`` is one of :data:`VIAS`; ``neck`` a file or registry name (None: each record's registry neck); ``adapter``
    the decoder adapter's, for ``via`` adapter (None: the registry's ``{codec}-adapter`` of each record's codec), run
    with the tower ``clip_model``/``clip_tag`` it must have been trained for; ``family`` the MLLM preset whose tower
    the necks must feed (``clip.presets``; it only checks, the caller applies the preset's layer, selection and
    tower). A run is, per input, :meth:`resolve` (the one step that finds and checks every model it needs) and
    :meth:`prepare` (entropy-decode ``y_hat``, or decode through ``g_s``), each raising :class:`ComneckError` for
    that input alone, then :meth:`compute`: one batched forward per (extractor, latent grid) group.
    """

    def __init__(self, *, via: str = "neck", neck: str | Path | None = None, layer: int = -2, select: str = "patch",
                 clip_model: str = "ViT-L-14", clip_tag: str | None = "openai", clip_weights: Path | None = None,
                 weights: Path | str | None = None, device: torch.device | str = "cpu", family: str | None = None,
                 pad_to_square: bool = False, adapter: str | Path | None = None) -> None:
        if adapter is not None and via != "adapter":
            raise UsageError(f"`adapter` applies to `via` adapter only, not {via}; drop it or pass `via` adapter",
                             params=("adapter", "via"))
        if neck is not None and via == "adapter":
            raise UsageError("`via` adapter runs the whole CLIP tower, not a neck; drop `neck`", params=("via", "neck"))
        self.via, self.neck, self.adapter, self.layer, self.select = via, neck, adapter, layer, select
        self.clip_model, self.clip_tag, self.clip_weights, self.device = clip_model, clip_tag, clip_weights, device
        self.family, self.pad_to_square = family, pad_to_square
        self.cache = api.CodecCache(device, weights)
        self._extractors: dict[object, FeatureExtractor] = {}

    def resolve(self, payload: Record | np.ndarray | None = None) -> Resolved:
        """Everything one input needs, in one step, before anything is decoded or computed: the record's codec, the
        neck or decoder adapter its codec weights call for, and the CLIP tower, each loaded once per run and checked
        against the record (codec, quality, weights, token limit). A record that cannot be served raises
        :class:`ComneckError` for that input alone. ``payload`` is a record, or an image (or None) for ``via``
        uncompressed, whose only model is the tower."""
        codec = None if self.via == "uncompressed" else self.cache.for_record(payload)
        if self.via == "adapter":
            return Resolved(self._adapter_extractor(codec), codec)
        if self.via == "neck" or self.neck is not None:  # a reference path with `neck` runs the neck's CLIP
            extractor = self._neck_extractor(resolve_neck(self.neck, None if codec is None else payload))
            if self.via == "neck":
                extractor.check(payload, codec)
            return Resolved(extractor, codec)
        return Resolved(self._tower(), codec)

    def extractor_for(self, record: Record | None = None) -> FeatureExtractor:
        """The extractor of a record (:meth:`resolve`) or, for the reference paths without a neck, the tower's."""
        return self.resolve(record).extractor

    def _neck_extractor(self, path: Path) -> FeatureExtractor:
        """The neck at ``path`` and the CLIP it was trained for, loaded once per run."""
        if path not in self._extractors:
            extractor = FeatureExtractor.for_neck(path, clip_weights=self.clip_weights, device=self.device)
            if self.family is not None and extractor.info.clip_model != self.clip_model:
                raise MismatchError(
                    f"neck {path} was trained for CLIP {extractor.info.clip_model}, but `family` {self.family} "
                    f"reads {self.clip_model}; use a neck trained for {self.clip_model}", params=("family",))
            extractor.pad_to_square = self.pad_to_square
            self._extractors[path] = extractor
        return self._extractors[path]

    def _tower(self, seed: int | None = None, owner: str | None = None) -> FeatureExtractor:
        """The full tower C of ``clip_model``/``clip_tag`` (``clip_weights``), loaded once per run; a random tower
        (tag none) is the one ``seed`` draws, as the model trained against it (``owner``) recorded it."""
        key = None if seed is None else ("random tower", seed)
        if key not in self._extractors:
            extractor = FeatureExtractor.for_clip(self.clip_model, self.clip_tag, clip_weights=self.clip_weights,
                                                  device=self.device, seed=seed, owner=owner)
            extractor.pad_to_square = self.pad_to_square
            self._extractors[key] = extractor
        return self._extractors[key]

    def _adapter_extractor(self, codec: Codec) -> FeatureExtractor:
        """The full tower with the adapter of a record's ``codec`` (``adapter``, else its codec's registry adapter)
        attached, checked against the codec weights; the tower is loaded once for every adapter of the run."""
        path = resolve_adapter(self.adapter, codec)
        if path not in self._extractors:
            loaded = load_adapter(path, device=self.device)
            loaded[1].check_clip(self.clip_model, self.clip_tag, path)  # before a tower it cannot use is loaded
            clip = self._tower(loaded[1].clip_seed, owner=f"adapter {path}").clip
            tower = FeatureExtractor(clip=clip, k=0, device=torch.device(self.device), clip_model=self.clip_model,
                                     clip_tag=self.clip_tag, pad_to_square=self.pad_to_square)
            tower.attach_adapter(path, codec, loaded)
            self._extractors[path] = tower
            return tower
        self._extractors[path].check_adapter(codec)  # another record of the run may be of another codec
        return self._extractors[path]

    def feature_shape(self, resolved: Resolved, payload: Record | np.ndarray | None = None) -> tuple[int, ...]:
        """The shape of one input's features (no batch dim), from the record's header alone: on the neck path the
        token count is the record's latent grid (``formats.latent_grids``: the image padded to a multiple of 64,
        over 16), on the others CLIP's own grid, since its preprocessing resizes every image to the tower's input."""
        visual = resolved.extractor.clip.visual
        width = visual.transformer.width
        embedding = width if visual.proj is None else visual.proj.shape[1]
        rows, cols = latent_grids(payload.height, payload.width)[0] if self.via == "neck" else visual.grid_size
        tokens = rows * cols
        return {"patch": (tokens, width), "cls": (width,), "all": (1 + tokens, width), "pooled": (embedding,),
                "projected": (1 + tokens, embedding)}[self.select]

    def prepare(self, payload: Record | np.ndarray, resolved: Resolved | None = None
                ) -> tuple[FeatureExtractor, Tensor | np.ndarray]:
        """A record (an image for ``uncompressed``) -> (its extractor, ``y_hat``, the image to run C on, or for
        ``adapter`` the layer-0 tokens E(x_hat) + A(y_hat)); ``resolved`` is its :meth:`resolve`, found here when
        not given."""
        resolved = resolved or self.resolve(payload)
        extractor, codec = resolved.extractor, resolved.codec
        if self.via == "uncompressed":
            return extractor, payload
        if self.via == "neck":
            return extractor, api.decode_latents(payload, codec)
        if self.via == "adapter":
            return extractor, extractor.adapted(*api.decode_with_latents(payload, codec))
        return extractor, api.decode(payload, codec)

    def compute(self, prepared: Sequence[tuple[FeatureExtractor, Any]],
                names: Sequence[str] | None = None) -> tuple[list[Tensor | ComneckError], list[str]]:
        """Features (one tensor per input, no batch dim) or the :class:`ComneckError` of its group, in input order,
        and the warnings the forward passes gave (the neck interpolating its positions, say), each once."""
        from comneck_cli.io.images import size_label

        names = names or [f"input {i + 1}" for i in range(len(prepared))]
        out: list[Any] = [None] * len(prepared)
        groups: dict[tuple, list[int]] = {}
        for i, (extractor, x) in enumerate(prepared):
            key = (id(extractor), tuple(x.shape[-2:]) if self.via == "neck" else ())
            groups.setdefault(key, []).append(i)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for indices in groups.values():
                extractor = prepared[indices[0]][0]
                forward = {"neck": extractor.from_latents, "adapter": extractor.from_tokens}.get(
                    self.via, extractor.from_images)
                # The adapter's tokens are on C's grid whatever the image's size: the name says which input.
                describe = (lambda i: names[i]) if self.via == "adapter" else (
                    lambda i: f"{names[i]} ({size_label(prepared[i][1])})")
                try:
                    feats = api.split_on_oom(
                        lambda part: list(forward([prepared[i][1] for i in part], self.layer, self.select)),
                        indices, describe)
                except ComneckError as exc:
                    feats = [exc] * len(indices)
                for i, f in zip(indices, feats):
                    out[i] = f
        return out, list(dict.fromkeys(str(w.message) for w in caught))

    def metadata(self, extractor: FeatureExtractor, source: str) -> dict[str, str]:
        """What the features file of ``source`` records about how it was made (:func:`metadata`)."""
        return metadata(extractor, self.via, self.layer, self.select, source)


def metadata(extractor: FeatureExtractor, via: str, layer: int, select: str, source: str) -> dict[str, str]:
    """What a features file records about how it was made (strings, so safetensors can carry it)."""
    visual = extractor.clip.visual
    meta = {
        "format": "comneck-features",
        "via": via,
        "layer": str(layer),
        "select": select,
        "source": source,
        "clip_image_size": str(getattr(visual, "image_size", "")),
        "pad_to_square": str(extractor.pad_to_square),
    }
    if extractor.clip_model is not None:
        meta.update(clip_model=extractor.clip_model, clip_tag=str(extractor.clip_tag))
    if extractor.info is not None:
        meta.update(
            clip_model=extractor.info.clip_model, clip_tag=str(extractor.info.clip_tag), k=str(extractor.info.k),
            neck_codec=extractor.info.codec, neck_quality=str(extractor.info.quality),
            neck_scenario=extractor.info.scenario,
        )
    if extractor.adapter_info is not None:
        meta.update(adapter=extractor.adapter_path.name, adapter_digest=extractor.adapter_digest,
                    adapter_codec=extractor.adapter_info.codec)
    return meta


def save_features(tensor: Tensor, path: Path | None, meta: dict[str, str], *, force: bool = False) -> bytes | None:
    """Serialise by extension: ``.pt`` (dict with tensor + metadata), ``.safetensors``, ``.npy``; atomic write."""
    import io

    from comneck_cli.io.outputs import write_atomic

    suffix = path.suffix.lower() if path is not None else ".pt"
    tensor = tensor.contiguous()
    if suffix == ".pt":
        buffer = io.BytesIO()
        torch.save({"features": tensor, "metadata": dict(meta)}, buffer)
        data = buffer.getvalue()
    elif suffix == ".safetensors":
        from comneck_cli.modelfiles import safetensors_bytes

        data = safetensors_bytes({"features": tensor}, meta)  # the same bytes on every run
    elif suffix == ".npy":
        buffer = io.BytesIO()
        np.save(buffer, tensor.numpy())
        data = buffer.getvalue()
    else:
        raise ComneckError(f"cannot write features to {path}: use a .pt, .safetensors or .npy file, or a folder")
    if path is None:
        return data
    write_atomic(path, data, force=force)
    return None
