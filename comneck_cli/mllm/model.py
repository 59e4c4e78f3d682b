"""Ask a LLaVA-family MLLM about ``.cnk`` records: the features go where the model's own would.

:func:`load_mllm` loads a ``transformers`` ``LlavaForConditionalGeneration`` with a CLIP vision tower once;
:meth:`MLLM.ask` computes each input's image features by one of comneck's paths (:data:`VIAS`), through the
model's own tower (:class:`~comneck_cli.mllm.tower.LlavaTower`) and ``multi_modal_projector``, and hands them to the
model's ``generate`` as precomputed image features (``mm_encoder_outputs``), which scatters them into the image-token
positions of its input embeddings exactly as it does with its own. Generation is greedy.
"""

from __future__ import annotations

import io
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Iterator, Sequence

import numpy as np
import torch
from torch import Tensor

from comneck_cli.errors import ComneckError, InputError, MismatchError, ModelFileError, UsageError
from comneck_cli.io.outputs import read_problem
from comneck_cli.mllm import check_max_new_tokens
from comneck_cli.mllm.tower import MLLM_TAG, LlavaTower, tower_digest, tower_name

VIAS = ("neck", "adapter", "reconstruction", "uncompressed")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
SUPPORTED = ("comneck asks LlavaForConditionalGeneration checkpoints whose vision tower is CLIP "
             "(LLaVA-1.5 and its fine-tunes)")


@dataclass
class Answer:
    """The model's greedy answer about one input (a record of a ``.cnk`` stream, or an image); ``bpp`` is the
    record's bits per pixel, container included (None for an image)."""

    input: str
    via: str
    answer: str
    bpp: float | None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def require_transformers() -> None:
    """Raise one sentence when the optional ``transformers`` is not installed."""
    try:
        import transformers  # noqa: F401
    except ImportError:
        raise ComneckError("asking an MLLM needs the transformers package: pip install 'comneck[mllm]'") from None


def model_folder(model: str | Path) -> Path:
    """A checkpoint folder, or a hub id's snapshot in the Hugging Face cache; never downloads."""
    if Path(model).is_dir():
        return Path(model)
    text = str(model)
    if Path(model).exists() or text.startswith((".", "/", "~")) or text.count("/") > 1:  # a path, not a hub id
        what = "is not a folder" if Path(model).exists() else "does not exist"
        raise ModelFileError(f"MLLM folder {model} {what}; pass the folder a LLaVA checkpoint was saved in, or a hub "
                             "id already in the Hugging Face cache", params=("model",))
    from huggingface_hub import constants, snapshot_download

    try:
        return Path(snapshot_download(str(model), local_files_only=True))
    except Exception:  # noqa: BLE001 - not cached (LocalEntryNotFoundError), or not a valid repo id at all
        raise ModelFileError(
            f"MLLM {model} is neither a folder nor in the Hugging Face cache (HF_HOME={constants.HF_HOME}); download "
            f"it on a connected machine with `hf download {model}` into that cache, or pass its folder",
            params=("model",)) from None


def check_supported(config: Any, folder: Path) -> None:
    """Refuse a checkpoint that is not a LLaVA with a CLIP vision tower, naming what is supported."""
    arch = ", ".join(getattr(config, "architectures", None) or [config.model_type])
    vision = getattr(getattr(config, "vision_config", None), "model_type", None)
    if config.model_type != "llava" or vision != "clip_vision_model":
        raise ModelFileError(f"{folder} is {arch} with a {vision or 'missing'} vision tower; {SUPPORTED}")


def resolve_dtype(dtype: str | None, device: torch.device) -> torch.dtype:
    """``bf16``/``fp16``/``fp32``; None: bf16 on CUDA, fp32 on the CPU."""
    if dtype is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise UsageError(f"unknown `dtype` {dtype!r}; use one of {', '.join(DTYPES)}", params=("dtype",))
    return DTYPES[dtype]


def load_mllm(model: str | Path, *, device: str = "cpu", dtype: str | None = None) -> "MLLM":
    """Load a LLaVA checkpoint (a folder or a cached hub id, offline) and its processor once, in ``dtype``."""
    folder, _ = checkpoint_config(model)
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from comneck_cli.coding import resolve_device

    where = resolve_device(device)
    with checkpoint_errors(folder):
        weights = LlavaForConditionalGeneration.from_pretrained(folder, local_files_only=True,
                                                                dtype=resolve_dtype(dtype, where))
        processor = AutoProcessor.from_pretrained(folder, local_files_only=True)
    return MLLM(weights.to(where).eval(), processor, folder, where)


