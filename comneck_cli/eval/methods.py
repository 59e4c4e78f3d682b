"""The methods ``comneck eval`` compares, one class each, reached through :data:`METHODS`.

Every method turns one evaluated image x into bytes (the rate), the image a person would see from them (or
none), and the input of a CLIP path: latents for ``C'(T(·))`` or an image for the full tower C. Per learned
quality q (point ``qQ``):

- ``neck``: ``.cnk`` -> ``y_hat`` -> transform-neck T -> C' (any d1/d2/d3 neck). A person would see the same
  codec's ``g_s`` reconstruction of the same bits; a d3 codec has none.
- ``reconstruction`` (the paper's *Reconstruction*, the BD-rate anchor): ``.cnk`` -> ``g_s`` -> x_hat -> C.
- ``postprocess`` (*Post-processing*): x_hat -> U-Net -> C; a person sees x_hat.
- ``semantic`` (CoTAM): CLIP-attention bit allocation, the record with its importance map -> ``g_s`` -> C;
  ``semantic-adapter``: the same record's y_hat through the decoder adapter A, added to C's layer-0 tokens of
  its reconstruction -> C's blocks (variable-rate codecs only).
- ``vbr-preedit`` (arXiv 2407.17060): x -> pre-editing module P -> variable-rate codec at R = q -> ``g_s`` -> C.
- ``jpeg``, ``webp``, ``avif``, ``jxl``: the file whose bpp is nearest to the ``.cnk`` record's, image by image
  (:mod:`.baselines`), decoded -> C.

And one point ``lossless``: ``uncompressed``, the upper bound, whose features are C(x) itself (MSE 0, cosine 1).
Its rate is the size of the image as a PNG file (Pillow, default compression); the report draws it as a
horizontal line, since no rate buys more than C(x). PSNR and MS-SSIM of the original are not measured.

A method or point that cannot run here (no neck or U-Net for a quality, an encoder not installed, a neck
trained for other codec weights) becomes a :class:`Skip` with the reason, which the report lists.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
from torch import Tensor

from comneck_cli import hub
from comneck_cli import weights as registry
from comneck_cli.formats import PAD_MULTIPLE, pack

from comneck_cli import coding as api
from comneck_cli.clip.tower import resolve_clip, resolve_layer
from comneck_cli.codecs import Codec
from comneck_cli.errors import ComneckError, MismatchError, RegistryError
from comneck_cli.features import FeatureExtractor, neck_registry_name, resolve_neck
from comneck_cli.io.images import from_tensor
from comneck_cli.models.neck import EVERY_RATE, load_neck
from comneck_cli.eval.baselines import TRADITIONAL, ImageCodec
from comneck_cli.eval.data import Item

Spec = dict  # {quality or None (every quality): file or registry name}


def spec_for(spec: Spec, quality: int) -> str | None:
    return spec.get(quality, spec.get(None))


def file_digest(path: Path) -> str:
    """First 16 hex digits of a file's sha256: how rows record which model file made them."""
    return registry.file_sha256(Path(path))[:16]


@dataclass
class Point:
    """One curve point of one method, with everything it needs loaded. ``models`` names the files it used
    (``--resume`` recomputes rows whose models differ)."""

    method: str
    name: str
    quality: int | None
    models: dict[str, str]
    codec: Codec | None = None
    extractor: FeatureExtractor | None = None
    unet: torch.nn.Module | None = None
    pre_edit: object | None = None  # a loaded preedit.PreEdit (vbr-preedit)
    baseline: ImageCodec | None = None
    human_view: bool = True
    detail: str = ""


@dataclass(frozen=True)
class Skip:
    """A method (``point`` None) or one of its points that does not run, and why."""

    method: str
    point: str | None
    reason: str


@dataclass
class Entry:
    """One loaded image of the current chunk: the evaluated pixels x."""

    item: Item
    image: np.ndarray


@dataclass
class Outcome:
    """What a method made of one image: bytes, the image a person sees, and the CLIP path's input."""

    num_bytes: int
    view: np.ndarray | None
    notes: list[str] = field(default_factory=list)
    latents: Tensor | None = None  # C'(T(latents)) ...
    clip_image: np.ndarray | None = None  # ... or C(clip_image)
    extractor: FeatureExtractor | None = None  # None: the reference tower C
    is_reference: bool = False  # the features are C(x) itself
    setting: str | None = None


