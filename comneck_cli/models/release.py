"""The ComNeck authors' released checkpoints as comneck models (issue #18): the neck, and importing whole files.

Each of the twelve files ``d{S}_{Q}.pth.tar`` (NYCU-MAPL/BridgingCompressionMLLM, release v1.0; scenario S of the
paper, quality Q = 1..4) holds the authors' ELIC codec (``state_dict``: :mod:`comneck_cli.codecs.elic_comneck`) and
the transform-neck T trained on that codec's ``y_hat`` (``adapter``: their ``Linear_Encoder``). T feeds C', CLIP
ViT-L/14 (openai) from block k+1 = 3 on, and was distilled to the projected class embedding of C(x) (their
surrogate loss). :func:`import_releases` registers both halves of each file:

======== ==================================== ============================ ====================================
scenario codec weights                        neck                         records coded with
d1       ``elic-comneck-qQ`` (frozen base)    ``elic-comneck-qQ-neck``     ``--codec elic-comneck -q Q``
d2       ``elic-comneck-qQ-d2``               ``elic-comneck-qQ-d2-neck``  ``... --weights elic-comneck-qQ-d2``
d3       ``elic-comneck-qQ-d3`` (machines)    ``elic-comneck-qQ-d3-neck``  ``... --weights elic-comneck-qQ-d3``
======== ==================================== ============================ ====================================

A neck's metadata and registry entry name the digest of its codec weights, so ``comneck features`` finds the neck
of a record from the record alone (:func:`comneck_cli.features.resolve_neck`).
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Sequence

import torch
from torch import Tensor

from comneck_cli import weights as registry
from comneck_cli.codecs.elic_comneck import (read_checkpoint, release_codec_state, release_of,
                                             write_release_codec)
from comneck_cli.errors import ModelFileError, UsageError
from comneck_cli.hub.download import RELEASE_FILES, DownloadError, Progress, download, mirrored, release_url
from comneck_cli.modelfiles import check_finite
from comneck_cli.models.neck import NeckInfo, TransformNeck, save_neck

CODEC = "elic-comneck"
# The released neck as comneck's TransformNeck: ViT-L/14's width and heads, a 256² image's 16×16 latent grid.
RELEASE_NECK_CONFIG = {"latent_channels": 320, "width": 1024, "heads": 16, "grid": (16, 16), "mlp_ratio": 4.0}
RELEASE_CLIP = ("ViT-L-14", "openai")  # open_clip's name and tag of the CLIP the necks feed
RELEASE_K = 2  # the neck's tokens enter block k+1
# The most a download may hold (hub.download's max_bytes): a released checkpoint (codec, neck and the authors'
# training state) is a few hundred MB, CompressAI's largest zoo file about 100 MB.
RELEASE_MAX_BYTES = 2 << 30
ZOO_MAX_BYTES = 512 << 20
RELEASE_TARGETS = "pooled:1"  # their distillation target, the projected class embedding, in NeckInfo.targets' form

_NECK_NAMES = (  # the authors' Linear_Encoder -> comneck's TransformNeck (same modules, other names)
    ("trans_latent_dim.", "proj."),
    ("transformer.resblocks.0.", "block."),
)


def release_neck(adapter_state: Mapping[str, Tensor], source: str = "the adapter") -> TransformNeck:
    """The authors' ``Linear_Encoder`` state dict -> a :class:`TransformNeck` of :data:`RELEASE_NECK_CONFIG`
    holding it (eval mode), checked by a strict load; ``source`` names the file in errors.

    The two are the same network: their attention is sequence-first (``nn.MultiheadAttention``'s default) and
    open_clip's batch-first, but the parameters are laid out alike, so only names change.
    """
    state = {}
    for key, value in adapter_state.items():
        for theirs, ours in _NECK_NAMES:
            if key.startswith(theirs):
                key = ours + key[len(theirs):]
                break
        state[key] = value
    with torch.device("meta"):  # the file's tensors are assigned: no memory, no initialisation
        neck = TransformNeck(**RELEASE_NECK_CONFIG)
    try:
        neck.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as exc:
        problem = " ".join(str(exc).split("\n\t")[1:2]) or str(exc)
        raise ModelFileError(f"{source}: the neck ('adapter') is not the ComNeck Linear_Encoder: {problem}") from exc
    return neck.eval()


def read_release(path: Path | str) -> tuple[dict[str, Tensor], TransformNeck]:
    """One released ``d{S}_{Q}.pth.tar`` -> (codec state for :class:`~comneck_cli.codecs.elic_comneck.ElicComneck`,
    the neck), both checked against the architectures; a wrong file is one :class:`ModelFileError`."""
    checkpoint = read_checkpoint(path)
    for part in ("state_dict", "adapter"):  # NaN weights would import, then hang the encoder or give NaN features
        check_finite({k: v for k, v in checkpoint[part].items() if isinstance(v, Tensor)}, path,
                     f"release file ({part!r})", "download it again")
    return (release_codec_state(checkpoint["state_dict"], str(path)),
            release_neck(checkpoint["adapter"], str(path)))


def release_names(scenario: str, quality: int) -> tuple[str, str]:
    """The registry names (codec weights, neck) of the released file of ``scenario`` and ``quality``."""
    codec = f"{CODEC}-q{quality}" if scenario == "d1" else f"{CODEC}-q{quality}-{scenario}"
    return codec, f"{codec}-neck"


@dataclass(frozen=True)
class ImportedRelease:
    """One released file in the registry: where it came from, and its two entries."""

    source: str
    scenario: str
    quality: int
    codec: registry.Entry
    neck: registry.Entry


def import_releases(paths: Sequence[Path | str], scenario: str | None = None, quality: int | None = None, *,
                    sources: Mapping[str, str] | None = None,
                    done: Callable[[ImportedRelease], None] | None = None) -> list[ImportedRelease]:
    """Register released files: for each, its codec weights (converted to comneck's codec file) and its neck.

    Scenario and quality come from each name ``d{S}_{Q}.pth.tar`` unless ``scenario`` (``"d1"``-``"d3"``) and
    ``quality`` are given. Every file is read and checked before anything is registered, so a wrong file (layout,
    shapes, name) is one error and leaves the registry as it was. ``sources`` maps a path to where it was downloaded
    from (kept in the registry; default: the file name); ``done`` is called after each file is registered.
    """
    if (scenario is not None or quality is not None) and len(paths) > 1:
        raise UsageError(f"`scenario` and `quality` name one file's release, but {len(paths)} files were given; "
                         "import them one by one or keep their release names", params=("scenario", "quality"))
    plan: dict[tuple[str, int], Path] = {}
    for path in map(Path, paths):
        release = release_of(path, scenario, quality)
        if release in plan:
            raise UsageError(f"{plan[release]} and {path} are both the release {release[0]} quality {release[1]}; "
                             "import one of them")
        read_release(path)  # checked now; read again below, so only one file's tensors are in memory at a time
        plan[release] = path
    imported = []
    for (scene, level), path in plan.items():
        result = _import_one(path, scene, level, (sources or {}).get(str(path), path.name))
        imported.append(result)
        if done is not None:
            done(result)
    return imported


def _import_one(path: Path, scenario: str, quality: int, source: str) -> ImportedRelease:
    codec_state, neck = read_release(path)
    codec_name, neck_name = release_names(scenario, quality)
    about = {"codec": CODEC, "quality": quality, "scenario": scenario, "source": source,
             "release_sha256": registry.file_sha256(path)}
    with tempfile.TemporaryDirectory(prefix="comneck-import-") as folder:
        codec_file = Path(folder) / f"{codec_name}.safetensors"
        write_release_codec(codec_state, codec_file, quality, scenario)
        machine = {"machine_only": True} if scenario == "d3" else {}  # g_a retrained for the neck: no image to decode
        codec_entry = registry.import_file(codec_name, codec_file, "codec", {**about, **machine}, move=True)
        digest = codec_entry.sha256[:8]
        clip_model, clip_tag = RELEASE_CLIP
        info = NeckInfo(codec=CODEC, quality=quality, codec_digest=digest, clip_model=clip_model, clip_tag=clip_tag,
                        k=RELEASE_K, scenario=scenario, config=dict(neck.config), targets=RELEASE_TARGETS,
                        recipe="release")  # trained against their C', which applies ln_post twice
        neck_file = Path(folder) / f"{neck_name}.safetensors"
        save_neck(neck, neck_file, info)
        neck_entry = registry.import_file(
            neck_name, neck_file, "neck",
            {**about, "codec_digest": digest, "codec_weights": codec_name, "clip_model": clip_model,
             "clip_tag": clip_tag, "k": RELEASE_K, "targets": RELEASE_TARGETS}, move=True)
    return ImportedRelease(source, scenario, quality, codec_entry, neck_entry)


def downloads_dir() -> Path:
    """Where fetched files wait (and partial downloads resume) until they are imported: beside the user registry."""
    return registry.user_dir().parent / "downloads"


def fetch_release(names: Sequence[str] = RELEASE_FILES, *,
                  progress: Callable[[str], Progress | None] = lambda name: None,
                  done: Callable[[ImportedRelease], None] | None = None) -> list[ImportedRelease]:
    """Download the released files ``names`` (default: all twelve) from :func:`release_url`, resuming partial
    downloads, then :func:`import_releases` them (their sha256 is recorded with each entry) and delete the downloads.
    ``progress(name)`` gives the callback for one file's bytes."""
    paths, sources = [], {}
    for name in names:
        url = release_url(name)
        target = downloads_dir() / name
        if target.is_file():  # complete from a run that stopped at a later file, if it still reads as one
            try:
                read_release(target)
            except ModelFileError:
                target.unlink()
        if not target.is_file():  # checked as a release file before it is named complete, so never reused damaged
            download(url, target, progress=progress(name), max_bytes=RELEASE_MAX_BYTES, check=read_release,
                     fix=f"run `comneck weights import-comneck {name}` (the other release files are beside it)")
        paths.append(target)
        sources[str(target)] = url
    imported = import_releases(paths, sources=sources, done=done)
    for path in paths:
        path.unlink(missing_ok=True)
    _remove_if_empty(downloads_dir())
    return imported


def _remove_if_empty(folder: Path) -> None:
    try:
        folder.rmdir()
    except OSError:  # holds another download's part (or is gone): it stays
        pass


def fetch_zoo(name: str, *, progress: Progress | None = None) -> registry.Entry:
    """Download CompressAI's zoo weights registered as ``name`` (``CODEC-qQ``, e.g. ``mbt2018-mean-q3``), check them
    (the sha256 prefix in the zoo's file name, then the architecture) and register them."""
    from comneck_cli.codecs import CODECS, check_codec_file
    from comneck_cli.codecs._compressai import import_compressai

    codec, _, level = name.rpartition("-q")
    spec = CODECS.get(codec)
    import_compressai()
    from compressai.zoo.image import model_urls

    url = model_urls.get(codec, {}).get("mse", {}).get(int(level)) if level.isdigit() and spec and spec.zoo else None
    if url is None:
        zoo = ", ".join(f"{c.name}-qQ" for c in CODECS.values() if c.zoo)
        raise UsageError(f"{name!r} is not a CompressAI zoo codec: fetch `comneck` (the ComNeck release) or one of "
                         f"{zoo} with Q one of the codec's qualities")
    url = mirrored(url)
    filename = url.rsplit("/", 1)[-1]
    target = downloads_dir() / filename
    fix = f"run `comneck weights import {name} {filename}`"
    digest = download(url, target, progress=progress, fix=fix, max_bytes=ZOO_MAX_BYTES)
    prefix = filename.rsplit("-", 1)[-1].split(".")[0]  # zoo file names end in their sha256's first 8 hex digits
    if not digest.startswith(prefix):
        target.unlink(missing_ok=True)
        raise DownloadError(f"the file downloaded from {url} has sha256 {digest[:12]}…, not {prefix}… as its name "
                            f"says; it was damaged on the way, fetch it again")
    try:
        check_codec_file(target, codec, int(level))
        return registry.import_file(name, target, "codec", {"codec": codec, "quality": int(level), "source": url},
                                    move=True)
    finally:
        target.unlink(missing_ok=True)
        _remove_if_empty(downloads_dir())