def checkpoint_config(model: str | Path) -> tuple[Path, Any]:
    """(folder, config) of a LLaVA checkpoint with a CLIP tower and its weight files (a folder or a cached hub id,
    offline), refused in one sentence otherwise; reads only its config and weights index, so ``serve`` checks
    ``mllm`` before it starts."""
    require_transformers()
    from transformers import AutoConfig

    folder = model_folder(model)
    with checkpoint_errors(folder):
        config = AutoConfig.from_pretrained(folder, local_files_only=True)
        check_supported(config, folder)
        _check_weight_files(folder)
    return folder, config


def _check_weight_files(folder: Path) -> None:
    """Refuse a checkpoint ``folder`` without the weights ``from_pretrained`` reads (one file, or every shard its
    index names), which would otherwise fail only when the model loads (``serve``: at the first ``/v1/ask``)."""
    import json

    from transformers.utils import SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME, WEIGHTS_INDEX_NAME, WEIGHTS_NAME

    for single, index in ((SAFE_WEIGHTS_NAME, SAFE_WEIGHTS_INDEX_NAME), (WEIGHTS_NAME, WEIGHTS_INDEX_NAME)):
        if (folder / single).is_file():
            return
        if (folder / index).is_file():
            stored = json.loads((folder / index).read_text(encoding="utf-8"))
            weight_map = stored.get("weight_map") if isinstance(stored, dict) else None
            shards = sorted({str(name) for name in weight_map.values()}) if isinstance(weight_map, dict) else []
            if not shards:
                raise _unusable(folder, f"its {index} names no weight files")
            missing = [name for name in shards if not (folder / name).is_file()]
            if missing:
                raise _unusable(folder, f"{len(missing)} of the {len(shards)} weight files its {index} names are "
                                        f"missing, e.g. {missing[0]}")
            return
    raise _unusable(folder, f"no weights: none of {SAFE_WEIGHTS_NAME}, {SAFE_WEIGHTS_INDEX_NAME}, {WEIGHTS_NAME} "
                            f"or {WEIGHTS_INDEX_NAME} is in it")


def _unusable(folder: Path, cause: str) -> ModelFileError:
    """The one sentence for a checkpoint ``folder`` that cannot be used, and why."""
    return ModelFileError(f"{folder} is not a usable LLaVA checkpoint folder ({cause}); {SUPPORTED}, saved with "
                          "save_pretrained (config, weights and processor files)")


@contextmanager
def checkpoint_errors(folder: Path) -> Iterator[None]:
    """A checkpoint folder that transformers or safetensors cannot read (no config.json or no model_type in it, no
    weights, no processor files, a damaged weights file) as one :class:`ModelFileError` naming the folder, instead
    of their tracebacks."""
    from safetensors import SafetensorError

    try:
        yield
    except ComneckError:
        raise
    except (OSError, ValueError, SafetensorError) as exc:
        cause = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise _unusable(folder, cause) from exc


@dataclass
class TrainingTower:
    """A LLaVA checkpoint's vision tower as neck training's frozen CLIP: its name and weights tag as a neck records
    them (what :meth:`MLLM.check_neck` compares), and the features the model reads as a distillation target."""

    clip_model: str
    clip_tag: str
    target: str  # layerN/patch (CLS dropped, vision_feature_select_strategy default) or layerN/all (full)
    folder: Path

    def open_clip_model(self) -> torch.nn.Module:
        """The tower alone (the language model is not loaded), as a float32 open_clip CLIP model preprocessing as
        the checkpoint's image processor does."""
        from transformers import AutoConfig, AutoImageProcessor

        from comneck_cli.mllm.convert import open_clip_model
        from comneck_cli.mllm.tower import load_vision_tower

        with checkpoint_errors(self.folder):
            config = AutoConfig.from_pretrained(self.folder, local_files_only=True)
            processor = AutoImageProcessor.from_pretrained(self.folder, local_files_only=True)
            vision = load_vision_tower(self.folder, config.vision_config)
        return open_clip_model(vision, config.vision_config, processor)


