"""``comneck train neck``: train the transform-neck T so that C'(T(y_hat)) stands in for C(x) (paper §3.4-3.5).

Scenarios (Table 1), each in three stages whose lengths (epochs or steps) are set per stage:

- **d1**, codec frozen (human perception kept). y_hat is exactly what the entropy coder writes
  (``latents.frozen_latents``). Progressive training (appendix A.1): (1) cross-entropy only, lr 1e-4;
  (2) cross-entropy + distillation weighted 1:100, lr 1e-5; (3) distillation only, lr 1e-5.
- **d2**, codec retrained for people and machines, its neck starting from a d1 neck (``neck_init``, by default the
  registry's ``{codec}-q{quality}-neck``; none is an error): (1) L_dist with the codec frozen; (2) joint training of
  codec and neck on R + λ(γ·MSE(x, x̂) + β·L_dist); (3) L_dist with the codec frozen again.
- **d3**, encoder retrained for machines only: as d2 with R + λ·β·L_dist (γ = 0, g_s unused and left as
  it was). Its codec and neck are marked machine-only (``NeckInfo.scenario == "d3"``; codec metadata
  ``machine_only = "true"``).

During joint training y_hat is rounded straight-through around the predicted means (the y_hat the coder
will write) and R comes from CompressAI's noisy proxy; the codec's net parameters take Adam with the stage's
lr and gradient-norm clipping at 1.0, the bottlenecks' quantiles their own Adam on ``aux_loss``.

Losses: L_dist = Σ_i w_i · MSE(C'(T(y_hat))_i, C(x)_i) over the CLIP outputs i the neck targets (default one:
the projected image embedding, as the authors' code does). ``target`` ``layer-2/patch`` picks another single
output; ``targets`` ``"pooled:1,layer-2/patch:1,llama-adapter:0.5"`` a weighted list, so one neck serves several
MLLM families (a family name stands for what ``presets.PRESETS`` says it reads). The teacher C(x) runs once per
batch, keeping every state the targets need; it sees the crop resized to the CLIP's image size (bicubic) and
normalised with its mean and std. The cross-entropy is CLIP zero-shot classification: logits from the image
embedding of C'(T(y_hat)) and the class-name text embeddings from the prompt templates (by ``recipe``: their raw dot
product, or logit_scale × cosine), against the
folder's class; the class names are open_clip's ImageNet names for WordNet-id folders (``data.imagenet_class_names``)
and the prompts by default its 80 OpenAI ImageNet templates for them (``default_templates``), as the authors' code.

Data follow the authors (``crops="resize"``, the default): each image's short side resized to the crop size, then
the centre square, the same every epoch. The paper's "epoch" is 1/12 of ImageNet-1k at batch 32 (3,336 steps), so
its 20 epochs per stage are 66,720 steps at ``batch_size`` 32.

The neck's optimizer is Adam, betas (0.9, 0.999), eps 1e-8, no weight decay, kept across stages (the
learning rate steps at stage boundaries).

Recipes (``recipe``): where the authors' code (NYCU-MAPL/BridgingCompressionMLLM, ``examples/train.py``) and the paper
differ, ``release`` (the default) does what their code does, which reproduces their released files, and ``paper``
what the paper writes (:data:`RECIPES`): the cross-entropy's logits (raw dot product of the unnormalised embedding
with the unit class weights, vs. logit_scale × cosine), ``ln_post`` applied twice in C' and the teacher (their
``CLIP_modify``) or once, the data's resize filter (torchvision's default bilinear vs. bicubic), the teacher's
resized input unclamped or clamped to [0, 1], and d1's loss weights (11.52 × (100·CE; CE + 100·L_dist;
100·L_dist) vs. CE; CE + 100·L_dist; L_dist). The neck file records its recipe, and ``features`` runs the C' it
names (``NeckInfo.ln_post_twice``). Both recipes batch 32 images by default, as the authors do.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from comneck_cli.clip.presets import PRESETS
from comneck_cli.clip.teacher import (HIDDEN_SELECTS, SELECTION_FORMS, TOKEN_SELECTS, Target, Teacher, select_target,
                                      tail_request)
from comneck_cli.clip.zeroshot import DEFAULT_TEMPLATES, class_weights, imagenet_templates
from comneck_cli.codecs import check_quality, get_spec, rate_gain, registry_name
from comneck_cli.errors import ComneckError, MismatchError, ModelFileError
from comneck_cli.train import checkpoint as ckpt
from comneck_cli.train.codec import constructor_config, split_parameters
from comneck_cli.train.config import ClipRunConfig, defaults, resolve_run, setting
from comneck_cli.train.data import steps_for
from comneck_cli.train.export import publish, write_codec
from comneck_cli.train.latents import frozen_latents, latent_path, rate_bpp, rate_for_step
from comneck_cli.train.losses import BETA, GAMMA, joint_loss, weighted_distillation, zero_shot_cross_entropy
from comneck_cli.train.loop import Runtime, check_finite, check_length, codec_step, crop_batches, default_run_dir
from comneck_cli.train.trainer import Progress, StagedRun, TrainResult, train

CROPS = ("resize", "random")
ADAM = {"betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.0}


@dataclass(frozen=True)
class Recipe:
    """Where the authors' code and the paper differ, which one a run follows (module docstring, "Recipes").

    ``ce_form``: ``losses.zero_shot_cross_entropy``'s form; ``ln_post_twice``: C' and the teacher apply ``ln_post``
    twice; ``resize``: the data's filter (``data.resize_centre_crop``); ``clamp_teacher``: the teacher's resized input
    is clamped to [0, 1]; d1's stage weights: ``ce`` (stage 1), ``dist`` (stage 3), all three times ``scale``.
    """

    name: str
    ce_form: str
    ln_post_twice: bool
    resize: str
    clamp_teacher: bool
    ce: float
    dist: float
    scale: float


RECIPES = {r.name: r for r in (
    Recipe("release", ce_form="dot", ln_post_twice=True, resize="bilinear", clamp_teacher=False,
           ce=100.0, dist=100.0, scale=11.52),
    Recipe("paper", ce_form="cosine", ln_post_twice=False, resize="bicubic", clamp_teacher=True,
           ce=1.0, dist=1.0, scale=1.0),
)}


@dataclass(frozen=True)
class Stage:
    """One training stage: its learning rate, loss weights, and whether the codec trains (joint R-D loss)."""

    name: str
    lr: float
    ce: float = 0.0
    dist: float = 1.0
    joint: bool = False


def default_stages(scenario: str, ce_dist: tuple[float, float] = (1.0, 100.0),
                   recipe: str = "paper") -> tuple[Stage, ...]:
    """The three stages for a scenario; d1's loss weights by ``recipe`` (:data:`RECIPES`; the authors' code only
    trains d1, and the learning rates of d2/d3 are not published: ours)."""
    if scenario == "d1":
        r = RECIPES[recipe]
        return (Stage("ce", 1e-4, ce=r.scale * r.ce, dist=0.0),
                Stage("ce+dist", 1e-5, ce=r.scale * ce_dist[0], dist=r.scale * ce_dist[1]),
                Stage("dist", 1e-5, dist=r.scale * r.dist))
    return (Stage("dist", 1e-4), Stage("joint", 1e-4, joint=True), Stage("dist", 1e-5))


@dataclass(frozen=True)
class WeightedTarget:
    """One term of L_dist: its target, weight, and the MLLM family it was named by (None: named directly)."""

    target: Target
    weight: float = 1.0
    family: str | None = None

    def __str__(self) -> str:
        return f"{self.family or self.target}:{self.weight:g}"


def _named_target(name: str, clip_model: str | None, clip_tag: str | None) -> WeightedTarget:
    """A family name (through ``presets.PRESETS``, whose tower must be the one trained against) or a Target."""
    preset = PRESETS.get(name)
    if preset is None:
        target = Target.parse_or_none(name)
        if target is None:
            raise ComneckError(f"unknown distillation target {name!r}; use {SELECTION_FORMS} or an MLLM family "
                               f"({', '.join(PRESETS)})")
        return WeightedTarget(target)
    if clip_model is not None and (preset.clip_model, preset.clip_tag) != (clip_model.replace("/", "-"), clip_tag):
        raise MismatchError(
            f"distillation target {name!r} reads CLIP {preset.clip_model}/{preset.clip_tag}, but this neck trains "
            f"against {clip_model}/{clip_tag}; train it with `clip_model` {preset.clip_model} `clip_tag` "
            f"{preset.clip_tag}, or name the features it reads (layer{preset.layer}/{preset.select})",
            params=("clip_model", "clip_tag"))
    target = Target(preset.select, preset.layer if preset.select in HIDDEN_SELECTS else -1)
    return WeightedTarget(target, 1.0, name)


def parse_targets(text: str, clip_model: str | None = None,
                  clip_tag: str | None = None) -> tuple[WeightedTarget, ...]:
    """``targets``: comma-separated ``NAME[:WEIGHT]`` (weight 1 when left out), NAME a selection
    (:data:`SELECTION_FORMS`) or a ``presets.PRESETS`` family, whose tower must be ``clip_model``/``clip_tag``
    when they are given."""
    items = [item.strip() for item in text.split(",")]
    if not any(items):
        raise ComneckError(f"`targets` {text!r} names no target; write NAME:WEIGHT pairs separated by commas, such "
                           "as pooled:1,layer-2/patch:1", params=("targets",))
    terms: list[WeightedTarget] = []
    for item in items:
        if not item:
            raise ComneckError(f"`targets` {text!r} has an empty item; separate NAME:WEIGHT pairs with single commas",
                               params=("targets",))
        name, colon, weight_text = item.rpartition(":") if ":" in item else (item, "", "")
        name = name.strip()
        if name in HIDDEN_SELECTS:
            raise ComneckError(f"`targets` item {item!r} is ambiguous (SELECT:LAYER or NAME:WEIGHT?); write "
                               f"layer{weight_text.strip() or '-1'}/{name}:WEIGHT instead", params=("targets",))
        try:
            weight = float(weight_text) if colon else 1.0
        except ValueError:
            raise ComneckError(f"the weight {weight_text.strip()!r} of `targets` item {item!r} is not a number; "
                               f"write NAME:WEIGHT such as {name}:1", params=("targets",)) from None
        if not (math.isfinite(weight) and weight > 0):
            raise ComneckError(f"the weight of `targets` item {item!r} must be a positive number, not {weight_text!r}",
                               params=("targets",))
        term = _named_target(name, clip_model, clip_tag)
        twin = next((t for t in terms if t.target == term.target), None)
        if twin is not None:
            raise ComneckError(f"`targets` names {term.target} twice ({twin.family or twin.target} and {name}); "
                               "give it once, with the summed weight", params=("targets",))
        terms.append(WeightedTarget(term.target, weight, term.family))
    return tuple(terms)


@dataclass(kw_only=True)
class NeckTrainConfig(ClipRunConfig):
    """What ``train_neck`` does; None means the setting's default.

    ``steps``/``epochs`` and ``lr``: one value per stage (a single value applies to all three).
    ``codec_weights``: the (human-perception) codec to start from (default: the registry/zoo entry
    ``{codec}-q{quality}``).
    ``register``: the neck's registry name; ``{suffix}`` is empty for d1 (``features`` finds
    ``{codec}-q{quality}-neck`` by default) and ``-d2``/``-d3`` otherwise, as those necks go with their own codec.
    ``codec_output``/``codec_register``: where the retrained codec of d2/d3 goes (default: beside ``output``
    as ``STEM.codec.safetensors``, and the registry as ``{codec}-q{quality}-{scenario}``).
    """

    classes: Path | None = setting()  # the cross-entropy's class names are part of what is learnt
    codec: str | None = setting()
    quality: int | None = setting()
    scenario: str | None = setting("d1")
    codec_weights: Path | None = setting()
    k: int | None = setting(2)
    target: str | None = setting()
    targets: str | None = setting()
    templates: tuple[str, ...] | None = setting()
    crops: str | None = setting("resize")
    recipe: str | None = setting("release")
    batch_size: int | None = setting(32)  # the authors' batch
    steps: tuple[int, ...] | None = setting(trajectory=False)
    epochs: tuple[int, ...] | None = setting(trajectory=False)
    lr: tuple[float, ...] | None = setting()
    ce_dist: tuple[float, float] | None = setting((1.0, 100.0))
    lmbda: float | None = setting()
    gamma: float | None = setting(GAMMA)
    beta: float | None = setting(BETA)
    aux_lr: float | None = setting(1e-3)
    clip_max_norm: float | None = setting(1.0)
    neck_width: int | None = setting()
    neck_heads: int | None = setting()
    neck_init: Path | None = setting()
    clip_from_mllm: str | None = setting()  # a LLaVA folder or cached hub id whose tower is the frozen CLIP
    register: str | None = "{codec}-q{quality}-neck{suffix}"
    codec_output: Path | None = None
    codec_register: str | None = "{codec}-q{quality}-{scenario}"


def per_stage(values: Sequence | None, what: str) -> tuple | None:
    """A per-stage setting ``what``: one value (for all three stages) or three."""
    if values is None:
        return None
    values = tuple(values)
    if len(values) == 1:
        return values * 3
    if len(values) != 3:
        raise ComneckError(f"`{what}` takes one value or three (one per stage), got {len(values)}", params=(what,))
    return values


def load_frozen_codec(name: str, quality: int, weights: Any, state: dict[str, Any] | None, device: torch.device,
                      param: str) -> tuple[Any, nn.Module]:
    """The run's codec and its model frozen on ``device``; a resumed run must get the weights it trained on
    (passed as the setting ``param``)."""
    from comneck_cli.codecs import load_codec

    codec = load_codec(name, quality, weights=weights)
    digest = codec.digest.hex()
    if state is not None and state["start_digest"] != digest:
        raise MismatchError(
            f"the codec weights {codec.source} (digest {digest}) are not the ones this run trained on "
            f"({state['start_digest']}); pass the run's codec as `{param}`", params=(param,))
    return codec, codec.model.to(device).eval().requires_grad_(False)


def stage_lengths(cfg: Any, state: dict[str, Any] | None, per_epoch: int) -> tuple[int, ...]:
    """Steps of the three stages: the resumed run's, or from ``steps``/``epochs`` (one value, or one per stage)."""
    if state is not None and cfg.steps is None and cfg.epochs is None:
        return tuple(int(n) for n in state["stage_steps"])
    epochs, steps = per_stage(cfg.epochs, "epochs"), per_stage(cfg.steps, "steps")
    return tuple(steps_for(None if epochs is None else epochs[i], None if steps is None else steps[i],
                           per_epoch, f"stage {i + 1}") for i in range(3))