class Context:
    """Models shared by the methods (loaded once) and the coded images of the current chunk."""

    def __init__(self, *, device: torch.device, codec: str, qualities: tuple[int, ...], layer: int, select: str,
                 clip_model: str, clip_tag: str, clip_weights: Path | None, weights: Spec, necks: Spec,
                 neck_weights: Spec, postprocess: Spec, adapter: str | None = None, pre_edit: str | None = None,
                 pad_to_square: bool = False, clip_seed: int | None = None):
        self.device = device
        self.codec_name = codec
        self.qualities = qualities
        self.layer, self.select = layer, select
        self.pad_to_square = pad_to_square
        self.clip_model, self.clip_tag, self.clip_weights = clip_model, clip_tag, clip_weights
        self.clip_seed = clip_seed  # a random tower's seed, as the neck trained against it records it
        self.weights, self.necks, self.neck_weights, self.postprocess = weights, necks, neck_weights, postprocess
        self.adapter, self.pre_edit = adapter, pre_edit  # file or name; None: the codec's registry entry
        self._codecs: dict[object, Codec] = {}
        self._clip = None
        self._reference: FeatureExtractor | None = None
        self._coded: dict[tuple, object] = {}

    # ------------------------------------------------------------------ models
    def codec(self, quality: int, weights: str | Path | None = None) -> Codec:
        """The codec at ``quality``: from ``weights`` (file or registry name), else ``--weights``, else the
        registry ``CODEC-qQ`` / CompressAI zoo."""
        given = weights if weights is not None else spec_for(self.weights, quality)
        key = (quality, str(given))
        if key not in self._codecs:
            self._codecs[key] = api.load_codec(self.codec_name, quality, weights=given, device=self.device)
        return self._codecs[key]

    @property
    def clip(self) -> torch.nn.Module:
        if self._clip is None:
            self._clip = resolve_clip(self.clip_model, self.clip_tag, self.clip_weights, device=self.device,
                                      seed=self.clip_seed)
        return self._clip

    @property
    def reference(self) -> FeatureExtractor:
        """The full tower C (no split) that gives C(x) and the image paths' features."""
        if self._reference is None:
            self._reference = FeatureExtractor(clip=self.clip, k=0, device=self.device,
                                               pad_to_square=self.pad_to_square)
        return self._reference

    # ------------------------------------------------------------------ per-chunk coding, shared by methods
    def new_chunk(self) -> None:
        self._coded.clear()

    def coded(self, codec: Codec, entry: Entry):
        """(record, bytes in the record) of ``entry`` coded by ``codec``; coded once per chunk."""
        key = ("record", codec.digest, codec.quality, entry.item.id)
        if key not in self._coded:
            record = api.encode(entry.image, codec)
            self._coded[key] = (record, len(pack(record)))
        return self._coded[key]

    def latents(self, codec: Codec, entry: Entry) -> Tensor:
        """``y_hat`` as the decoder recovers it from the record (entropy decoding only)."""
        key = ("y_hat", codec.digest, codec.quality, entry.item.id)
        if key not in self._coded:
            self._coded[key] = api.decode_latents(self.coded(codec, entry)[0], codec)
        return self._coded[key]

    def decoded(self, codec: Codec, entry: Entry) -> np.ndarray:
        """The reconstruction a person sees: ``g_s(y_hat)`` cropped and rounded to uint8 (as ``decode`` does)."""
        key = ("x_hat", codec.digest, codec.quality, entry.item.id)
        if key not in self._coded:
            height, width = entry.image.shape[:2]
            x_hat = codec.synthesize(self.latents(codec, entry))
            self._coded[key] = from_tensor(x_hat, height, width, PAD_MULTIPLE)
        return self._coded[key]