def training_tower(model: str | Path) -> TrainingTower:
    """The vision tower of a LLaVA checkpoint (a folder or a cached hub id, offline) for ``train neck``, checked as
    :func:`load_mllm` checks it."""
    folder, config = checkpoint_config(model)
    with checkpoint_errors(folder):
        digest = tower_digest(folder)
    layer, strategy = config.vision_feature_layer, config.vision_feature_select_strategy
    if not isinstance(layer, int) or strategy not in ("default", "full"):
        raise ModelFileError(f"{folder} reads vision_feature_layer {layer} with strategy {strategy!r}; comneck "
                             "trains necks for LLaVA models that read one layer (LLaVA-1.5)")
    return TrainingTower(tower_name(config.vision_config), f"{MLLM_TAG}{digest}",
                         f"layer{layer}/{'patch' if strategy == 'default' else 'all'}", folder)


class MLLM:
    """One loaded LLaVA model and processor; :meth:`ask` any number of inputs with it."""

    def __init__(self, model: Any, processor: Any, folder: Path, device: torch.device) -> None:
        self.model, self.processor, self.folder, self.device = model, processor, Path(folder), device
        self.tower = LlavaTower(model)
        self.image_token = processor.image_token
        self.limits = None  # formats.Limits for images and records (None: the environment's)
        self._digest: str | None = None
        self._runner = None

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    @property
    def tower_id(self) -> tuple[str, str]:
        """(CLIP model, weights tag) a neck for this tower records: its architecture and ``mllm-DIGEST``."""
        if self._digest is None:
            self._digest = tower_digest(self.folder)
        return tower_name(self.model.config.vision_config), f"{MLLM_TAG}{self._digest}"

    def open_clip_model(self) -> torch.nn.Module:
        """The model's vision tower as a float32 open_clip CLIP model on this device (``convert.open_clip_model``),
        for code that runs C and C' (eval's reference tower, neck training)."""
        from comneck_cli.mllm.convert import open_clip_model

        return open_clip_model(self.tower.vision, self.model.config.vision_config,
                               self.processor.image_processor).to(self.device)

    # ----------------------------------------------------------------------------------------------- prompts
    def prompt_text(self, prompt: str) -> str:
        """The prompt through the processor's chat template when it has one, else as written with the image
        placeholder put first when the text has none."""
        if self.processor.chat_template:
            conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
            return self.processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
        count = prompt.count(self.image_token)
        if count > 1:
            raise UsageError(f"the `prompt` holds {count} image placeholders {self.image_token}; comneck asks about "
                             "one image at a time: keep one, or none (it is put first)", params=("prompt",))
        return prompt if count else f"{self.image_token}\n{prompt}"

    # ----------------------------------------------------------------------------------------------- features
    def pixel_values(self, image: np.ndarray) -> Tensor:
        """One uint8 H×W×3 image through the model's own image processor (resize, crop, LLaVA-1.5's padding)."""
        from PIL import Image

        out = self.processor.image_processor(images=[Image.fromarray(image, "RGB")], return_tensors="pt")
        return out["pixel_values"].to(self.device, self.dtype)

    @torch.inference_mode()
    def image_features(self, image: np.ndarray) -> Tensor:
        """The projected features (1, rows, hidden) of an image, as ``get_image_features`` computes them."""
        return self.tower.features(self.tower.embed(self.pixel_values(image)))

    def _inputs(self, features: Sequence[Tensor], prompt: str) -> dict[str, Any]:
        """The model's inputs for ``prompt`` about each image whose projected features (rows, hidden) are in
        ``features``: the placeholder expanded to one token per row, as the processor does, sequences padded on the
        left (where generation continues them), and the features as precomputed image features, which the model
        scatters into the image-token positions of its input embeddings in place of the ones it would compute from
        pixels."""
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        text = self.prompt_text(prompt)
        expanded = [text.replace(self.image_token, self.image_token * f.shape[0]) for f in features]
        encoded = self.processor.tokenizer(expanded, return_tensors="pt", padding=True,
                                           padding_side="left").to(self.device)
        images = BaseModelOutputWithPooling(pooler_output=[f.to(self.device, self.dtype) for f in features])
        return {**encoded, "mm_encoder_outputs": {"image": images}}

    @torch.inference_mode()
    def generate_ids(self, features: Tensor | Sequence[Tensor], prompt: str, max_new_tokens: int = 64) -> Tensor:
        """The greedy answers' new token ids (B, n) to ``prompt`` about B images whose projected features are
        ``features`` ((B, rows, hidden), or B tensors (rows, hidden)), in one ``generate`` call (:meth:`_inputs`); an answer that ends before the
        longest is followed by padding."""
        inputs = self._inputs(list(features), prompt)
        out = self.model.generate(**inputs, do_sample=False, num_beams=1, max_new_tokens=max_new_tokens)
        return out[:, inputs["input_ids"].shape[1]:]

    def generate(self, features: Tensor, prompt: str, max_new_tokens: int = 64) -> str:
        """:meth:`generate_ids` of one image as text, special tokens dropped."""
        return self.generate_texts(features, prompt, max_new_tokens)[0]

    def generate_texts(self, features: Tensor | Sequence[Tensor], prompt: str, max_new_tokens: int = 64) -> list[str]:
        """:meth:`generate_ids` as one text per image, special tokens (and padding) dropped."""
        ids = self.generate_ids(features, prompt, max_new_tokens)
        return [text.strip() for text in self.processor.tokenizer.batch_decode(ids, skip_special_tokens=True)]

    def answer_ids(self, ids: Tensor) -> Tensor:
        """One row of :meth:`generate_ids` up to its first end-of-text token, kept (what follows it is the padding
        of a batch whose other answers ran longer)."""
        eos = self.model.generation_config.eos_token_id
        ends = torch.isin(ids, torch.tensor(eos if isinstance(eos, list) else [eos], device=ids.device))
        return ids[: int(ends.nonzero()[0]) + 1] if ends.any() else ids

    @torch.inference_mode()
    def answer_logprobs(self, features: Tensor, prompt: str, answer: Tensor) -> Tensor:
        """Teacher-forced next-token log-probabilities (n, vocab), float32, along the n tokens ``answer`` of a
        ``prompt`` about one image whose projected features are ``features`` (1, rows, hidden): row j is the model's
        distribution for answer token j given the prompt, the image and answer tokens 0..j-1. The input is built as
        :meth:`generate_ids` builds it, so the image enters exactly as it does when the model answers."""
        inputs = self._inputs(list(features), prompt)
        prompt_length = inputs["input_ids"].shape[1]
        answer = answer.reshape(1, -1).to(self.device)
        inputs["input_ids"] = torch.cat([inputs["input_ids"], answer], dim=1)
        inputs["attention_mask"] = torch.cat([inputs["attention_mask"], torch.ones_like(answer)], dim=1)
        logits = self.model(**inputs).logits[0]
        # the logits at position t predict token t + 1: the answer's first token from the prompt's last position
        return torch.log_softmax(logits[prompt_length - 1 : prompt_length - 1 + answer.shape[1]].float(), dim=-1)

    # ----------------------------------------------------------------------------------------------- asking
    def ask(self, inputs: Sequence[Path | bytes | BinaryIO], prompt: str, *, via: str = "neck", max_new_tokens: int = 64,
            neck: str | Path | None = None, adapter: str | Path | None = None, weights: str | Path | None = None,
            batch_size: int = 8) -> list[Answer]:
        """The greedy answer to ``prompt`` about each input: ``.cnk`` files, bytes or binary streams (one answer per
        record of a stream), or with ``via`` uncompressed image files, bytes or streams. Up to ``batch_size`` inputs whose images give
        the same number of feature rows are answered by one ``generate`` call (their prompts are then the same
        tokens, so nothing is padded and each answer is the one it gets alone). ``weights`` (a codec file or
        registry name, as ``features``' ``weights``) decodes every record, which must have been coded with them;
        without it each record's registered codec weights are found by its digest, else the codec's default.
        Raises :class:`ComneckError` for the first input that cannot be answered."""
        if via not in VIAS:
            raise UsageError(f"unknown `via` {via!r}; use one of {', '.join(VIAS)}", params=("via",))
        check_max_new_tokens(max_new_tokens)
        if neck is not None and via != "neck":
            raise UsageError(f"`neck` applies to `via` neck only, not {via}", params=("neck", "via"))
        if adapter is not None and via != "adapter":
            raise UsageError(f"`adapter` applies to `via` adapter only, not {via}", params=("adapter", "via"))
        if weights is not None and via == "uncompressed":
            raise UsageError("`weights` decode .cnk records; `via` uncompressed takes images", params=("weights", "via"))
        if batch_size < 1:
            raise UsageError(f"`batch_size` must be 1 or more, not {batch_size}", params=("batch_size",))
        items = self._items(inputs, via)
        texts: list[str | None] = [None] * len(items)
        for start in range(0, len(items), batch_size):
            by_rows: dict[int, list[tuple[int, Tensor]]] = {}
            for index in range(start, min(start + batch_size, len(items))):
                features = self._features(items[index][1], via, neck, adapter, weights)[0]
                by_rows.setdefault(features.shape[0], []).append((index, features))
            for group in by_rows.values():
                answered = self.generate_texts([f for _, f in group], prompt, max_new_tokens)
                for (index, _), text in zip(group, answered):
                    texts[index] = text
        return [Answer(label, via, text, None if via == "uncompressed" else payload.bits_per_pixel)
                for (label, payload), text in zip(items, texts)]

    def _items(self, inputs: Sequence[Path | bytes | BinaryIO], via: str) -> list[tuple[str, Any]]:
        """(label, record or image) per record of each input, or per image with ``via`` uncompressed. A stream
        (stdin) is parsed as it arrives, within the record and pixel limits, never read whole first."""
        from comneck_cli.coding.files import Prefixed
        from comneck_cli.formats import MAGIC, iter_records
        from comneck_cli.io.images import read_image, read_image_stream

        items = []
        for number, source in enumerate(inputs, start=1):
            label = str(source) if isinstance(source, (str, Path)) else f"input {number}"
            with _opened(source, label) as stream:
                head = stream.read(len(MAGIC))
                data = Prefixed(head, stream)
                if via == "uncompressed":
                    if head == MAGIC:
                        raise InputError(f"{label}: `via` uncompressed takes an image, not a .cnk file",
                                         params=("via",))
                    items.append((label, read_image(read_image_stream(data, label, self.limits), name=label,
                                                    limits=self.limits)))
                    continue
                if head != MAGIC:
                    raise InputError(f"{label}: not a .cnk file; to ask about an image use `via` uncompressed",
                                     params=("via",))
                records = list(iter_records(data, self.limits))
            if not records:
                raise InputError(f"{label}: holds no record")
            items.extend((label if len(records) == 1 else f"{label} record {n}", record)
                         for n, record in enumerate(records, start=1))
        return items

    def _features(self, payload: Any, via: str, neck: str | Path | None, adapter: str | Path | None,
                  weights: str | Path | None = None) -> Tensor:
        if via == "uncompressed":
            return self.image_features(payload)
        if via == "reconstruction":
            from comneck_cli.coding import decode

            return self.image_features(decode(payload, self.codec_for(payload, weights)))
        if via == "neck":
            return self.neck_features(payload, neck, weights)
        return self.adapter_features(payload, adapter, weights)

    def runner(self):
        """The codecs (and their adapters) of this model's runs, loaded once each."""
        if self._runner is None:
            self._runner = _Codecs()
        return self._runner

    def codec_for(self, record: Any, weights: str | Path | None = None) -> Any:
        """The codec that decodes ``record``: from ``weights`` (a codec file or registry name) when given, else the
        registered file of the record's weights digest, else the codec's default; loaded once per weights."""
        caches = self.runner().caches
        key = None if weights is None else str(weights)
        if key not in caches:
            from comneck_cli.coding import CodecCache

            caches[key] = CodecCache(self.device, weights)
        return caches[key].for_record(record)

    def neck_features(self, record: Any, neck: str | Path | None, weights: str | Path | None = None) -> Tensor:
        """C'(T(y_hat)) through the model's own tower: the record's latents (decoded with ``weights``, as
        :meth:`codec_for`), the neck (``neck``, else the registry's neck of the record's codec), then the tower's
        layers from block k+1, CLS and projector as the model reads."""
        from comneck_cli.coding import decode_latents

        codec = self.codec_for(record, weights)
        extractor = self._neck(neck, record)
        extractor.check(record, codec)  # codec, quality, codec weights, token limit
        y_hat = decode_latents(record, codec)  # outside inference mode: the entropy decoder updates tensors in place
        return self.latent_features(extractor.neck, extractor.k, y_hat)

    @torch.inference_mode()
    def latent_features(self, neck: torch.nn.Module, k: int, y_hat: Tensor) -> Tensor:
        """The projected features of latents ``y_hat``: the neck's tokens T(y_hat) as hidden state k, then the
        model's own tower from block k+1 on, CLS and projector as the model reads them."""
        tokens = neck(y_hat.to(self.device))
        return self.tower.features(tokens.to(self.dtype), start=k)

    def _neck(self, neck: str | Path | None, record: Any):
        """The neck for ``record``, loaded once per file and refused unless trained for this model's tower (its
        weights, resolution and a split below the layer the model reads)."""
        from comneck_cli.features import FeatureExtractor, resolve_neck
        from comneck_cli.models.neck import load_neck

        path = resolve_neck(neck, record, tower=str(self.folder))
        necks = self.runner().necks
        if path not in necks:
            module, info = load_neck(path, device=self.device)
            self.check_neck(info, path)
            necks[path] = FeatureExtractor(clip=None, k=info.k, device=self.device, neck=module, info=info,
                                           neck_path=path, limits=self.limits)
        return necks[path]

    def check_neck(self, info: Any, path: Path) -> None:
        """Refuse a neck (its ``NeckInfo``) not trained for this model's tower: its weights, its resolution and a
        split k at or below the layer the model reads; the message names both sides."""
        model, tag = self.tower_id
        grid = tuple(info.config["grid"])
        if (info.clip_model, info.clip_tag) != (model, tag) or grid != self.tower.grid \
                or info.k > self.tower.layer_index:
            trained = f"CLIP {info.clip_model}/{info.clip_tag} ({grid[0]}×{grid[1]} tokens, k={info.k})"
            have = (f"{self.folder}'s tower is {model}/{tag} ({self.tower.grid[0]}×{self.tower.grid[1]} tokens, "
                    f"reading layer {self.tower.layer_index})")
            raise MismatchError(f"neck {path} was trained for {trained}, but {have}; use a neck trained for this "
                                f"tower's weights (`comneck train neck --clip-from-mllm` trains one)",
                                params=("neck",))

    def adapter_features(self, record: Any, adapter: str | Path | None, weights: str | Path | None = None) -> Tensor:
        """CoTAM's C_{1..L}(E(x_hat) + A(y_hat)) through the model's own tower: the decoded image through the model's
        processor and embedding E, plus the decoder adapter's tokens of the latents (``adapter``, else the registry's
        of the record's codec, trained for this tower's weights), then the tower's layers, CLS and projector; the
        record decoded with ``weights`` (as :meth:`codec_for`)."""
        from comneck_cli.coding import decode_with_latents
        from comneck_cli.models.adapter import load_adapter, resolve_adapter

        codec = self.codec_for(record, weights)
        path = resolve_adapter(adapter, codec)
        adapters = self.runner().adapters
        if path not in adapters:
            module, info = load_adapter(path, device=self.device)
            info.check_clip(*self.tower_id, path)
            adapters[path] = (module, info)
        module, info = adapters[path]
        info.check_codec(codec, path)
        return self.adapted_features(module, *decode_with_latents(record, codec))

    @torch.inference_mode()
    def adapted_features(self, adapter: torch.nn.Module, y_hat: Tensor, x_hat: np.ndarray) -> Tensor:
        """The projected features of E(x_hat) + A(y_hat): the decoded image ``x_hat`` through the model's processor
        and embedding E, the decoder ``adapter``'s tokens of ``y_hat`` added, then the tower's layers."""
        from comneck_cli.models.adapter import adapted_tokens

        # the adapter is float32: E's tokens join it there, then the model's dtype
        tokens = adapted_tokens(adapter, lambda x: self.tower.embed(x).float(), y_hat, self.pixel_values(x_hat),
                                *x_hat.shape[:2])
        return self.tower.features(tokens.to(self.dtype))


@dataclass
class _Codecs:
    """What :meth:`MLLM.ask` loads once per model: the codecs of the records (a ``CodecCache`` per codec weights
    asked for, None: found by each record's digest), the necks (as ``features``' extractors, for their record checks)
    and the decoder adapters, by file."""

    caches: dict = field(default_factory=dict)
    necks: dict = field(default_factory=dict)
    adapters: dict = field(default_factory=dict)


@contextmanager
def _opened(source: Path | str | bytes | BinaryIO, label: str) -> Iterator[BinaryIO]:
    """An input as a binary stream: bytes as they are, a stream (stdin) as it comes, a path opened if it is a
    regular file (reading a FIFO or a device would block or never end)."""
    if isinstance(source, (bytes, bytearray)):
        yield io.BytesIO(bytes(source))
        return
    if not isinstance(source, (str, Path)):
        yield source
        return
    try:
        if not Path(source).is_file() and Path(source).exists():
            raise InputError(f"{label}: not a regular file (a folder, FIFO, socket or device)")
        with open(source, "rb") as stream:
            yield stream
    except OSError as exc:
        raise InputError(f"{label}: {read_problem(exc)}") from None
