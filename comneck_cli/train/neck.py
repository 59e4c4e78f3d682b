"""``comneck train neck``: train the transform-neck T so that C'(T(y_hat)) stands in for C(x) (paper §3.4-3.5).

Scenarios (Table 1), each in three stages whose lengths (epochs or steps) are set per stage:

- **d1**, codec frozen (human perception kept). y_hat is exactly what the entropy coder writes
  (``latents.frozen_latents``). Progressive training (appendix A.1): (1) cross-entropy only, lr 1e-4;
  (2) cross-entropy + distillation weighted 1:100, lr 1e-5; (3) distillation only, lr 1e-5.
- **d2**, codec retrained for people and machines: (1) L_dist with the codec frozen; (2) joint training of
  codec and neck on R + λ(γ·MSE(x, x̂) + β·L_dist); (3) L_dist with the codec frozen again.
- **d3**, encoder retrained for machines only: as d2 with R + λ·β·L_dist (γ = 0, g_s unused and left as
  it was). Its codec and neck are marked machine-only (``NeckInfo.scenario == "d3"``; codec metadata
  ``machine_only = "true"``).

During joint training y_hat is rounded straight-through around the predicted means (the y_hat the coder
will write) and R comes from CompressAI's noisy proxy; the codec's net parameters take Adam with the stage's
lr and gradient-norm clipping at 1.0, the bottlenecks' quantiles their own Adam on ``aux_loss``.

Losses: L_dist = MSE(C'(T(y_hat)), C(x)) on the CLIP output the neck targets (default the projected image
embedding, as the authors' code does; ``--target patch:-2`` and the like pick a hidden state); the teacher
sees the crop resized to the CLIP's image size (bicubic) and normalised with its mean and std. The
cross-entropy is CLIP zero-shot classification: logit_scale × cosine(image embedding of C'(T(y_hat)),
class-name text embeddings from the prompt templates), against the folder's class.

The neck's optimizer is Adam, betas (0.9, 0.999), eps 1e-8, no weight decay, kept across stages (the
learning rate steps at stage boundaries).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..codecs import check_quality, get_spec, registry_name
from ..errors import ComneckError
from . import checkpoint as ckpt
from .codec import TrainResult, constructor_config, split_parameters
from .data import Batches, ImageFolderCrops, steps_for
from .export import publish, write_codec
from .latents import frozen_latents, latent_path, rate_bpp
from .losses import BETA, GAMMA, distillation, joint_loss, zero_shot_cross_entropy
from .loop import (Clock, Metrics, RunConfig, Runtime, check_finite, check_length, default_run_dir, resolve_run,
                   progress, serialise, setup_runtime, teardown)

DEFAULT_TEMPLATES = ("a photo of a {}.",)
ADAM = {"betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.0}


@dataclass(frozen=True)
class Stage:
    """One training stage: its learning rate, loss weights, and whether the codec trains (joint R-D loss)."""

    name: str
    lr: float
    ce: float = 0.0
    dist: float = 1.0
    joint: bool = False


def default_stages(scenario: str, ce_dist: tuple[float, float] = (1.0, 100.0)) -> tuple[Stage, ...]:
    """The paper's three stages for a scenario (learning rates of d2/d3 are not published: ours)."""
    if scenario == "d1":
        return (Stage("ce", 1e-4, ce=1.0, dist=0.0), Stage("ce+dist", 1e-5, ce=ce_dist[0], dist=ce_dist[1]),
                Stage("dist", 1e-5))
    return (Stage("dist", 1e-4), Stage("joint", 1e-4, joint=True), Stage("dist", 1e-5))


@dataclass(frozen=True)
class Target:
    """The CLIP output L_dist compares: ``pooled`` (projected image embedding) or SELECT:LAYER of a hidden state."""

    select: str = "pooled"
    layer: int = -1

    @classmethod
    def parse(cls, text: str) -> "Target":
        from ..clip import SELECTS

        select, _, layer = text.partition(":")
        if select not in SELECTS:
            raise ComneckError(
                f"unknown distillation target {text!r}; use pooled, or patch|cls|all:LAYER such as patch:-2"
            )
        try:
            return cls(select, int(layer) if layer else -1)
        except ValueError:
            raise ComneckError(
                f"distillation target {text!r} has a layer that is not a number; write e.g. patch:-2"
            ) from None

    def __str__(self) -> str:
        return "pooled" if self.select == "pooled" else f"{self.select}:{self.layer}"