# ---------------------------------------------------------------------------------------------- methods
class Method:
    """One compared method: :meth:`plan` its points (or skips), :meth:`run` it on one image at one point."""

    name: ClassVar[str]
    what: ClassVar[str]
    shows_pixels: ClassVar[bool] = False  # its outcome is an image: PSNR/MS-SSIM need no CLIP

    def plan(self, ctx: Context) -> tuple[list[Point], list[Skip]]:
        points, skips = [], []
        for quality in ctx.qualities:
            try:
                points.append(self.plan_quality(ctx, quality))
            except ComneckError as exc:
                skips.append(Skip(self.name, f"q{quality}", str(exc)))
        return points, skips

    def plan_quality(self, ctx: Context, quality: int) -> Point:
        raise NotImplementedError

    def run(self, ctx: Context, point: Point, entry: Entry) -> Outcome:
        raise NotImplementedError


class Reconstruction(Method):
    name = "reconstruction"
    shows_pixels = True
    what = "y_hat -> g_s -> x_hat -> full CLIP tower (the paper's Reconstruction; BD-rate anchor)"

    def plan_quality(self, ctx, quality):
        codec = ctx.codec(quality)
        if codec.machine_only:
            raise MismatchError(f"codec weights {codec.source} were retrained for machines only (d3): g_s does not "
                                "reconstruct images; pass the codec's original weights as `weights`",
                                params=("weights",))
        return Point(self.name, f"q{quality}", quality, {"codec": codec.digest.hex()}, codec=codec)

    def run(self, ctx, point, entry):
        _, size = ctx.coded(point.codec, entry)
        x_hat = ctx.decoded(point.codec, entry)
        return Outcome(size, x_hat, clip_image=x_hat)


class Neck(Method):
    name = "neck"
    what = "y_hat -> transform-neck T -> C' (g_s never runs); people see g_s of the same bits"

    def plan_quality(self, ctx, quality):
        given = spec_for(ctx.necks, quality)
        name = neck_registry_name(ctx.codec_name, quality)
        try:
            path = resolve_neck(given if given is not None else name)
        except ComneckError as exc:
            if given is not None:
                raise
            raise RegistryError(f"no neck for quality {quality}: none given (`neck` q{quality}=FILE) and {exc}; "
                                "train one with `comneck train neck`", params=("neck", *exc.params)) from exc
        neck, info = load_neck(path, device=ctx.device)
        if info.codec != ctx.codec_name or info.quality not in (quality, EVERY_RATE):
            raise MismatchError(f"neck {path} was trained for {info.rates}, not "
                                f"{ctx.codec_name} quality {quality}; pass the neck of this codec and quality")
        codec = ctx.codec(quality)
        if info.codec_digest != codec.digest.hex():
            codec = self._retrained_codec(ctx, quality, info, path, codec)
        info.check_matches(codec.name, codec.quality, codec.digest, ctx.clip_model, ctx.clip_tag, info.k, neck=path)
        if ctx.select not in ("pooled", "projected"):  # a layer inside C does not exist here: say so once
            resolve_layer(ctx.layer, len(ctx.clip.visual.transformer.resblocks) + 1, info.k)
        human = info.scenario != "d3" and not codec.machine_only
        extractor = FeatureExtractor(clip=ctx.clip, k=info.k, device=ctx.device, neck=neck, info=info, neck_path=path)
        return Point(self.name, f"q{quality}", quality, {"codec": codec.digest.hex(), "neck": file_digest(path)},
                     codec=codec, extractor=extractor, human_view=human, detail=f"{info.scenario}, k={info.k}")

    @staticmethod
    def _retrained_codec(ctx: Context, quality: int, info, path: Path, codec: Codec) -> Codec:
        """The codec a d2/d3 neck was trained with: ``--neck-weights``, else a registered codec with its digest."""
        given = spec_for(ctx.neck_weights, quality)
        if given is not None:
            retrained = ctx.codec(quality, given)
            if retrained.digest.hex() != info.codec_digest:
                raise MismatchError(
                    f"`neck_weights` for quality {quality} ({retrained.source}) have digest "
                    f"{retrained.digest.hex()}, but neck {path} was trained on codec weights {info.codec_digest}; "
                    "pass the codec the neck was trained with", params=("neck_weights",)
                )
            return retrained
        for entry in registry.entries().values():
            if entry.kind == "codec" and entry.sha256.startswith(info.codec_digest):
                return ctx.codec(quality, entry.name)
        raise MismatchError(
            f"neck {path} reads latents of {info.codec} quality {info.quality} weights {info.codec_digest} "
            f"(scenario {info.scenario}), but the codec at quality {quality} has weights {codec.digest.hex()} and no "
            f"registered codec has digest {info.codec_digest}; pass `neck_weights` q{quality}=FILE",
            params=("neck_weights",)
        )

    def run(self, ctx, point, entry):
        _, size = ctx.coded(point.codec, entry)
        y_hat = ctx.latents(point.codec, entry)
        if point.human_view:
            return Outcome(size, ctx.decoded(point.codec, entry), latents=y_hat, extractor=point.extractor)
        return Outcome(size, None, ["a machine-only (d3) codec has no reconstruction for people"],
                       latents=y_hat, extractor=point.extractor)


