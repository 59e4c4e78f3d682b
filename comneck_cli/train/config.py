"""A run's settings in one place: each config dataclass field says its default and whether it is part of the run's
*trajectory* (what a resumed run takes from its checkpoint), through :func:`setting`; defaults, trajectory and the
resume rules are read from the fields, never listed a second time.

    @dataclass(kw_only=True)
    class CodecTrainConfig(RunConfig):
        lr: float | None = setting(1e-4)              # None: 1e-4, or the checkpoint's on resume
        steps: int | None = setting(trajectory=False)  # a resumed run may be extended
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from comneck_cli.errors import ComneckError


def setting(default: Any = None, *, trajectory: bool = True) -> Any:
    """A config field the caller may leave None: ``default`` fills it, after a resume took the checkpoint's value
    for a ``trajectory`` setting (one that shapes what is learnt: model, λ, learning rates, batch, crop, seed)."""
    return field(default=None, metadata={"default": default, "trajectory": trajectory})


def defaults(cfg: Any) -> dict[str, Any]:
    """Each setting's default (fields declared with :func:`setting` and a default)."""
    return {f.name: f.metadata["default"] for f in fields(cfg) if f.metadata.get("default") is not None}


def trajectory(cfg: Any) -> tuple[str, ...]:
    """The settings a resumed run takes from its checkpoint."""
    return tuple(f.name for f in fields(cfg) if f.metadata.get("trajectory"))


@dataclass(kw_only=True)
class RunConfig:
    """Settings every training run takes.

    ``steps``/``epochs`` (declared by each run): the run's length (exactly one; staged runs take one value per
    stage). On ``resume`` the checkpoint's own settings decide the trajectory (:func:`trajectory`); a value given
    here that differs from them is an error, and only the length, the outputs and where the run executes may
    change. ``register``: registry name (each run says which ``{names}`` it fills in), None to skip. ``run_dir``
    holds ``checkpoint.pt`` and ``metrics.jsonl`` (default: beside ``output``, else in the user registry's ``runs``
    folder).
    """

    data: Path | None = None
    classes: Path | None = None
    output: Path | None = None
    register: str | None = None
    batch_size: int | None = setting(8)
    crop: int | None = setting(256)
    seed: int | None = setting(0)
    device: str = "auto"
    precision: str = "auto"
    resume: Path | None = None
    run_dir: Path | None = None
    checkpoint_every: int = 500
    minutes: float | None = None  # stop, checkpoint and export after this much wall time (a lent GPU's minutes)
    log_every: int = 10
    workers: int = 0
    quiet: bool = False  # the command line's: a library run prints nothing either way


@dataclass(kw_only=True)
class ClipRunConfig(RunConfig):
    """A run with a frozen CLIP tower: open_clip's ``clip_model`` with the weights of ``clip_tag`` (``"none"``: a
    randomly initialised tower, for tests), or of the file ``clip_weights``."""

    clip_model: str | None = setting("ViT-L-14")
    clip_tag: str | None = setting("openai")
    clip_weights: Path | None = setting()


def serialise(cfg: Any) -> dict[str, Any]:
    """A config dataclass as plain JSON-able values (paths as strings)."""
    return {f.name: _plain(getattr(cfg, f.name)) for f in fields(cfg)}


def _plain(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def merge_resumed(cfg: Any, saved: dict[str, Any]) -> None:
    """Take the trajectory settings from a checkpoint's config; a differing value given now is an error."""
    paths = {f.name for f in fields(cfg) if "Path" in str(f.type)}
    for name in trajectory(cfg):
        given, stored = _plain(getattr(cfg, name)), _plain(saved.get(name))
        if given is not None and given != stored:
            raise ComneckError(
                  f"the checkpoint was trained with `{name}` {stored}, not {given}; drop `{name}` to resume it, "
                  "or start a new run without `resume`", params=(name, "resume"))
        if name in paths and stored is not None:
            stored = Path(stored)
        elif isinstance(stored, list):
            stored = tuple(stored)
        setattr(cfg, name, stored)


def resolve_run(cfg: Any, kind: str, command: str) -> dict[str, Any] | None:
    """What every run does before training: resume state, required settings, defaults, λ.

    On resume the trajectory comes from the checkpoint (``kind`` must match its run). Returns its state.
    """
    from comneck_cli.codecs import get_spec
    from comneck_cli.train import checkpoint as ckpt
    from comneck_cli.train.losses import default_lambda

    state = None
    if cfg.resume is not None:
        state = ckpt.load(cfg.resume, kind)
        merge_resumed(cfg, state["config"])
        cfg.data = cfg.data or Path(state["config"]["data"])
        cfg.run_dir = cfg.run_dir or Path(cfg.resume).parent
    variable_rate = cfg.codec is not None and get_spec(cfg.codec).variable_rate
    if cfg.codec is None or (cfg.quality is None and not variable_rate) or cfg.data is None:
        raise ComneckError(f"{command} needs `codec`, `quality` and `data` (or `resume` CHECKPOINT)",
                           params=("codec", "quality", "data", "resume"))
    for name, value in defaults(cfg).items():
        if getattr(cfg, name) is None:
            setattr(cfg, name, value)
    if cfg.lmbda is None and not variable_rate:  # a variable-rate codec trains each level at its own λ
        cfg.lmbda = default_lambda(cfg.codec, cfg.quality)
    if cfg.crop % 64:
        raise ComneckError(f"`crop` {cfg.crop} is not a multiple of 64, which the codec's transforms need",
                           params=("crop",))
    return state
