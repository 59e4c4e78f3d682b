"""Reading comneck's model files: safetensors tensors plus the string metadata that says what they are for.

Codecs, necks, post-processing U-Nets, decoder adapters and pre-editing modules are all stored this way (never as
pickles), so one reader gives them the same checks and the same one-sentence errors; the modules other than codecs
also share :class:`ModelInfo` (what the file is for) and :func:`save_module`/:func:`load_module`.
"""

from __future__ import annotations

import json
from dataclasses import fields, replace
from pathlib import Path
from typing import Callable, ClassVar, Mapping, TypeVar

import torch
from torch import Tensor, nn

from comneck_cli.errors import ModelFileError

InfoT = TypeVar("InfoT", bound="ModelInfo")
ModuleT = TypeVar("ModuleT", bound=nn.Module)


def read_safetensors(path: Path | str, what: str) -> tuple[dict[str, Tensor], dict[str, str]]:
    """(tensors on the CPU, metadata) of a safetensors file; ``what`` names the kind of file in errors."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"{what} file {path} does not exist; pass an existing {what} file")
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
    except (SafetensorError, OSError, ValueError) as exc:
        raise ModelFileError(f"{path} is not a comneck {what} file (not a valid safetensors file: {exc})") from exc


def check_finite(tensors: Mapping[str, Tensor], path: Path | str, what: str, fix: str) -> None:
    """Refuse a file whose floating-point tensors hold NaN or ±inf: a neck then gives NaN features, and a codec's
    NaN latents make CompressAI's entropy encoder spin forever (``encode_with_indexes`` on INT_MIN symbols)."""
    for name, tensor in tensors.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise ModelFileError(f"{what} {path} is damaged: tensor {name} holds NaN or infinite values; {fix}")


class ModelInfo:
    """Base of the frozen dataclasses that say what a model file is for, kept as its safetensors string metadata.

    The metadata is ``format`` and ``format_version``, then each field as ``str(value)`` or, where
    :meth:`_json` says so, as JSON (dicts and tuples, whose ``str`` would not read back). A subclass sets the
    class attributes below and reads its fields back in :meth:`_decode`; the format checks and the errors for
    files that are not its own or are damaged live here, worded with its ``what``.
    """

    format: ClassVar[str]
    format_version: ClassVar[str]
    what: ClassVar[str]  # the noun errors name the file by: "neck", "U-Net", ...
    not_ours: ClassVar[str]  # the sentence for a file of another format, with a {path} field
    fix: ClassVar[str] = "re-export it"
    file_what: ClassVar[str] = ""  # the noun when it is not a safetensors file at all, if not ``what``

    @classmethod
    def _json(cls, name: str) -> bool:
        """Whether field ``name`` is stored as JSON rather than ``str``: ``clip_seed`` too, whose None must read
        back as JSON's null, not the "None" ``str`` would write."""
        return name in ("config", "clip_seed")

    @classmethod
    def _decode(cls: type[InfoT], meta: dict[str, str]) -> InfoT:
        """The info from metadata already known to be of this format; KeyError/ValueError/TypeError if damaged."""
        raise NotImplementedError

    def to_metadata(self) -> dict[str, str]:
        meta = {"format": self.format, "format_version": self.format_version}
        for f in fields(self):
            value = getattr(self, f.name)
            meta[f.name] = json.dumps(value, sort_keys=True) if self._json(f.name) else str(value)
        return meta

    @classmethod
    def from_metadata(cls: type[InfoT], meta: dict[str, str], path: Path | str) -> InfoT:
        if meta.get("format") != cls.format:
            raise ModelFileError(cls.not_ours.format(path=path))
        if meta.get("format_version") != cls.format_version:
            raise ModelFileError(f"{cls.what} {path} has format version {meta.get('format_version')!r}, which this "
                                 "comneck cannot read; upgrade comneck")
        try:
            return cls._decode(meta)
        except (KeyError, ValueError, TypeError, RecursionError) as exc:  # RecursionError: JSON nested too deep
            raise ModelFileError(
                f"{cls.what} {path} has damaged metadata ({type(exc).__name__}: {exc}); {cls.fix}"
            ) from exc


def safetensors_bytes(tensors: Mapping[str, Tensor], metadata: Mapping[str, str] | None = None) -> bytes:
    """A safetensors file's bytes with its JSON header's keys sorted: safetensors writes the header from a hash map,
    in an order that changes from one process to the next, so the same tensors would give other bytes (and another
    digest) on every run. The tensor data and their offsets are untouched."""
    from safetensors.torch import save

    data = save(dict(tensors), metadata=None if metadata is None else dict(metadata))
    size = int.from_bytes(data[:8], "little")
    header = json.dumps(json.loads(data[8 : 8 + size]), sort_keys=True, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)  # safetensors aligns the tensor data to 8 bytes
    return len(header).to_bytes(8, "little") + header + data[8 + size :]


def save_module(module: nn.Module, path: Path | str, info: ModelInfo) -> None:
    """Write ``module``'s state and ``info`` as one safetensors file (no pickle), atomically.

    ``info.config`` is replaced by the module's own constructor ``config``, so the file always rebuilds the
    module it holds.
    """
    from comneck_cli.io.outputs import write_atomic

    info = replace(info, config=dict(module.config))
    tensors = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
    write_atomic(Path(path), safetensors_bytes(tensors, info.to_metadata()), force=True)


def load_module(path: Path | str, info_type: type[InfoT], build: Callable[[InfoT], ModuleT],
                device: torch.device | str = "cpu") -> tuple[ModuleT, InfoT]:
    """Read a file written by :func:`save_module` -> (``build(info)`` holding its tensors, in eval mode on
    ``device``; the info). A config the constructor refuses, or tensors that do not fit it, are one sentence."""
    state, meta = read_safetensors(path, info_type.file_what or info_type.what)
    info = info_type.from_metadata(meta, path)
    check_finite(state, path, info_type.what, info_type.fix)
    try:
        # The recorded config is checked against the file's own tensors on the meta device first (no memory), so a
        # config claiming huge sizes fails here instead of allocating what it claims.
        with torch.device("meta"):
            skeleton = build(info)
    except (KeyError, TypeError, ValueError, RuntimeError, ArithmeticError, RecursionError) as exc:
        # ArithmeticError: 0 heads divide by zero, an infinite MLP ratio overflows int(), a huge grid overflows numel
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ModelFileError(f"{info_type.what} {path} records a config that builds no model ({first}); "
                             f"{info_type.fix}") from exc
    try:
        expected = {k: tuple(v.shape) for k, v in skeleton.state_dict().items()}
        del skeleton
        problem = _shape_problem(expected, {k: tuple(v.shape) for k, v in state.items()})
        if problem:
            raise ValueError(problem)
        module = build(info)
        module.load_state_dict(state)
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ModelFileError(
            f"{info_type.what} {path} holds tensors that do not fit its recorded config ({first}); {info_type.fix}"
        ) from exc
    return module.to(device).eval(), info


def _shape_problem(expected: Mapping[str, tuple[int, ...]], found: Mapping[str, tuple[int, ...]]) -> str | None:
    """The first difference between the tensor shapes a config builds and those a file holds, or None."""
    for name in sorted(expected.keys() | found.keys()):
        if name not in found:
            return f"tensor {name} is missing"
        if name not in expected:
            return f"unexpected tensor {name}"
        if expected[name] != found[name]:
            return f"tensor {name} has shape {list(found[name])}, the config builds {list(expected[name])}"
    return None