# Settings only some scenarios use: given to another, they would be silently ignored, so they are refused.
ONLY_FOR = {"ce_dist": ("d1",), "templates": ("d1",), "lmbda": ("d2", "d3"), "gamma": ("d2",),
            "beta": ("d2", "d3")}
WHY_UNUSED = {"ce_dist": "it weights stage 2's cross-entropy, which only d1 has",
              "templates": "the prompts feed the cross-entropy, which only d1 has",
              "lmbda": "it weights the joint rate-distortion loss of d2/d3, and d1 does not train the codec",
              "gamma": "it weights MSE(x, x̂), which only d2's joint loss has (d3 leaves g_s out)",
              "beta": "it weights L_dist in the joint loss of d2/d3, and d1 does not train the codec"}


def refuse_unused(cfg: NeckTrainConfig, scenario: str) -> None:
    """A setting the scenario does not use (``ONLY_FOR``), or a quality for a variable-rate codec, is an error."""
    for name, scenarios in ONLY_FOR.items():
        if getattr(cfg, name) is not None and scenario not in scenarios:
            raise ComneckError(f"scenario {scenario} does not use `{name}`: {WHY_UNUSED[name]}; drop `{name}`",
                               params=(name,))
    if cfg.quality is not None and cfg.codec is not None and get_spec(cfg.codec).variable_rate:
        raise ComneckError(f"a neck for the variable-rate {cfg.codec} trains on every rate at once and serves "
                           f"records of any rate; drop `quality` {cfg.quality}", params=("quality",))