def unet_cost(unet: torch.nn.Module, height: int = 256, width: int = 256):
    """Parameters and MACs of the U-Net on one ``height × width`` image (an ``eval.complexity.Cost``)."""
    from comneck_cli.eval.complexity import count

    device = next(unet.parameters()).device
    return count(unet, torch.zeros(1, unet.config["channels"], height, width, device=device))


class Postprocess(Method):
    name = "postprocess"
    what = "y_hat -> g_s -> U-Net -> full CLIP tower (the paper's Post-processing); people see g_s's output"

    def plan(self, ctx):
        from comneck_cli.models.unet import postprocess_registry_name

        names = [postprocess_registry_name(ctx.codec_name, q) for q in ctx.qualities]
        if not ctx.postprocess and not any(registry.lookup(name) for name in names):
            return [], [Skip(self.name, None, "no post-processing U-Net given: pass `postprocess` FILE (or "
                                              "q1=FILE,...) trained with `comneck train postprocess`, or register "
                                              f"one as {names[0]}")]
        return super().plan(ctx)

    def plan_quality(self, ctx, quality):
        from comneck_cli.models.unet import load_postprocess, postprocess_registry_name

        given = spec_for(ctx.postprocess, quality)
        name = postprocess_registry_name(ctx.codec_name, quality)
        if given is None and registry.lookup(name) is None:
            raise RegistryError(f"no U-Net for quality {quality}: none given (`postprocess` q{quality}=FILE) and "
                                f"none registered as {name}", params=("postprocess",))
        path = hub.resolve(given if given is not None else name, "postprocess")
        unet, info = load_postprocess(path, device=ctx.device)
        codec = ctx.codec(quality)
        if (info.codec, info.quality, info.codec_digest) != (codec.name, quality, codec.digest.hex()):
            raise MismatchError(
                f"U-Net {path} was trained on reconstructions of {info.codec} quality {info.quality} weights "
                f"{info.codec_digest}, not {codec.name} quality {quality} weights {codec.digest.hex()}; pass the "
                "matching U-Net"
            )
        if (info.clip_model, info.clip_tag) != (ctx.clip_model, str(ctx.clip_tag)):
            raise MismatchError(f"U-Net {path} was trained for CLIP {info.clip_model}/{info.clip_tag}, but the "
                                f"evaluation uses {ctx.clip_model}/{ctx.clip_tag}; pass the matching U-Net or "
                                "`clip_model`", params=("clip_model",))
        cost = unet_cost(unet, 64, 64)  # fully convolutional: MACs per pixel do not depend on the size
        return Point(self.name, f"q{quality}", quality, {"codec": codec.digest.hex(), "unet": file_digest(path)},
                     codec=codec, unet=unet,
                     detail=f"U-Net {cost.params / 1e6:.2f} M parameters, {cost.kmac_per_px(64, 64):.1f} kMAC/px")

    def run(self, ctx, point, entry):
        _, size = ctx.coded(point.codec, entry)
        x_hat = ctx.decoded(point.codec, entry)
        height, width = x_hat.shape[:2]
        with torch.inference_mode():
            x = torch.from_numpy(np.ascontiguousarray(x_hat)).permute(2, 0, 1).unsqueeze(0).float().div(255)
            y = point.unet(x.to(ctx.device))
        adapted = from_tensor(y, height, width, 1)
        return Outcome(size, x_hat, clip_image=adapted)


