"""``comneck train postprocess``: the *Post-processing* baseline (paper §4.1), a U-Net trained so that the full
CLIP tower C sees in the codec's reconstruction what it sees in the original.

    x -> frozen codec -> x_hat = g_s(y_hat) -> U-Net -> C  ~  C(x)

The codec is frozen: y_hat is exactly what the entropy coder writes (``latents.frozen_latents``) and x_hat is
clamped to [0, 1] and rounded to 8 bits, the image ``decode`` writes and ``eval``'s ``postprocess`` method
feeds the U-Net. C is frozen too; only the U-Net (:class:`comneck_cli.models.unet.UNet`) trains.

The loss is the d1 neck's (``train.neck``), with the U-Net's output through the whole tower in place of
C'(T(y_hat)): three stages whose lengths (epochs or steps) are set per stage, (1) zero-shot cross-entropy
against the folder's class, lr 1e-4; (2) cross-entropy + distillation weighted 1:100, lr 1e-5;
(3) distillation only, lr 1e-5. L_dist = MSE(C(U(x_hat)), C(x)) on the same ``target`` as the neck's
(default the projected image embedding), both images resized to the CLIP's input size and normalised the same
way (``clip.teacher.Teacher``).
Adam (betas 0.9, 0.999), kept across stages; the learning rate steps at stage boundaries.

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

from comneck_cli.clip.teacher import Target, Teacher, select_target
from comneck_cli.clip.zeroshot import DEFAULT_TEMPLATES, class_weights
from comneck_cli.codecs import check_quality, get_spec
from comneck_cli.errors import ComneckError
from comneck_cli.train import checkpoint as ckpt
from comneck_cli.train.config import ClipRunConfig, resolve_run, setting
from comneck_cli.train.export import publish
from comneck_cli.train.latents import frozen_latents
from comneck_cli.train.loop import Runtime, check_finite, check_length, crop_batches, default_run_dir
from comneck_cli.train.losses import distillation, zero_shot_cross_entropy
from comneck_cli.train.neck import (ADAM, clip_record, load_frozen_codec, load_training_clip, per_stage, stage_lengths,
                                    stages_of)
from comneck_cli.train.trainer import Progress, StagedRun, TrainResult, train


@dataclass(kw_only=True)
class PostprocessTrainConfig(ClipRunConfig):
    """What ``train_postprocess`` does; None means the setting's default.

    ``weights``: the frozen codec whose reconstructions the U-Net reads (default: the registry/zoo entry
    ``{codec}-q{quality}``, as ``eval`` takes it). ``steps``/``epochs`` and ``lr``: one value per stage (a single
    value applies to all three).
    ``base``/``depth``: the U-Net's first width and number of levels (64 and 4: the paper's 31.04 M parameters).
    """

    classes: Path | None = setting()  # the cross-entropy's class names are part of what is learnt
    codec: str | None = setting()
    quality: int | None = setting()
    weights: Path | None = setting()
    target: str | None = setting("pooled")
    templates: tuple[str, ...] | None = setting(DEFAULT_TEMPLATES)
    steps: tuple[int, ...] | None = setting(trajectory=False)
    epochs: tuple[int, ...] | None = setting(trajectory=False)
    lr: tuple[float, ...] | None = setting()
    ce_dist: tuple[float, float] | None = setting((1.0, 100.0))
    base: int | None = setting(64)
    depth: int | None = setting(4)
    register: str | None = "{codec}-q{quality}-postprocess"

    lmbda: ClassVar[float] = 0.0  # no rate term here; ``resolve_run`` fills λ only where it is None


def _resolve(cfg: PostprocessTrainConfig) -> dict[str, Any] | None:
    state = resolve_run(cfg, "postprocess", "train postprocess")
    cfg.lr = per_stage(cfg.lr, "lr")
    cfg.templates = tuple(cfg.templates)
    cfg.ce_dist = tuple(cfg.ce_dist)
    if len(cfg.ce_dist) != 2:
        raise ComneckError(f"`ce_dist` takes two weights (cross-entropy:distillation, e.g. 1:100), got {cfg.ce_dist}",
                           params=("ce_dist",))
    if cfg.base < 1 or cfg.depth < 1:
        raise ComneckError(f"the U-Net's `base` {cfg.base} and `depth` {cfg.depth} must be positive",
                           params=("base", "depth"))
    Target.parse(cfg.target)
    check_quality(get_spec(cfg.codec), cfg.quality)
    return state


def train_postprocess(cfg: PostprocessTrainConfig, on_progress: Progress | None = None) -> TrainResult:
    """Train (or resume) the post-processing U-Net for a codec and quality; export and register it.

    ``on_progress(done, total)`` follows the steps of all three stages.
    """
    state = _resolve(cfg)
    return train(cfg, lambda runtime: PostprocessRun(cfg, runtime, state), on_progress)


@torch.no_grad()
def reconstruct(model: nn.Module, family, x: Tensor) -> Tensor:
    """x_hat as ``decode`` writes it: g_s of the y_hat the coder writes, clamped to [0, 1], rounded to 8 bits."""
    x_hat = model.g_s(frozen_latents(model, family, x)).float().clamp_(0, 1)
    return x_hat.mul_(255).round_().div_(255)


class PostprocessRun(StagedRun):
    """The U-Net on C(U(x_hat)) against C(x), in d1's three stages."""

    kind = "postprocess"

    def __init__(self, cfg: PostprocessTrainConfig, runtime: Runtime, state: dict[str, Any] | None):
        from comneck_cli.clip.tower import split_clip
        from comneck_cli.models.unet import UNet, postprocess_registry_name

        self.cfg, self.runtime, self.state = cfg, runtime, state
        device = runtime.device
        self.register = None if cfg.register is None else cfg.register.format(codec=cfg.codec, quality=cfg.quality)
        self.run_dir = Path(cfg.run_dir) if cfg.run_dir else default_run_dir(
            cfg.output, self.register or postprocess_registry_name(cfg.codec, cfg.quality))
        self.stages = stages_of(cfg, "d1")
        self.target = Target.parse(cfg.target)
        resumed_lengths = state is not None and cfg.steps is None and cfg.epochs is None
        epochs, steps = per_stage(cfg.epochs, "epochs"), per_stage(cfg.steps, "steps")
        sizes = tuple(state["stage_steps"]) if resumed_lengths else steps or epochs or (1, 1, 1)
        needs_labels = any(s.ce > 0 and n > 0 for s, n in zip(self.stages, sizes))  # a 0-step stage does not run
        self.batches = crop_batches(cfg, runtime, labelled=needs_labels)
        self.lengths = stage_lengths(cfg, state, self.batches.per_epoch)
        self.bounds = tuple(sum(self.lengths[: i + 1]) for i in range(3))
        self.total = self.bounds[-1]
        check_length(state, self.total)

        self.codec, self.model = load_frozen_codec(cfg.codec, cfg.quality, cfg.weights, state, device, "weights")

        ckpt.seed_everything(cfg.seed)
        clip = load_training_clip(cfg, device)
        self.head, self.tail = split_clip(clip, 0)  # the whole tower: C(x) for the teacher and the U-Net's output
        self.preprocess = Teacher(clip, self.head, self.tail, self.target).to(device).preprocess
        self.unet = UNet(base=cfg.base, depth=cfg.depth).to(device).train()
        runtime.broadcast(self.unet)
        self.classes = (class_weights(clip, cfg.clip_model, self.batches.dataset.classes, cfg.templates,
                                      device=device) if needs_labels else None)
        self.logit_scale = clip.logit_scale.exp().float().item()
        self.optimizer = torch.optim.Adam(self.unet.parameters(), lr=self.stages[0].lr, **ADAM)

    def saved(self) -> dict[str, Any]:
        return {"unet": self.unet, "optimizer": self.optimizer}

    def plain(self) -> dict[str, Any]:
        return {"unet_config": dict(self.unet.config), "stage_steps": list(self.lengths),
                "start_digest": self.codec.digest.hex()}

    def tower(self, images: Tensor):
        """C on normalised images: the target's state, the pooled embedding (cross-entropy), projected tokens."""
        hidden = self.target.hidden
        return self.tail(self.head(images), layer=self.target.layer if hidden else -1, embedding=True,
                         projected=self.target.select == "projected")

    def step(self, step: int, x: Tensor, labels: Tensor) -> dict[str, float]:
        stage = self.stages[self.stage_index(step)]
        for group in self.optimizer.param_groups:
            group["lr"] = stage.lr
        x_hat = reconstruct(self.model, self.codec.spec.family, x)  # float32, outside autocast: what eval decodes
        self.optimizer.zero_grad(set_to_none=True)
        values: dict[str, float] = {}
        with self.runtime.autocast():
            if stage.dist > 0:
                with torch.no_grad():
                    teacher_out = select_target(self.tower(self.preprocess(x)), self.target)
            features = self.tower(self.preprocess(self.unet(x_hat)))
        loss = torch.zeros((), device=self.runtime.device)
        if stage.ce > 0:
            ce = zero_shot_cross_entropy(features.embedding, self.classes, self.logit_scale, labels)
            loss = loss + stage.ce * ce
            values["ce"] = ce.item()
        if stage.dist > 0:
            dist = distillation(select_target(features, self.target), teacher_out)
            loss = loss + stage.dist * dist
            values["dist"] = dist.item()
        check_finite(loss, step + 1, stage.name)
        loss.backward()
        self.runtime.average_gradients(self.unet.parameters())
        self.optimizer.step()
        values["loss"] = loss.item()
        return values

    def export(self, final: dict[str, float]) -> tuple[Path | None, str | None, dict[str, Any]]:
        from comneck_cli.models.unet import PostprocessInfo, save_postprocess

        cfg, unet = self.cfg, self.unet
        tower = clip_record(cfg)
        digest = self.codec.digest.hex()
        post_info = PostprocessInfo(codec=cfg.codec, quality=cfg.quality, codec_digest=digest, **tower,
                                    config=dict(unet.config))
        info = {"codec": cfg.codec, "quality": cfg.quality, "codec_digest": digest,
                "codec_weights": str(self.codec.source), **tower,
                "target": str(self.target), "config": dict(unet.config),
                "trained_for": "post-processing: x_hat -> U-Net -> C, the paper's baseline (§4.1)",
                "data": str(Path(cfg.data).resolve()), "stage_steps": list(self.lengths), "final_losses": final}
        output, entry = publish(lambda path: save_postprocess(unet.eval(), path, post_info), ".safetensors",
                                cfg.output, self.register, "postprocess", info)
        return output, entry.name if entry else None, {"codec_digest": digest, "stage_steps": self.lengths}