def _resolve(cfg: NeckTrainConfig) -> dict[str, Any] | None:
    if cfg.resume is None:  # a resumed run's stored settings are its own, defaults included
        refuse_unused(cfg, cfg.scenario or defaults(cfg)["scenario"])
    if cfg.clip_from_mllm is not None:
        _from_mllm(cfg)
    state = resolve_run(cfg, "neck", "train neck")
    if cfg.scenario not in ("d1", "d2", "d3"):
        raise ComneckError(f"unknown `scenario` {cfg.scenario!r}; use d1, d2 or d3", params=("scenario",))
    if state is not None and "crops" not in state["config"]:
        cfg.crops = "random"  # a run from before `crops` took random crops
    if state is not None and "recipe" not in state["config"]:
        cfg.recipe = "paper"  # a run from before `recipe` followed the paper's forms
    if cfg.recipe not in RECIPES:
        raise ComneckError(f"unknown `recipe` {cfg.recipe!r}; use release (the authors' code, which made their "
                           "released necks) or paper", params=("recipe",))
    if cfg.crops not in CROPS:
        raise ComneckError(f"unknown `crops` {cfg.crops!r}; use resize (the authors' protocol) or random",
                           params=("crops",))
    cfg.lr = per_stage(cfg.lr, "lr")
    cfg.templates = None if cfg.templates is None else tuple(cfg.templates)
    cfg.ce_dist = tuple(cfg.ce_dist)
    targets_of(cfg)
    spec = get_spec(cfg.codec)
    if spec.variable_rate and cfg.scenario != "d1":
        raise ComneckError(f"a neck for the variable-rate {cfg.codec} trains in scenario d1 only (the codec frozen, "
                           f"one neck for every rate), not {cfg.scenario}", params=("scenario",))
    if not spec.variable_rate:  # a variable-rate codec's neck serves every rate: no level to check
        check_quality(spec, cfg.quality)
    return state


