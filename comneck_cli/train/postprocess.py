"""``comneck train postprocess``: the *Post-processing* baseline (paper §4.1), a U-Net trained so that the full
CLIP tower C sees in the codec's reconstruction what it sees in the original.

    x -> frozen codec -> x_hat = g_s(y_hat) -> U-Net -> C  ~  C(x)

The codec is frozen: y_hat is exactly what the entropy coder writes (``latents.frozen_latents``) and x_hat is
clamped to [0, 1] and rounded to 8 bits, the image ``decode`` writes and ``eval``'s ``postprocess`` method
feeds the U-Net. C is frozen too; only the U-Net (:class:`comneck_cli.eval.postprocess.UNet`) trains.

The loss is the d1 neck's (``train.neck``), with the U-Net's output through the whole tower in place of
C'(T(y_hat)): three stages whose lengths (epochs or steps) are set per stage, (1) zero-shot cross-entropy
against the folder's class, lr 1e-4; (2) cross-entropy + distillation weighted 1:100, lr 1e-5;
(3) distillation only, lr 1e-5. L_dist = MSE(C(U(x_hat)), C(x)) on the same ``--target`` as the neck's
(default the projected image embedding), both images resized to the CLIP's input size and normalised the same
way (``neck.Teacher``). Adam (betas 0.9, 0.999), kept across stages; the learning rate steps at stage boundaries.

The U-Net is exported with ``save_postprocess`` (its ``PostprocessInfo`` records the codec, quality, codec
weights' digest and the CLIP) and registered as kind ``postprocess`` under ``{codec}-q{quality}-postprocess``,
where ``comneck eval --methods postprocess`` finds it without ``--postprocess``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from comneck_cli.codecs import check_quality, get_spec
from comneck_cli.errors import ComneckError
from comneck_cli.train import checkpoint as ckpt
from comneck_cli.train.codec import TrainResult
from comneck_cli.train.export import publish
from comneck_cli.train.latents import frozen_latents
from comneck_cli.train.losses import distillation, zero_shot_cross_entropy
from comneck_cli.train.loop import (Clock, Means, Metrics, RunConfig, Runtime, check_finite, check_length, crop_batches,
                   default_run_dir, progress, resolve_run, serialise, setup_runtime, teardown)
from comneck_cli.train.neck import (ADAM, DEFAULT_TEMPLATES, Stage, Target, Teacher, clip_tag, default_stages, load_frozen_codec,
                   load_training_clip,
                   per_stage, select_target, stage_lengths, text_embeddings)


@dataclass(kw_only=True)
class PostprocessTrainConfig(RunConfig):
    """What ``train_postprocess`` does; None means the default (``POSTPROCESS_DEFAULTS``).

    ``weights``: the frozen codec whose reconstructions the U-Net reads (default: the registry/zoo entry
    ``{codec}-q{quality}``, as ``eval`` takes it). ``steps``/``epochs`` and ``lr``: one value per stage (a single
    value applies to all three). ``clip_tag`` ``"none"`` builds a randomly initialised CLIP (tests).
    ``base``/``depth``: the U-Net's first width and number of levels (64 and 4: the paper's 31.04 M parameters).
    """

    codec: str | None = None
    quality: int | None = None
    weights: Path | None = None
    clip_model: str | None = None
    clip_tag: str | None = None
    clip_weights: Path | None = None
    target: str | None = None
    templates: tuple[str, ...] | None = None
    steps: tuple[int, ...] | None = None
    epochs: tuple[int, ...] | None = None
    lr: tuple[float, ...] | None = None
    ce_dist: tuple[float, float] | None = None
    base: int | None = None
    depth: int | None = None
    register: str | None = "{codec}-q{quality}-postprocess"

    lmbda: ClassVar[float] = 0.0  # no rate term here; ``resolve_run`` fills λ only where it is None


POSTPROCESS_DEFAULTS = {"clip_model": "ViT-L-14", "clip_tag": "openai", "target": "pooled",
                        "templates": DEFAULT_TEMPLATES, "ce_dist": (1.0, 100.0), "base": 64, "depth": 4,
                        "batch_size": 8, "crop": 256, "seed": 0}
TRAJECTORY = ("codec", "quality", "weights", "clip_model", "clip_tag", "clip_weights", "target", "templates", "lr",
              "ce_dist", "base", "depth", "batch_size", "crop", "seed", "classes")


def _resolve(cfg: PostprocessTrainConfig) -> dict[str, Any] | None:
    state = resolve_run(cfg, "postprocess", TRAJECTORY, POSTPROCESS_DEFAULTS, "train postprocess")
    cfg.lr = per_stage(cfg.lr, "--lr")
    cfg.templates = tuple(cfg.templates)
    cfg.ce_dist = tuple(cfg.ce_dist)
    if len(cfg.ce_dist) != 2:
        raise ComneckError(f"--ce-dist takes two weights (cross-entropy:distillation, e.g. 1:100), got {cfg.ce_dist}")
    if cfg.base < 1 or cfg.depth < 1:
        raise ComneckError(f"the U-Net's --base {cfg.base} and --depth {cfg.depth} must be positive")
    Target.parse(cfg.target)
    return state


def stages_of(cfg: PostprocessTrainConfig) -> tuple[Stage, ...]:
    """d1's three stages (cross-entropy; cross-entropy + distillation; distillation), with ``lr`` if given."""
    stages = default_stages("d1", cfg.ce_dist)
    if cfg.lr is not None:
        stages = tuple(Stage(s.name, lr, s.ce, s.dist, s.joint) for s, lr in zip(stages, cfg.lr))
    return stages