class Uncompressed(Method):
    name = "uncompressed"
    what = "x -> full CLIP tower: C(x), the upper bound (rate: the image as a PNG file)"

    def plan(self, ctx):
        return [Point(self.name, "lossless", None, {})], []

    def run(self, ctx, point, entry):
        from PIL import Image

        buffer = io.BytesIO()
        Image.fromarray(entry.image, "RGB").save(buffer, format="PNG")
        return Outcome(len(buffer.getvalue()), None, ["lossless: PSNR and MS-SSIM of the original are not measured"],
                       clip_image=entry.image, is_reference=True, setting="PNG")


class Traditional(Method):
    """A Pillow codec, its quality chosen per image to match the bpp of the learned codec at q."""

    shows_pixels = True

    def __init__(self, codec: ImageCodec):
        self.codec = codec
        self.name = codec.name
        self.what = f"{codec.title} (Pillow) at the bpp of the .cnk record, image by image -> full CLIP tower"

    def plan(self, ctx):
        reason = self.codec.unavailable()
        if reason is not None:
            return [], [Skip(self.name, None, reason)]
        return super().plan(ctx)

    def plan_quality(self, ctx, quality):
        import PIL

        codec = ctx.codec(quality)
        return Point(self.name, f"q{quality}", quality, {"target": codec.digest.hex(), "pillow": PIL.__version__},
                     codec=codec, baseline=self.codec)

    def run(self, ctx, point, entry):
        _, target_bytes = ctx.coded(point.codec, entry)
        height, width = entry.image.shape[:2]
        setting, data, note = point.baseline.match_bpp(entry.image, 8.0 * target_bytes / (height * width))
        decoded = point.baseline.decode(data)
        return Outcome(len(data), decoded, [note] if note else [], clip_image=decoded, setting=f"quality={setting}")


class Semantic(Method):
    """CoTAM's encoder: CLIP-attention bit allocation at the codec's rate for q (variable-rate codecs only).

    The guidance CLIP is the evaluation's own tower; the record (importance map included) gives the rate."""

    name = "semantic"
    what = "CoTAM: CLIP-attention bit allocation (.cnk with importance map) -> g_s -> full CLIP tower"

    def __init__(self, strength: float | None = None):
        from comneck_cli.coding.semantic import DEFAULT_STRENGTH

        self.strength = DEFAULT_STRENGTH if strength is None else strength
        self._guide = None

    def plan_quality(self, ctx, quality):
        codec = ctx.codec(quality)
        if not codec.spec.variable_rate:
            raise MismatchError(f"{self.name} needs a variable-rate codec (`codec` mbt2018-mean-vbr), not "
                                f"{codec.name}", params=("codec",))
        return Point(self.name, f"q{quality}", quality, {"codec": codec.digest.hex()}, codec=codec,
                     detail=f"strength {self.strength:g}")

    def coded(self, ctx: Context, codec: Codec, entry: Entry) -> tuple[int, np.ndarray, torch.Tensor]:
        """(bytes of the semantic record, its g_s reconstruction, its y_hat), coded and decoded once per chunk for
        both CoTAM methods."""
        from comneck_cli.coding.semantic import Guide, semantic_map

        key = ("semantic", self.strength, codec.digest, codec.quality, entry.item.id)
        if key not in ctx._coded:
            if self._guide is None:
                self._guide = Guide(ctx.clip)
            record = api.encode(entry.image, codec, importance=semantic_map(entry.image, self._guide, self.strength))
            y_hat, x_hat = api.decode_with_latents(record, codec)
            ctx._coded[key] = (len(pack(record)), x_hat, y_hat)
        return ctx._coded[key]

    def run(self, ctx, point, entry):
        size, x_hat, _ = self.coded(ctx, point.codec, entry)
        return Outcome(size, x_hat, clip_image=x_hat)