@dataclass(kw_only=True)
class NeckTrainConfig(RunConfig):
    """What ``train_neck`` does; None means the default.

    ``steps``/``epochs`` and ``lr``: one value per stage (a single value applies to all three).
    ``codec_weights``: the (human-perception) codec to start from (default: the registry/zoo entry
    ``{codec}-q{quality}``). ``clip_tag`` ``"none"`` builds a randomly initialised CLIP (tests).
    ``register``: the neck's registry name; ``{suffix}`` is empty for d1 (``features`` finds
    ``{codec}-q{quality}-neck`` by default) and ``-d2``/``-d3`` otherwise, as those necks go with their own codec.
    ``codec_output``/``codec_register``: where the retrained codec of d2/d3 goes (default: beside ``output``
    as ``STEM.codec.safetensors``, and the registry as ``{codec}-q{quality}-{scenario}``).
    """

    codec: str | None = None
    quality: int | None = None
    scenario: str | None = None
    codec_weights: Path | None = None
    clip_model: str | None = None
    clip_tag: str | None = None
    clip_weights: Path | None = None
    k: int | None = None
    target: str | None = None
    templates: tuple[str, ...] | None = None
    steps: tuple[int, ...] | None = None
    epochs: tuple[int, ...] | None = None
    lr: tuple[float, ...] | None = None
    ce_dist: tuple[float, float] | None = None
    lmbda: float | None = None
    gamma: float | None = None
    beta: float | None = None
    aux_lr: float | None = None
    clip_max_norm: float | None = None
    neck_width: int | None = None
    neck_heads: int | None = None
    neck_init: Path | None = None
    register: str | None = "{codec}-q{quality}-neck{suffix}"
    codec_output: Path | None = None
    codec_register: str | None = "{codec}-q{quality}-{scenario}"


NECK_DEFAULTS = {"scenario": "d1", "clip_model": "ViT-L-14", "clip_tag": "openai", "k": 2, "target": "pooled",
                 "templates": DEFAULT_TEMPLATES,
                 "ce_dist": (1.0, 100.0), "gamma": GAMMA, "beta": BETA, "aux_lr": 1e-3, "clip_max_norm": 1.0,
                 "batch_size": 8, "crop": 256, "seed": 0}
TRAJECTORY = ("codec", "quality", "scenario", "codec_weights", "clip_model", "clip_tag", "clip_weights", "k",
              "target", "templates", "lr", "ce_dist", "lmbda", "gamma", "beta", "aux_lr", "clip_max_norm",
              "neck_width", "neck_heads", "neck_init", "batch_size", "crop", "seed", "classes")


def _per_stage(values: Sequence | None, what: str) -> tuple | None:
    if values is None:
        return None
    values = tuple(values)
    if len(values) == 1:
        return values * 3
    if len(values) != 3:
        raise ComneckError(f"{what} takes one value or three (one per stage), got {len(values)}")
    return values


def _resolve(cfg: NeckTrainConfig) -> dict[str, Any] | None:
    state = resolve_run(cfg, "neck", TRAJECTORY, NECK_DEFAULTS, "train neck")
    if cfg.scenario not in ("d1", "d2", "d3"):
        raise ComneckError(f"unknown scenario {cfg.scenario!r}; use d1, d2 or d3")
    cfg.lr = _per_stage(cfg.lr, "--lr")
    cfg.templates = tuple(cfg.templates)
    cfg.ce_dist = tuple(cfg.ce_dist)
    Target.parse(cfg.target)
    return state


def stages_of(cfg: NeckTrainConfig) -> tuple[Stage, ...]:
    stages = default_stages(cfg.scenario, cfg.ce_dist)
    if cfg.lr is not None:
        stages = tuple(Stage(s.name, lr, s.ce, s.dist, s.joint) for s, lr in zip(stages, cfg.lr))
    return stages