def train_postprocess(cfg: PostprocessTrainConfig) -> TrainResult:
    """Train (or resume) the post-processing U-Net for a codec and quality; export and register it."""
    state = _resolve(cfg)
    check_quality(get_spec(cfg.codec), cfg.quality)
    runtime = setup_runtime(cfg.device, cfg.precision)
    try:
        return _train(cfg, runtime, state)
    finally:
        teardown(runtime)


@torch.no_grad()
def reconstruct(model: nn.Module, family, x: Tensor) -> Tensor:
    """x_hat as ``decode`` writes it: g_s of the y_hat the coder writes, clamped to [0, 1], rounded to 8 bits."""
    x_hat = model.g_s(frozen_latents(model, family, x)).float().clamp_(0, 1)
    return x_hat.mul_(255).round_().div_(255)


def _train(cfg: PostprocessTrainConfig, runtime: Runtime, state: dict | None) -> TrainResult:
    from comneck_cli.clip.tower import split_clip
    from comneck_cli.eval.postprocess import UNet, postprocess_registry_name

    device = runtime.device
    register = None if cfg.register is None else cfg.register.format(codec=cfg.codec, quality=cfg.quality)
    run_dir = Path(cfg.run_dir) if cfg.run_dir else default_run_dir(
        cfg.output, register or postprocess_registry_name(cfg.codec, cfg.quality))
    stages = stages_of(cfg)
    target = Target.parse(cfg.target)
    resumed_lengths = state is not None and cfg.steps is None and cfg.epochs is None
    epochs, steps = per_stage(cfg.epochs, "--epochs"), per_stage(cfg.steps, "--steps")
    sizes = tuple(state["stage_steps"]) if resumed_lengths else steps or epochs or (1, 1, 1)
    needs_labels = any(s.ce > 0 and n > 0 for s, n in zip(stages, sizes))  # a stage of length 0 does not run
    batches = crop_batches(cfg, runtime, labelled=needs_labels)
    lengths = stage_lengths(cfg, state, batches.per_epoch)
    bounds = [sum(lengths[: i + 1]) for i in range(3)]
    total = bounds[-1]
    check_length(state, total)

    codec, model = load_frozen_codec(cfg.codec, cfg.quality, cfg.weights, state, device, "--weights")
    digest = codec.digest.hex()
    family = codec.spec.family

    ckpt.seed_everything(cfg.seed)
    clip = load_training_clip(cfg, device)
    head, tail = split_clip(clip, 0)  # the whole tower: C(x) for the teacher and for the U-Net's output
    preprocess = Teacher(clip, head, tail, target).to(device).preprocess  # resize to C's input, normalise
    unet = UNet(base=cfg.base, depth=cfg.depth).to(device).train()
    runtime.broadcast(unet)
    classes = (text_embeddings(clip, cfg.clip_model, batches.dataset.classes, cfg.templates, device)
               if needs_labels else None)
    logit_scale = clip.logit_scale.exp().float().item()
    optimizer = torch.optim.Adam(unet.parameters(), lr=stages[0].lr, **ADAM)

    start, clock = 0, Clock()
    final: dict[str, float] = {}
    if state is not None:
        unet.load_state_dict(state["unet"])
        optimizer.load_state_dict(state["optimizer"])
        start, clock, final = int(state["step"]), Clock(float(state["seconds"])), dict(state.get("final", {}))
        ckpt.restore_rng(runtime.own(state["rng"]))
    elif runtime.rank:
        torch.manual_seed(cfg.seed + runtime.rank)

    metrics = Metrics(run_dir / "metrics.jsonl", runtime.main, None if state is None else start)
    means = Means()

    def save_checkpoint(step: int) -> None:
        rngs = runtime.gather(ckpt.capture_rng())
        if runtime.main:
            ckpt.save(run_dir / "checkpoint.pt", {
                "kind": "postprocess", "config": serialise(cfg), "unet": unet.state_dict(),
                "unet_config": dict(unet.config), "optimizer": optimizer.state_dict(), "step": step,
                "stage_steps": list(lengths), "rng": rngs, "seconds": clock.seconds(), "world": runtime.world,
                "final": final, "start_digest": digest,
            })

    hidden = target.select not in ("pooled", "projected")

    def tower(images: Tensor):
        """C on normalised images: the target's state, the pooled embedding (cross-entropy), projected tokens."""
        return tail(head(images), layer=target.layer if hidden else -1, embedding=True,
                    projected=target.select == "projected")

    with progress(total, start, f"train postprocess {cfg.codec} q{cfg.quality}",
                  runtime.main and not cfg.quiet) as advance:
        for step, x, labels in batches.iterate(start, total):
            index = next(i for i, b in enumerate(bounds) if step < b)
            stage = stages[index]
            for group in optimizer.param_groups:
                group["lr"] = stage.lr
            x, labels = x.to(device, non_blocking=True), labels.to(device, non_blocking=True)
            x_hat = reconstruct(model, family, x)  # float32, outside autocast: the image eval decodes
            optimizer.zero_grad(set_to_none=True)
            values: dict[str, float] = {}
            with runtime.autocast():
                if stage.dist > 0:
                    with torch.no_grad():
                        teacher_out = select_target(tower(preprocess(x)), target)
                features = tower(preprocess(unet(x_hat)))
            loss = torch.zeros((), device=device)
            if stage.ce > 0:
                ce = zero_shot_cross_entropy(features.embedding, classes, logit_scale, labels)
                loss = loss + stage.ce * ce
                values["ce"] = ce.item()
            if stage.dist > 0:
                dist = distillation(select_target(features, target), teacher_out)
                loss = loss + stage.dist * dist
                values["dist"] = dist.item()
            check_finite(loss, step + 1, stage.name)
            loss.backward()
            runtime.average_gradients(unet.parameters())
            optimizer.step()
            values["loss"] = loss.item()

            means.add(values)
            done = step + 1
            advance(stage=stage.name, loss=values["loss"])
            if done % cfg.log_every == 0 or done in bounds:
                final = means.take()
                metrics.log({"step": done, "stage": stage.name, **final, "lr": stage.lr,
                             "seconds": round(clock.seconds(), 3)})
            if done % cfg.checkpoint_every == 0 and done < total:
                save_checkpoint(done)
    save_checkpoint(total)

    output = registered = None
    if runtime.main:
        output, registered = _export(cfg, unet, codec, target, lengths, final, register)
    runtime.barrier()
    return TrainResult(output=output, registered=registered, run_dir=run_dir, steps=total, final=final,
                       extra={"codec_digest": digest, "stage_steps": lengths})


def _export(cfg: PostprocessTrainConfig, unet: nn.Module, codec, target: Target, lengths: tuple[int, ...],
            final: dict[str, float], register: str | None) -> tuple[Path | None, str | None]:
    from comneck_cli.eval.postprocess import PostprocessInfo, save_postprocess

    tag = str(clip_tag(cfg))
    digest = codec.digest.hex()
    post_info = PostprocessInfo(codec=cfg.codec, quality=cfg.quality, codec_digest=digest,
                                clip_model=cfg.clip_model, clip_tag=tag, config=dict(unet.config))
    info = {"codec": cfg.codec, "quality": cfg.quality, "codec_digest": digest, "codec_weights": str(codec.source),
            "clip_model": cfg.clip_model, "clip_tag": tag, "target": str(target), "config": dict(unet.config),
            "trained_for": "post-processing: x_hat -> U-Net -> C, the paper's baseline (§4.1)",
            "data": str(Path(cfg.data).resolve()), "stage_steps": list(lengths), "final_losses": final}
    output, entry = publish(lambda path: save_postprocess(unet.eval(), path, post_info), ".safetensors", cfg.output,
                            register, "postprocess", info)
    return output, entry.name if entry else None