def _from_mllm(cfg: NeckTrainConfig) -> None:
    """``clip_from_mllm``: the frozen tower is the LLaVA checkpoint's own (no text tower, so distillation only), the
    neck records that tower as ``comneck ask`` identifies it, and by default distils what the model reads."""
    from comneck_cli.mllm.model import training_tower

    if cfg.clip_weights is not None:
        raise ComneckError("`clip_from_mllm` takes the tower from the MLLM; drop `clip_weights`",
                           params=("clip_weights",))
    for name in ("classes", "templates"):
        if getattr(cfg, name) is not None:
            raise ComneckError(f"`clip_from_mllm` trains by distillation alone (the MLLM has no CLIP text tower): "
                               f"drop `{name}`", params=(name,))
    if cfg.resume is None and (cfg.scenario or "d1") == "d1":
        # d1's stages 1 and 2 are its cross-entropy, which needs a text tower: one length given is stage 3's
        cfg.steps, cfg.epochs = _distillation_only(cfg.steps, "steps"), _distillation_only(cfg.epochs, "epochs")
        lengths = cfg.steps or cfg.epochs
        if lengths is None:
            raise ComneckError("`clip_from_mllm` trains stage 3 (distillation) alone: give its length as `steps` N or "
                               "`epochs` N", params=("steps", "epochs"))
        if lengths[0] or lengths[1]:
            raise ComneckError("`clip_from_mllm` trains by distillation alone: the MLLM has no CLIP text tower for "
                               "the cross-entropy of d1's stages 1 and 2; give them no steps (`steps` 0,0,N)",
                               params=("clip_from_mllm", "steps"))
    tower = training_tower(cfg.clip_from_mllm)
    cfg.clip_model, cfg.clip_tag = tower.clip_model, tower.clip_tag
    if cfg.target is None and cfg.targets is None:
        cfg.target = tower.target