def train_neck(cfg: NeckTrainConfig) -> TrainResult:
    """Train (or resume) a transform-neck for a scenario; export the neck (and d2/d3's codec) and register them."""
    state = _resolve(cfg)
    spec = get_spec(cfg.codec)
    check_quality(spec, cfg.quality)
    runtime = setup_runtime(cfg.device)
    try:
        return _train(cfg, runtime, state)
    finally:
        teardown(runtime)


def load_training_clip(cfg: NeckTrainConfig, device: torch.device) -> nn.Module:
    """The frozen CLIP teacher: weights from ``clip_weights``, else the registry entry of the model and tag,
    else open_clip's cache or download."""
    import weights as registry

    from ..clip import load_clip, weights_entry_name

    tag = clip_tag(cfg)
    weights_file = cfg.clip_weights
    if weights_file is None and tag is not None and registry.lookup(weights_entry_name(cfg.clip_model, tag)):
        try:
            weights_file = registry.resolve(weights_entry_name(cfg.clip_model, tag))
        except registry.WeightsError as exc:
            raise ComneckError(str(exc)) from exc
    clip = load_clip(cfg.clip_model, tag, weights_file=weights_file, device=device)
    return clip.eval().requires_grad_(False)


def clip_tag(cfg: NeckTrainConfig) -> str | None:
    """The open_clip weights tag, None for random weights (``--clip-tag none``)."""
    return None if cfg.clip_tag is None or cfg.clip_tag.lower() == "none" else cfg.clip_tag


class Teacher(nn.Module):
    """C(x) on the uncompressed crop: resize to the CLIP's image size (bicubic), normalise, run the tower."""

    def __init__(self, clip: nn.Module, head: nn.Module, tail: nn.Module, target: Target):
        super().__init__()
        visual = clip.visual
        cfg = getattr(visual, "preprocess_cfg", {}) or {}
        from open_clip import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

        size = visual.image_size
        self.size = tuple(size) if isinstance(size, (tuple, list)) else (size, size)
        self.register_buffer("mean", torch.tensor(cfg.get("mean", OPENAI_DATASET_MEAN)).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(cfg.get("std", OPENAI_DATASET_STD)).view(1, 3, 1, 1))
        self.head, self.tail, self.target = head, tail, target

    def preprocess(self, x: Tensor) -> Tensor:
        if tuple(x.shape[-2:]) != self.size:
            x = F.interpolate(x, size=self.size, mode="bicubic", align_corners=False, antialias=True).clamp_(0, 1)
        return (x - self.mean) / self.std

    @torch.no_grad()
    def forward(self, x: Tensor) -> Tensor:
        return select_target(self.tail(self.head(self.preprocess(x)), layer=self.target.layer), self.target)


def select_target(features, target: Target) -> Tensor:
    return features.embedding if target.select == "pooled" else features.select(target.layer, target.select)


def text_embeddings(clip: nn.Module, model_name: str, classes: Sequence[str], templates: Sequence[str],
                    device: torch.device) -> Tensor:
    """Zero-shot class weights: per class, the mean of the normalised text embeddings over the templates."""
    import open_clip

    tokenizer = open_clip.get_tokenizer(model_name)
    rows = []
    with torch.no_grad():
        for name in classes:
            tokens = tokenizer([t.format(name) for t in templates]).to(device)
            emb = F.normalize(clip.encode_text(tokens).float(), dim=-1).mean(0)
            rows.append(F.normalize(emb, dim=-1))
    return torch.stack(rows)


