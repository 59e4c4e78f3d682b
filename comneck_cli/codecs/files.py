"""Codec weight files: finding them (:mod:`comneck_cli.hub`'s rule, then CompressAI's zoo), reading them
(safetensors written by comneck, or weights-only zoo checkpoints), writing and halving them, and loading a
:class:`~comneck_cli.codecs.runtime.Codec` from them."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from comneck_cli import hub
from comneck_cli import weights as registry
from comneck_cli.codecs import rans
from comneck_cli.codecs._compressai import import_compressai
from comneck_cli.codecs.runtime import Codec
from comneck_cli.codecs.specs import CodecSpec, check_quality, get_spec, registry_name
from comneck_cli.codecs.tables import check_entropy_tables, tables_present
from comneck_cli.defaults import CODEC_LEVELS
from comneck_cli.errors import MismatchError, ModelFileError, RegistryError
from comneck_cli.modelfiles import check_finite, read_safetensors


def save_codec(
    model: nn.Module, path: Path, codec: str, quality: int, config: dict[str, Any], *, machine_only: bool = False
) -> None:
    """Write a codec as a self-describing safetensors file (no pickle), entropy tables included.

    Storing the tables makes encoder and decoder share bit-identical CDFs instead of each
    rebuilding them with float arithmetic.
    """
    from comneck_cli.io.outputs import write_atomic
    from comneck_cli.modelfiles import safetensors_bytes

    model.update(force=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    meta = {"format": "comneck-codec", "codec": codec, "quality": str(quality), "config": json.dumps(config)}
    if machine_only:
        meta["machine_only"] = "true"
    write_atomic(Path(path), safetensors_bytes(tensors, meta), force=True)  # the same weights, the same digest


HALF_PREFIXES = ("g_a.", "g_s.", "h_a.", "h_s.")  # the bulk of the parameters; entropy models stay float32


def half_codec_file(source: Path, target: Path) -> None:
    """Rewrite a comneck codec file with its transforms' float32 weights as float16 (``weights import --half``).

    The entropy models (bottleneck quantiles and tables, the Gaussian scale table) keep float32, so the
    coding tables stay exactly those the codec was exported with. Loading casts back to float32.
    """
    from comneck_cli.io.outputs import write_atomic
    from comneck_cli.modelfiles import safetensors_bytes

    state, meta = _read_state(Path(source))
    if meta.get("format") != "comneck-codec":
        raise ModelFileError(f"{source} is not a comneck codec file (.safetensors from `comneck train codec`); "
                             "`half` needs one", params=("half",))
    halved = {k: v.half() if k.startswith(HALF_PREFIXES) and v.dtype == torch.float32 else v
              for k, v in state.items()}
    write_atomic(Path(target), safetensors_bytes(halved, {**meta, "dtype": "float16"}), force=True)


def _read_state(path: Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    if path.suffix == ".safetensors":
        state, meta = read_safetensors(path, "codec weights")
        if not meta.get("quality", "0").isdecimal():  # save_codec writes a level, 0 for every rate
            raise ModelFileError(f"codec weights {path} have damaged metadata: quality {meta['quality'][:20]!r} is not "
                                 "a whole number; export or import the file again")
        return state, meta
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises UnpicklingError, RuntimeError, EOFError... for bad files
        raise ModelFileError(
            f"cannot load codec weights {path}: not a plain tensor checkpoint ({type(exc).__name__}); "
            "comneck only loads weights-only files"
        ) from exc
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ModelFileError(f"cannot load codec weights {path}: it holds no state dict")
    return state, {}


def _build(spec: CodecSpec, quality: int, state: dict[str, Tensor], meta: dict[str, str], path: Path) -> nn.Module:
    import_compressai()
    from compressai.zoo.pretrained import load_pretrained

    fix = "re-export the codec or fetch the file again"
    if meta.get("format") == "comneck-codec":
        if meta.get("codec") != spec.name:
            raise MismatchError(f"weights {path} hold codec {meta.get('codec')!r}, not {spec.name!r}; pass `codec` "
                                f"{meta.get('codec')}", params=("codec",))
        raw = meta.get("config", "{}")
        try:
            config = json.loads(raw)
        except ValueError:
            config = None

        def size(value: Any) -> bool:
            return isinstance(value, int) and not isinstance(value, bool) and value > 0

        # save_codec writes sizes only (N, M, ELIC's groups): anything else is damage, said here, not in torch.
        if not (isinstance(config, dict) and all(size(v) or (isinstance(v, list) and v and all(map(size, v)))
                                                 for v in config.values())):
            raise ModelFileError(f"weights {path} carry a damaged codec config {raw[:60]!r} (not a JSON object of "
                                 f"sizes, whole numbers or lists of them); export or import the file again")
        # A codec's sizes are channel counts, each the size of some weight's dimension in the file: a larger one
        # would build (allocate) a model bigger than the file before the load finds that nothing fits.
        widest = max((max(t.shape, default=0) for t in state.values() if t.is_floating_point()), default=0)
        sizes = [v for value in config.values() for v in (value if isinstance(value, list) else [value])]
        if max(sizes, default=0) > widest:
            raise ModelFileError(f"weights {path} carry a codec config {raw[:60]!r} with a size of {max(sizes)}, but "
                                 f"no tensor in the file is that wide (at most {widest}); {fix}")
    else:
        config = None
    try:
        if config is None:
            # Zoo checkpoints carry their own N and M: CompressAI's from_state_dict reads them from the shapes.
            model = spec.constructor().from_state_dict(load_pretrained(state))
        else:
            model = spec.constructor()(**config)
            model.load_state_dict(state)
    except (RuntimeError, KeyError, TypeError, ValueError, AssertionError, AttributeError) as exc:
        raise ModelFileError(
            f"weights {path} do not fit codec {spec.name} (quality {quality}): {str(exc).splitlines()[0]}"
        ) from exc
    check_entropy_tables(model, path)  # first: its sentences say more about a damaged table than "not finite"
    check_finite(state, path, "codec weights", fix)
    gains = getattr(model, "Gain", None)  # variable-rate codecs: a zero gain divides y_hat by zero
    if gains is not None and not bool((gains.detach().abs() > 0).all()):
        raise ModelFileError(f"codec weights {path} are damaged: a rate's gain (Gain) is zero; {fix}")
    return model


def resolve_weights(spec: CodecSpec, quality: int, weights: Path | str | None = None) -> Path:
    """The codec's weight file: ``weights`` by :func:`comneck_cli.hub.resolve`'s rule (an existing file, else a
    registered name), else the registry entry :func:`registry_name`, else CompressAI's zoo (downloaded once into the
    registry)."""
    if weights is not None:
        return hub.resolve(weights, "codec", param="weights")
    name = registry_name(spec.name, quality)
    found = hub.find(name, "codec")
    if found is not None:
        return found
    if not spec.zoo:
        raise RegistryError(
            f"no weights for {spec.name} quality {quality}: CompressAI's zoo has none for this codec; "
            f"import a trained file with `comneck weights import {name} FILE` or pass `weights` FILE",
            params=("weights",))
    return _download_zoo(spec, quality, name)


def _download_zoo(spec: CodecSpec, quality: int, name: str) -> Path:
    import tempfile

    import_compressai()
    from compressai.zoo.image import model_urls
    from torch.hub import download_url_to_file

    url = model_urls[spec.name]["mse"][quality]
    # Zoo file names end in the first 8 hex digits of their sha256: torch checks that prefix.
    hash_prefix = url.rsplit("-", 1)[-1].split(".")[0]
    tmpdir = Path(tempfile.mkdtemp(prefix="comneck-zoo-"))
    tmp = tmpdir / url.rsplit("/", 1)[-1]
    try:
        download_url_to_file(url, str(tmp), hash_prefix=hash_prefix, progress=False)
        entry = registry.import_file(
            name, tmp, "codec", {"codec": spec.name, "quality": quality, "source": url}, move=True
        )
    except Exception as exc:  # urllib raises many kinds; all mean "not available here"
        raise RegistryError(
            f"no weights for {spec.name} quality {quality}: not in the registry and the CompressAI zoo download "
            f"failed ({type(exc).__name__}); download {url} on a connected machine and run "
            f"`comneck weights import {name} FILE`, or pass `weights` FILE", params=("weights",)
        ) from exc
    finally:
        import shutil

        shutil.rmtree(tmpdir, ignore_errors=True)
    return entry.path()


def _check_file_quality(spec: CodecSpec, quality: int, meta: dict[str, str], path: Path, fix: str,
                        params: tuple[str, ...] = ()) -> None:
    """A comneck file of a fixed-rate codec is trained for one quality: refuse it for another, saying ``fix`` (which
    names ``params``)."""
    trained_for = meta.get("quality")
    if meta.get("format") == "comneck-codec" and not spec.variable_rate and trained_for not in (None, str(quality)):
        raise MismatchError(f"weights {path} were trained for {spec.name} quality {trained_for}, not {quality}; {fix}",
                            params=params)


def load_codec(
    name: str, quality: int, *, weights: Path | str | None = None, device: torch.device | str = "cpu"
) -> Codec:
    """Load a codec for coding: resolve and verify its weights, build entropy tables once, place g_a/g_s."""
    spec = get_spec(name)
    check_quality(spec, quality)
    path = resolve_weights(spec, quality, weights)
    if spec.name == "elic-comneck" and path.suffix != ".safetensors":  # the authors' raw d{S}_{Q}.pth.tar (#18)
        from comneck_cli.codecs.elic_comneck import converted_release

        with converted_release(path, quality) as converted:  # what `weights import-comneck` registers: same digest
            return dataclasses.replace(load_codec(name, quality, weights=converted, device=device), source=path)
    digest = bytes.fromhex(registry.file_sha256(path)[:8])
    state, meta = _read_state(path)
    _check_file_quality(spec, quality, meta, path, f"pass `quality` {meta.get('quality')}", ("quality",))
    model = _build(spec, quality, state, meta, path).eval()
    if not tables_present(model):
        model.update(force=True)
    rans.bound_entropy_decoders(model)
    rans.bound_entropy_encoders(model)
    device = torch.device(device)
    model.g_a.to(device)
    model.g_s.to(device)
    codec = Codec(spec=spec, quality=quality, model=model, digest=digest, source=path, device=device,
                  machine_only=meta.get("machine_only") == "true")
    return codec.at_rate(quality) if spec.variable_rate else codec


def weights_info(path: Path) -> dict[str, str]:
    """The comneck metadata of a safetensors codec file (empty for other files); the tensors are not read."""
    from safetensors import SafetensorError, safe_open

    if Path(path).suffix != ".safetensors":
        return {}
    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except (SafetensorError, OSError, ValueError) as exc:
        raise ModelFileError(f"{path} is not a comneck codec weights file (not a valid safetensors file: {exc})"
                             ) from exc


def file_config(spec: CodecSpec, quality: int) -> tuple[dict[str, Any], str]:
    """(constructor arguments, where they come from) of the codec ``load_codec(spec.name, quality)`` would load:
    the registered file's own metadata when a comneck file is registered under that name (the shipped
    mbt2018-mean-vbr is N=128, M=192), else the zoo table's (CompressAI's defaults where the zoo has none)."""
    name = registry_name(spec.name, quality)
    entry = registry.lookup(name)
    # Only the safetensors header is read (no pickle, no tensors), so the sha256 check of loading is not needed.
    if entry is not None and entry.path().is_file():
        config = weights_info(entry.path()).get("config")
        if config:
            return json.loads(config), f"registered file {name}"
    return spec.qualities[quality], "CompressAI zoo table" if spec.zoo else "CompressAI default"


def check_codec_file(path: Path, codec: str, quality: int | None) -> dict[str, str]:
    """Refuse a file that is not weights of ``codec`` (at ``quality``; None for a variable-rate codec) before it
    is registered: it must load as a state dict and build the codec with its shapes. Returns its metadata."""
    spec = get_spec(codec)
    quality = min(CODEC_LEVELS[codec]) if quality is None else quality
    check_quality(spec, quality)
    state, meta = _read_state(Path(path))
    _check_file_quality(spec, quality, meta, path,
                        f"import them as {registry_name(spec.name, int(meta.get('quality') or quality))}")
    _build(spec, quality, state, meta, Path(path))
    return meta