def _distillation_only(values: Sequence[int] | None, what: str) -> tuple[int, ...] | None:
    """A per-stage length of a ``clip_from_mllm`` run in d1: one value is stage 3's (``0,0,N``), three are as given."""
    if values is not None and len(tuple(values)) == 1:
        return (0, 0, *values)
    return per_stage(values, what)


def targets_of(cfg: NeckTrainConfig) -> tuple[WeightedTarget, ...]:
    """L_dist's weighted targets: ``targets``, else ``target`` (a checkpoint from before ``targets`` has only
    that) as the one-element list, else the projected embedding."""
    if cfg.targets is not None and cfg.target is not None:
        raise ComneckError(f"`target` {cfg.target} and `targets` {cfg.targets} both given; put every target in "
                           "`targets`", params=("target", "targets"))
    tag = clip_tag(cfg)
    if cfg.targets is not None:
        return parse_targets(cfg.targets, cfg.clip_model, tag)
    term = _named_target((cfg.target or "pooled").strip(), cfg.clip_model, tag)
    return (WeightedTarget(term.target, 1.0, term.family),)


def stages_of(cfg: Any, scenario: str) -> tuple[Stage, ...]:
    """The scenario's three stages (:func:`default_stages`), with ``cfg.lr`` where given."""
    stages = default_stages(scenario, cfg.ce_dist, getattr(cfg, "recipe", None) or "paper")
    if getattr(cfg, "clip_from_mllm", None) is not None:  # no text tower: d1's cross-entropy stages have no steps
        stages = tuple(Stage(s.name, s.lr, 0.0, s.dist, s.joint) for s in stages)
    if cfg.lr is not None:
        stages = tuple(Stage(s.name, lr, s.ce, s.dist, s.joint) for s, lr in zip(stages, cfg.lr))
    return stages


def train_neck(cfg: NeckTrainConfig, on_progress: Progress | None = None) -> TrainResult:
    """Train (or resume) a transform-neck for a scenario; export the neck (and d2/d3's codec) and register them.

    ``on_progress(done, total)`` follows the steps of all three stages.
    """
    given = cfg.recipe
    state = _resolve(cfg)
    if state is None and cfg.neck_init is None and cfg.scenario != "d1":
        cfg.neck_init = d1_neck(cfg)
    if state is None and cfg.neck_init is not None:
        cfg.recipe = init_recipe(cfg.neck_init, given)
    return train(cfg, lambda runtime: NeckRun(cfg, runtime, state), on_progress)


def init_recipe(neck_init: Path, given: str | None) -> str:
    """The recipe of a run that starts from ``neck_init``: the neck's own (a file without one was trained with the
    paper's forms), since its tokens were learnt for that C'; ``given`` must agree with it."""
    from comneck_cli.models.neck import load_neck

    recipe = load_neck(neck_init)[1].recipe or "paper"
    if given is not None and given != recipe:
        raise MismatchError(f"neck {neck_init} was trained with the {recipe} recipe (its C' applies ln_post "
                            f"{'twice' if recipe == 'release' else 'once'}), not {given}; drop `recipe` to go on with "
                            f"{recipe}, or start from a neck of the {given} recipe", params=("recipe", "neck_init"))
    return recipe


def d1_neck(cfg: NeckTrainConfig) -> Path:
    """Where d2/d3 start their neck without ``neck_init``: the registry's d1 neck of the codec and quality (the
    paper: distillation alone does not move a neck trained from scratch, so d2/d3 fine-tune a d1 neck)."""
    from comneck_cli import hub
    from comneck_cli.features import neck_registry_name

    name = neck_registry_name(cfg.codec, cfg.quality)
    path = hub.find(name, "neck")
    if path is None:
        raise ModelFileError(
            f"scenario {cfg.scenario} starts its neck from a d1 neck (distillation alone does not train one from "
            f"scratch), and the registry has no {name}; train it first with `comneck train neck --scenario d1 "
            f"--codec {cfg.codec} -q {cfg.quality}`, or pass `neck_init` FILE", params=("neck_init",))
    return path


def load_training_clip(cfg: Any, device: torch.device) -> nn.Module:
    """The frozen CLIP teacher of ``cfg.clip_model``/``clip_tag``: weights from ``clip_weights``, else the registry
    entry of the model and tag, else open_clip's cache or download."""
    from comneck_cli.clip.tower import resolve_clip

    if getattr(cfg, "clip_from_mllm", None) is not None:
        from comneck_cli.mllm.model import training_tower

        return training_tower(cfg.clip_from_mllm).open_clip_model().to(device).eval().requires_grad_(False)
    # A random tower is drawn from the run's seed alone (not from wherever the run's random state has got to), so
    # that the seed its model files record (clip_record) rebuilds it.
    clip = resolve_clip(cfg.clip_model, clip_tag(cfg), cfg.clip_weights, device=device, seed=random_clip_seed(cfg))
    return clip.eval().requires_grad_(False)