class SemanticAdapter(Semantic):
    """CoTAM end to end: the semantic record's latents through the decoder adapter A (``--adapter``, else the
    registry's ``{codec}-adapter``), added to C's layer-0 tokens of its reconstruction: the features are
    C_{1..L}(E(x_hat) + A(y_hat)). The outcome's ``latents`` are those layer-0 tokens and its tower C itself
    (k = 0, no neck); people see g_s's output."""

    name = "semantic-adapter"
    what = "CoTAM: semantic record -> E(g_s(y_hat)) + A(y_hat) -> CLIP blocks 1..L; people see g_s's output"

    def plan_quality(self, ctx, quality):
        from comneck_cli.models.adapter import resolve_adapter

        point = super().plan_quality(ctx, quality)
        # The neck is the identity: the outcome's latents are already the tokens C's first block reads.
        extractor = FeatureExtractor(clip=ctx.clip, k=0, device=ctx.device, neck=torch.nn.Identity(),
                                     pad_to_square=ctx.pad_to_square, clip_model=ctx.clip_model, clip_tag=ctx.clip_tag)
        extractor.attach_adapter(resolve_adapter(ctx.adapter, point.codec), point.codec)
        point.extractor, point.models["adapter"] = extractor, extractor.adapter_digest
        point.detail += f", adapter trained at strength {extractor.adapter_info.semantic_strength:g}"
        return point

    def run(self, ctx, point, entry):
        size, x_hat, y_hat = self.coded(ctx, point.codec, entry)
        tokens = point.extractor.adapted(y_hat, x_hat)
        return Outcome(size, x_hat, latents=tokens, extractor=point.extractor)


class VbrPreedit(Method):
    """arXiv 2407.17060's pipeline: the pre-editing module P (``--pre-edit``, else the registry's ``{codec}-preedit``;
    trained jointly with the codec by ``comneck train vbr --pre-edit``) edits x, the variable-rate codec codes the
    edit at R = q, and the decoded image goes to the full tower. The rate is the pre-edited record's bytes; PSNR is
    against the original x.
    ``reconstruction`` with the same variable-rate codec is the same pipeline without P."""

    name = "vbr-preedit"
    what = "pre-editing module P -> variable-rate codec at R = q (.cnk) -> g_s -> full CLIP tower"

    def __init__(self):
        self._loaded = None

    def plan_quality(self, ctx, quality):
        from comneck_cli.models.preedit import load_pre_edit

        codec = ctx.codec(quality)
        if not codec.spec.variable_rate:
            raise MismatchError(f"{self.name} needs a variable-rate codec (`codec` mbt2018-mean-vbr), not "
                                f"{codec.name}", params=("codec",))
        if self._loaded is None or self._loaded.info.codec_digest != codec.digest.hex():
            self._loaded = load_pre_edit(ctx.pre_edit, codec, clip_weights=ctx.clip_weights, device=ctx.device)
        editor = self._loaded
        models = {"codec": codec.digest.hex(), "preedit": file_digest(editor.source)}
        return Point(self.name, f"q{quality}", quality, models, codec=codec, pre_edit=editor,
                     detail=f"P guided by CLIP layers {editor.info.config['layers']}")

    def run(self, ctx, point, entry):
        key = ("preedit", point.models["preedit"], point.codec.digest, point.codec.quality, entry.item.id)
        if key not in ctx._coded:
            record = api.encode(point.pre_edit(entry.image), point.codec, metadata={"pre_edit": point.pre_edit.digest})
            ctx._coded[key] = (len(pack(record)), api.decode(record, point.codec))
        size, x_hat = ctx._coded[key]
        return Outcome(size, x_hat, clip_image=x_hat)


METHODS: dict[str, type[Method] | Method] = {
    "neck": Neck,
    "reconstruction": Reconstruction,
    "postprocess": Postprocess,
    "uncompressed": Uncompressed,
    **{name: Traditional(codec) for name, codec in TRADITIONAL.items()},
    "semantic": Semantic,
    "semantic-adapter": SemanticAdapter,
    "vbr-preedit": VbrPreedit,
}


def get_method(name: str) -> Method:
    try:
        found = METHODS[name]
    except KeyError:
        raise ComneckError(f"unknown method {name!r}; use some of {', '.join(METHODS)}") from None
    return found() if isinstance(found, type) else found