def _train(cfg: NeckTrainConfig, runtime: Runtime, state: dict | None) -> TrainResult:
    from ..clip import split_clip
    from ..codecs import load_codec
    from ..neck import TransformNeck, load_neck

    device = runtime.device
    name = f"{registry_name(cfg.codec, cfg.quality)}-neck-{cfg.scenario}"
    register = None if cfg.register is None else cfg.register.format(**_names(cfg))
    run_dir = Path(cfg.run_dir) if cfg.run_dir else default_run_dir(cfg.output, register or name)
    stages_cfg = stages_of(cfg)
    target = Target.parse(cfg.target)
    needs_labels = any(s.ce > 0 for s in stages_cfg)
    dataset = ImageFolderCrops(cfg.data, cfg.crop, classes_file=cfg.classes, labelled=needs_labels)
    batches = Batches(dataset, cfg.batch_size, cfg.seed, runtime.rank, runtime.world, cfg.workers,
                      pin_memory=device.type == "cuda")
    if state is not None and cfg.steps is None and cfg.epochs is None:
        lengths = tuple(int(n) for n in state["stage_steps"])
    else:
        epochs, steps = _per_stage(cfg.epochs, "--epochs"), _per_stage(cfg.steps, "--steps")
        lengths = tuple(steps_for(None if epochs is None else epochs[i], None if steps is None else steps[i],
                                  batches.per_epoch, f"stage {i + 1}") for i in range(3))
    bounds = [sum(lengths[: i + 1]) for i in range(3)]
    total = bounds[-1]
    check_length(state, total)

    # The codec: the human-perception codec to start from (frozen throughout d1).
    codec = load_codec(cfg.codec, cfg.quality, weights=cfg.codec_weights)
    start_digest = codec.digest.hex()
    if state is not None and state["start_digest"] != start_digest:
        raise ComneckError(
            f"the codec weights {codec.source} (digest {start_digest}) are not the ones this run started from "
            f"({state['start_digest']}); pass the run's original codec with --codec-weights"
        )
    model = codec.model.to(device).eval().requires_grad_(False)
    model_config = constructor_config(codec)
    family = codec.spec.family

    ckpt.seed_everything(cfg.seed)
    clip = load_training_clip(cfg, device)
    head, tail = split_clip(clip, cfg.k)
    teacher = Teacher(clip, head, tail, target).to(device)
    grid = (cfg.crop // 16, cfg.crop // 16)
    if target.select in ("patch", "all"):
        want = (teacher.size[0] // clip.visual.patch_size[0], teacher.size[1] // clip.visual.patch_size[1])
        if want != grid:
            raise ComneckError(
                f"--target {target} compares tokens, but the teacher has a {want[0]}×{want[1]} patch grid and the "
                f"neck a {grid[0]}×{grid[1]} latent grid; use --crop {want[0] * 16} or --target pooled"
            )
    if cfg.neck_init is not None:
        neck, _ = load_neck(cfg.neck_init, device)
    else:
        width = cfg.neck_width or clip.visual.transformer.width
        heads = cfg.neck_heads or clip.visual.transformer.resblocks[0].attn.num_heads
        neck = TransformNeck(codec.latent_channels, width, heads, grid)
    neck.to(device).train()
    runtime.broadcast(neck)
    classes = text_embeddings(clip, cfg.clip_model, dataset.classes, cfg.templates, device) if needs_labels else None
    logit_scale = clip.logit_scale.exp().float().item()

    # d3 leaves g_s out of training: it is not in the loss and stays as it was.
    trainable = [m for n, m in model.named_children() if not (cfg.scenario == "d3" and n == "g_s")]
    codec_net, codec_aux = [], []
    optimizer = torch.optim.Adam(neck.parameters(), lr=stages_cfg[0].lr, **ADAM)
    codec_opt = aux_opt = None
    if cfg.scenario != "d1":
        for module in trainable:
            module.requires_grad_(True)
        codec_net, codec_aux = split_parameters(model)
        model.requires_grad_(False)
        codec_opt = torch.optim.Adam(codec_net, lr=stages_cfg[1].lr, **ADAM)
        aux_opt = torch.optim.Adam(codec_aux, lr=cfg.aux_lr)

    start, clock = 0, Clock()
    final: dict[str, float] = {}
    if state is not None:
        neck.load_state_dict(state["neck"])
        optimizer.load_state_dict(state["optimizer"])
        if codec_opt is not None:
            model.load_state_dict(state["codec"])
            codec_opt.load_state_dict(state["codec_optimizer"])
            aux_opt.load_state_dict(state["aux_optimizer"])
        start, clock, final = int(state["step"]), Clock(float(state["seconds"])), dict(state.get("final", {}))
        rngs = state["rng"]
        ckpt.restore_rng(rngs[runtime.rank] if len(rngs) == runtime.world else rngs[0])
    elif runtime.rank:
        torch.manual_seed(cfg.seed + runtime.rank)

    metrics = Metrics(run_dir / "metrics.jsonl", runtime.main, None if state is None else start)
    totals: dict[str, float] = {}
    counted = 0
    current: int | None = None
    codec_trained = state is not None and start > bounds[0] and cfg.scenario != "d1"

    def enter(index: int) -> None:
        """Set the stage's learning rate and whether the codec trains (and rebuild its tables after it has)."""
        stage = stages_cfg[index]
        for group in optimizer.param_groups:
            group["lr"] = stage.lr
        if stage.joint:
            model.train()
            for module in trainable:
                module.requires_grad_(True)
            for p in codec_aux:
                p.requires_grad_(True)
            for group in codec_opt.param_groups:
                group["lr"] = stage.lr
        else:
            model.eval().requires_grad_(False)
            if codec_trained:
                model.update(force=True)  # frozen again after joint training: fresh entropy tables

    def save_checkpoint(step: int) -> None:
        rngs = runtime.gather(ckpt.capture_rng())
        if runtime.main:
            payload = {
                "kind": "neck", "config": serialise(cfg), "neck": neck.state_dict(), "neck_config": neck.config,
                "optimizer": optimizer.state_dict(), "step": step, "stage_steps": list(lengths), "rng": rngs,
                "seconds": clock.seconds(), "world": runtime.world, "final": final, "start_digest": start_digest,
            }
            if codec_opt is not None:
                payload.update(codec=model.state_dict(), codec_optimizer=codec_opt.state_dict(),
                               aux_optimizer=aux_opt.state_dict())
            ckpt.save(run_dir / "checkpoint.pt", payload)

    with progress(total, start, f"train neck {cfg.scenario}", runtime.main and not cfg.quiet) as advance:
        for step, x, labels in batches.iterate(start, total):
            index = next(i for i, b in enumerate(bounds) if step < b)
            if index != current:
                enter(index)
                current = index
            stage = stages_cfg[index]
            x, labels = x.to(device, non_blocking=True), labels.to(device, non_blocking=True)
            values: dict[str, float] = {}
            optimizer.zero_grad(set_to_none=True)
            if stage.joint:
                codec_opt.zero_grad(set_to_none=True)
                aux_opt.zero_grad(set_to_none=True)
            if not stage.joint:  # float32, outside autocast: exactly the y_hat the entropy coder writes
                y_hat = frozen_latents(model, family, x)
            with runtime.autocast():
                teacher_out = teacher(x) if stage.dist > 0 or stage.joint else None
                if stage.joint:
                    latents = latent_path(model, family, x, "ste")
                    y_hat = latents.y_hat
                    x_hat = model.g_s(y_hat) if cfg.scenario == "d2" else None
                features = tail(neck(y_hat), layer=-1 if target.select == "pooled" else target.layer)
            loss = torch.zeros((), device=device)
            if stage.ce > 0:
                ce = zero_shot_cross_entropy(features.embedding, classes, logit_scale, labels)
                loss = loss + stage.ce * ce
                values["ce"] = ce.item()
            if teacher_out is not None:
                dist = distillation(select_target(features, target), teacher_out)
                values["dist"] = dist.item()
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
            runtime.average_gradients(neck.parameters())
            optimizer.step()
            if stage.joint:
                runtime.average_gradients(codec_net)
                if cfg.clip_max_norm > 0:
                    torch.nn.utils.clip_grad_norm_(codec_net, cfg.clip_max_norm)
                codec_opt.step()
                aux_loss = model.aux_loss()
                aux_loss.backward()
                aux_opt.step()
                values["aux"] = aux_loss.item()
                codec_trained = True
            values["loss"] = loss.item()

            for key, value in values.items():
                totals[key] = totals.get(key, 0.0) + value
            counted += 1
            done = step + 1
            advance(stage=stage.name, loss=values["loss"])
            if done % cfg.log_every == 0 or done in bounds:
                final = {k: v / counted for k, v in totals.items()}
                metrics.log({"step": done, "stage": stage.name, **final, "lr": stage.lr,
                             "seconds": round(clock.seconds(), 3)})
                totals, counted = {}, 0
            if done % cfg.checkpoint_every == 0 and done < total:
                save_checkpoint(done)
    save_checkpoint(total)

    exported: dict[str, Any] = {"codec_output": None, "codec_registered": None, "codec_digest": start_digest}
    output = registered = None
    if runtime.main:
        output, registered, exported = _export(cfg, neck, codec, model_config, target, lengths, final)
    runtime.barrier()
    return TrainResult(output=output, registered=registered, run_dir=run_dir, steps=total, final=final,
                       extra={**exported, "stage_steps": lengths})


def _names(cfg: NeckTrainConfig) -> dict[str, Any]:
    """What registry-name templates may use."""
    suffix = "" if cfg.scenario == "d1" else f"-{cfg.scenario}"
    return {"codec": cfg.codec, "quality": cfg.quality, "scenario": cfg.scenario, "suffix": suffix}


def _export(cfg: NeckTrainConfig, neck: nn.Module, codec, model_config: dict[str, Any], target: Target,
            lengths: tuple[int, ...], final: dict[str, float]) -> tuple[Path | None, str | None, dict[str, Any]]:
    """Write d2/d3's retrained codec first (the neck records its file's digest), then the neck."""
    import weights as registry

    from ..neck import NeckInfo, save_neck

    fmt = _names(cfg)
    machine_only = cfg.scenario == "d3"
    common = {"codec": cfg.codec, "quality": cfg.quality, "scenario": cfg.scenario, "lmbda": cfg.lmbda,
              "data": str(Path(cfg.data).resolve()), "stage_steps": list(lengths), "final_losses": final,
              "machine_only": machine_only}
    codec_file, codec_entry, digest = None, None, codec.digest.hex()
    if cfg.scenario != "d1":
        model = codec.model.eval()
        codec_file = cfg.codec_output
        if codec_file is None and cfg.output is not None:
            codec_file = Path(cfg.output).with_name(f"{Path(cfg.output).stem}.codec.safetensors")
        what = ("machines only: R + λ·β·L_dist" if machine_only
                else "people and machines: R + λ(γ·MSE + β·L_dist)")
        info = {**common, "trained_for": what, "gamma": 0.0 if machine_only else cfg.gamma, "beta": cfg.beta,
                "config": model_config, "started_from": str(codec.source)}
        codec_file, codec_entry = publish(
            lambda path: write_codec(model, path, cfg.codec, cfg.quality, model_config, machine_only=machine_only),
            ".safetensors", codec_file, None if cfg.codec_register is None else cfg.codec_register.format(**fmt),
            "codec", info)
        digest = (codec_entry.sha256 if codec_entry else registry.file_sha256(codec_file))[:8]

    tag = str(clip_tag(cfg))
    neck_info = NeckInfo(codec=cfg.codec, quality=cfg.quality, codec_digest=digest, clip_model=cfg.clip_model,
                         clip_tag=tag, k=cfg.k, scenario=cfg.scenario, config=dict(neck.config))
    info = {**common, "codec_digest": digest, "clip_model": cfg.clip_model, "clip_tag": tag, "k": cfg.k,
            "target": str(target), "trained_for": f"scenario {cfg.scenario}",
            "codec_weights": codec_entry.name if codec_entry else str(codec_file or codec.source)}
    output, entry = publish(lambda path: save_neck(neck.eval(), path, neck_info), ".safetensors", cfg.output,
                            None if cfg.register is None else cfg.register.format(**fmt), "neck", info)
    return output, entry.name if entry else None, {
        "codec_output": codec_file, "codec_registered": codec_entry.name if codec_entry else None,
        "codec_digest": digest}