def clip_tag(cfg: Any) -> str | None:
    """The open_clip weights tag, None for random weights (``clip_tag`` ``none``)."""
    from comneck_cli.clip.tower import open_clip_tag

    return open_clip_tag(cfg.clip_tag)


def random_clip_seed(cfg: Any) -> int | None:
    """``cfg.seed`` when the frozen tower has random weights from no file (``clip_tag`` none, no ``clip_weights``,
    no registry entry): :func:`load_training_clip` draws the tower from it (``clip.tower.random_clip``), so a model
    file that records it gets the same tower back where it is used; else None."""
    from comneck_cli import hub
    from comneck_cli.clip.tower import weights_entry_name

    if clip_tag(cfg) is not None or cfg.clip_weights is not None:
        return None
    return None if hub.find(weights_entry_name(cfg.clip_model, None), "clip") is not None else cfg.seed


def clip_record(cfg: Any) -> dict[str, Any]:
    """The frozen tower as every trained model file records it: ``clip_model``, ``clip_tag`` (``none`` for random
    weights, never "None") and ``clip_seed`` (:func:`random_clip_seed`), from which its user rebuilds the tower."""
    from comneck_cli.clip.tower import tag_name

    return {"clip_model": cfg.clip_model, "clip_tag": tag_name(cfg.clip_tag), "clip_seed": random_clip_seed(cfg)}


def default_templates(dataset: Any) -> tuple[str, ...]:
    """Prompts when none are given: open_clip's 80 OpenAI ImageNet templates for ImageNet classes (the authors'
    zero-shot weights), else ``DEFAULT_TEMPLATES``."""
    return imagenet_templates() if dataset.class_source.startswith("open_clip") else DEFAULT_TEMPLATES


class NeckRun(StagedRun):
    """The neck T (and in the joint stage of d2/d3 the codec) on C'(T(y_hat)) against C(x), stage by stage."""

    kind = "neck"

    def __init__(self, cfg: NeckTrainConfig, runtime: Runtime, state: dict[str, Any] | None):
        from comneck_cli.clip.tower import resolve_layer, split_clip
        from comneck_cli.features import neck_registry_name
        from comneck_cli.models.neck import EVERY_RATE, TransformNeck, load_neck

        self.cfg, self.runtime, self.state = cfg, runtime, state
        device = runtime.device
        name = f"{registry_name(cfg.codec, cfg.quality)}-neck-{cfg.scenario}"
        variable_rate = get_spec(cfg.codec).variable_rate
        if variable_rate and cfg.register == NeckTrainConfig.register:
            cfg.register = neck_registry_name(cfg.codec, EVERY_RATE)  # where `features` looks for any rate's records
        self.register = None if cfg.register is None else cfg.register.format(**_names(cfg))
        self.run_dir = Path(cfg.run_dir) if cfg.run_dir else default_run_dir(cfg.output, self.register or name)
        self.recipe = RECIPES[cfg.recipe]
        self.stages = stages_of(cfg, cfg.scenario)
        self.terms = targets_of(cfg)
        self.targets = [t.target for t in self.terms]
        needs_labels = any(s.ce > 0 for s in self.stages)
        self.batches = crop_batches(cfg, runtime, labelled=needs_labels,
                                    resize=self.recipe.resize if cfg.crops == "resize" else False)
        if cfg.templates is None:
            cfg.templates = default_templates(self.batches.dataset)
        self.prompts = (f"class names from {self.batches.dataset.class_source}, {len(cfg.templates)} prompt "
                        "template(s)" if needs_labels else None)
        self.lengths = stage_lengths(cfg, state, self.batches.per_epoch)
        self.bounds = tuple(sum(self.lengths[: i + 1]) for i in range(3))
        self.total = self.bounds[-1]
        check_length(state, self.total)

        # The codec: the human-perception codec to start from (frozen throughout d1).
        self.codec, self.model = load_frozen_codec(cfg.codec, cfg.quality or 1, cfg.codec_weights, state, device,
                                                   "codec_weights")
        self.rates = ((float(min(self.codec.spec.qualities)), float(max(self.codec.spec.qualities)))
                      if variable_rate else None)
        self.model_config = constructor_config(self.codec)

        ckpt.seed_everything(cfg.seed)
        clip = load_training_clip(cfg, device)
        # one C' for student and teacher, as in the authors' code (their target has ln_post twice too)
        head, self.tail = split_clip(clip, cfg.k, ln_post_twice=self.recipe.ln_post_twice)
        self.teacher = Teacher(clip, head, self.tail, self.targets, clamp=self.recipe.clamp_teacher).to(device)
        grid = (cfg.crop // 16, cfg.crop // 16)
        for term in self.terms:
            if term.target.hidden:  # a state inside C, or past the tower's end: say so before training starts
                resolve_layer(term.target.layer, self.tail.num_layers + 1, cfg.k)
            if term.target.select in TOKEN_SELECTS:
                size = self.teacher.size
                want = (size[0] // clip.visual.patch_size[0], size[1] // clip.visual.patch_size[1])
                if want != grid:
                    raise ComneckError(
                          f"distillation target {term.family or term.target} compares tokens, but the teacher has a "
                          f"{want[0]}×{want[1]} patch grid and the neck a {grid[0]}×{grid[1]} latent grid; use "
                          f"`crop` {want[0] * 16} or a pooled or cls target", params=("crop",))
        self.student_request = tail_request(self.targets, embedding=True)  # the embedding feeds the cross-entropy
        if cfg.neck_init is not None:
            self.neck, _ = load_neck(cfg.neck_init, device)
        else:
            width = cfg.neck_width or clip.visual.transformer.width
            heads = cfg.neck_heads or clip.visual.transformer.resblocks[0].attn.num_heads
            self.neck = TransformNeck(self.codec.latent_channels, width, heads, grid)
        self.neck.to(device).train()
        runtime.broadcast(self.neck)
        self.classes = (class_weights(clip, cfg.clip_model, self.batches.dataset.classes, cfg.templates,
                                      device=device) if needs_labels else None)
        self.logit_scale = clip.logit_scale.exp().float().item() if needs_labels else None

        # d3 leaves g_s out of training: it is not in the loss and stays as it was.
        self.trainable = [m for n, m in self.model.named_children() if not (cfg.scenario == "d3" and n == "g_s")]
        self.codec_net, self.codec_aux = [], []
        self.optimizer = torch.optim.Adam(self.neck.parameters(), lr=self.stages[0].lr, **ADAM)
        self.codec_opt = self.aux_opt = None
        if cfg.scenario != "d1":
            for module in self.trainable:
                module.requires_grad_(True)
            self.codec_net, self.codec_aux = split_parameters(self.model)
            self.model.requires_grad_(False)
            self.codec_opt = torch.optim.Adam(self.codec_net, lr=self.stages[1].lr, **ADAM)
            self.aux_opt = torch.optim.Adam(self.codec_aux, lr=cfg.aux_lr)
        self.current: int | None = None
        start = 0 if state is None else int(state["step"])
        self.codec_trained = start > self.bounds[0] and cfg.scenario != "d1"

    def saved(self) -> dict[str, Any]:
        saved = {"neck": self.neck, "optimizer": self.optimizer}
        if self.codec_opt is not None:
            saved.update(codec=self.model, codec_optimizer=self.codec_opt, aux_optimizer=self.aux_opt)
        return saved

    def plain(self) -> dict[str, Any]:
        return {"neck_config": self.neck.config, "stage_steps": list(self.lengths),
                "start_digest": self.codec.digest.hex()}

    def enter(self, index: int) -> None:
        """Set the stage's learning rate and whether the codec trains (and rebuild its tables after it has)."""
        stage = self.stages[index]
        for group in self.optimizer.param_groups:
            group["lr"] = stage.lr
        if stage.joint:
            self.model.train()
            for module in self.trainable:
                module.requires_grad_(True)
            for p in self.codec_aux:
                p.requires_grad_(True)
            for group in self.codec_opt.param_groups:
                group["lr"] = stage.lr
        else:
            self.model.eval().requires_grad_(False)
            if self.codec_trained:
                self.model.update(force=True)  # frozen again after joint training: fresh entropy tables

    def step(self, step: int, x: Tensor, labels: Tensor) -> dict[str, float]:
        cfg, runtime, model = self.cfg, self.runtime, self.model
        index = self.stage_index(step)
        if index != self.current:
            self.enter(index)
            self.current = index
        stage = self.stages[index]
        values: dict[str, float] = {}
        self.optimizer.zero_grad(set_to_none=True)
        if stage.joint:
            self.codec_opt.zero_grad(set_to_none=True)
            self.aux_opt.zero_grad(set_to_none=True)
        else:  # float32, outside autocast: exactly the y_hat the entropy coder writes
            # A variable-rate codec: each step the y_hat of a rate drawn over its whole range, so one neck
            # learns every rate (the gain is what Codec.code derives from the rate a record stores).
            gain = None if self.rates is None else rate_gain(model, rate_for_step(cfg.seed, step, *self.rates))
            y_hat = frozen_latents(model, self.codec.spec.family, x, gain)
        with runtime.autocast():
            teacher_out = self.teacher(x) if stage.dist > 0 or stage.joint else None
            if stage.joint:
                latents = latent_path(model, self.codec.spec.family, x, "ste")
                y_hat = latents.y_hat
                x_hat = model.g_s(y_hat) if cfg.scenario == "d2" else None
            features = self.tail(self.neck(y_hat), **self.student_request)
        loss = torch.zeros((), device=runtime.device)
        if stage.ce > 0:
            ce = zero_shot_cross_entropy(features.embedding, self.classes, self.logit_scale, labels,
                                         self.recipe.ce_form)
            loss = loss + stage.ce * ce
            values["ce"] = ce.item()
        if teacher_out is not None:
            dist, parts = weighted_distillation([select_target(features, t) for t in self.targets], teacher_out,
                                                [t.weight for t in self.terms])
            values["dist"] = dist.item()
            if len(parts) > 1:
                values.update({f"dist[{t}]": part.item() for t, part in zip(self.targets, parts)})
        if stage.joint:
            bpp = rate_bpp(latents.likelihoods, x.shape[0] * x.shape[2] * x.shape[3])
            mse = None if x_hat is None else F.mse_loss(x_hat.float(), x)
            loss = joint_loss(bpp, mse, dist, cfg.lmbda, cfg.gamma, cfg.beta)
            values["bpp"] = bpp.item()
            if mse is not None:
                values["mse"] = mse.item()
        elif stage.dist > 0:
            loss = loss + stage.dist * dist
        check_finite(loss, step + 1, stage.name)
        loss.backward()
        runtime.average_gradients(self.neck.parameters())
        self.optimizer.step()
        if stage.joint:
            values["aux"] = codec_step(runtime, model, self.codec_net, self.codec_opt, self.aux_opt,
                                       cfg.clip_max_norm)
            self.codec_trained = True
        values["loss"] = loss.item()
        return values

    def export(self, final: dict[str, float]) -> tuple[Path | None, str | None, dict[str, Any]]:
        """Write d2/d3's retrained codec first (the neck records its file's digest), then the neck."""
        from comneck_cli import weights as registry

        from comneck_cli.models.neck import EVERY_RATE, NeckInfo, save_neck

        cfg, codec, neck = self.cfg, self.codec, self.neck
        fmt = _names(cfg)
        machine_only = cfg.scenario == "d3"
        common = {"codec": cfg.codec, "quality": cfg.quality, "scenario": cfg.scenario, "lmbda": cfg.lmbda,
                  "data": str(Path(cfg.data).resolve()), "stage_steps": list(self.lengths), "final_losses": final,
                  "machine_only": machine_only, "crops": cfg.crops, "prompts": self.prompts, "recipe": cfg.recipe}
        codec_file, codec_entry, digest = None, None, codec.digest.hex()
        if cfg.scenario != "d1":
            model = codec.model.eval()
            codec_file = cfg.codec_output
            if codec_file is None and cfg.output is not None:
                codec_file = Path(cfg.output).with_name(f"{Path(cfg.output).stem}.codec.safetensors")
            what = ("machines only: R + λ·β·L_dist" if machine_only
                    else "people and machines: R + λ(γ·MSE + β·L_dist)")
            info = {**common, "trained_for": what, "gamma": 0.0 if machine_only else cfg.gamma, "beta": cfg.beta,
                    "config": self.model_config, "started_from": str(codec.source)}
            codec_file, codec_entry = publish(
                lambda path: write_codec(model, path, cfg.codec, cfg.quality, self.model_config,
                                         machine_only=machine_only),
                ".safetensors", codec_file, None if cfg.codec_register is None else cfg.codec_register.format(**fmt),
                "codec", info)
            digest = (codec_entry.sha256 if codec_entry else registry.file_sha256(codec_file))[:8]

        tower = clip_record(cfg)
        neck_info = NeckInfo(codec=cfg.codec, quality=cfg.quality or EVERY_RATE, codec_digest=digest, **tower,
                             k=cfg.k, scenario=cfg.scenario, config=dict(neck.config),
                             targets=",".join(f"{t.target}:{t.weight:g}" for t in self.terms), recipe=cfg.recipe)
        info = {**common, "codec_digest": digest, **tower, "k": cfg.k,
                "targets": [{"target": str(t.target), "weight": t.weight, "family": t.family} for t in self.terms],
                "trained_for": f"scenario {cfg.scenario}",
                "codec_weights": codec_entry.name if codec_entry else str(codec_file or codec.source)}
        output, entry = publish(lambda path: save_neck(neck.eval(), path, neck_info), ".safetensors", cfg.output,
                                self.register, "neck", info)
        return output, entry.name if entry else None, {
            "codec_output": codec_file, "codec_registered": codec_entry.name if codec_entry else None,
            "codec_digest": digest, "stage_steps": self.lengths, "prompts": self.prompts}


def _names(cfg: NeckTrainConfig) -> dict[str, Any]:
    """What registry-name templates may use."""
    suffix = "" if cfg.scenario == "d1" else f"-{cfg.scenario}"
    return {"codec": cfg.codec, "quality": cfg.quality, "scenario": cfg.scenario, "suffix": suffix}
