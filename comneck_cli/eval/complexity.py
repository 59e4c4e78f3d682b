"""Parameters and kMAC per pixel, measured by running the modules (the paper's Table 3), not hand-computed.

MACs come from :class:`torch.utils.flop_counter.FlopCounterMode` (it reports FLOPs = 2 x MACs for matrix
products and convolutions; element-wise ops, norms and softmax are not counted, as in the usual tables).
In eval mode under ``no_grad`` on the CPU it silently misses attention: ``nn.MultiheadAttention``'s fast path
(``_native_multi_head_attention``) and the flash / memory-efficient SDPA kernels have no FLOP formula there,
so whole attention layers count as zero. :func:`count` therefore disables the MHA fast path and forces the
math SDPA kernel, which runs attention as counted matrix products, and restores the settings afterwards.

kMAC/pixel is always normalised by the pixels of the IMAGE being coded (256 x 256 in Table 3), also for
modules whose input is latents or tokens, so the rows add up to the cost of handling one image.

Measured against Table 3 (ELIC from CompressAI, N=192 M=320; open_clip ViT-L-14; 256 x 256; random weights,
which do not change counts):

==========================================  ===================  ====================
row                                         measured             paper
==========================================  ===================  ====================
transform-neck T                            13.19 M,  52.69      13.19 M,  52.795
ELIC g_s                                    7.34 M,  254.97      7.34 M,  112.00
C: patch embedding + first 2 blocks         26.06 M, 105.17      25.78 M,  70.24
==========================================  ===================  ====================

- The neck agrees (-0.2%: the paper's tool also counts some element-wise work).
- g_s: the parameters agree, the MACs do not (+128%). The count checks by hand: the four 5x5 stride-2
  transposed convolutions alone cost 81.6 kMAC/px (C_in*C_out*25 per input position) and the two attention
  blocks 55.4, so 112 cannot hold all of g_s at 256 x 256. The paper does not say how it counted.
- C's first blocks (-33%): the row here is ``ClipHead`` (conv1, class/positional embedding, ln_pre, blocks 1-2)
  at 224 x 224, divided by 256^2. Two readings reproduce the paper's 70.24 without fitting anything: patch
  embedding plus ONE block at 224 divided by 224^2 gives 70.22; patch embedding plus two blocks with the
  attention layers uncounted (the fast-path undercount above), divided by 256^2, gives 68.14. The paper's
  25.78 M is close to conv1 + two blocks (25.79 M), i.e. without class/positional embeddings and ln_pre.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import Tensor, nn

from comneck_cli.errors import UsageError

# y_hat is the image downsampled 16x by g_a in every CompressAI codec comneck supports (ELIC included).
LATENT_STRIDE = 16


@dataclass(frozen=True)
class Cost:
    """A module's parameter count and the multiply-accumulates of one forward pass on the given inputs."""

    params: int
    macs: int

    def kmac_per_px(self, height: int, width: int) -> float:
        """MACs per pixel of an ``height x width`` image, in thousands."""
        return self.macs / (height * width) / 1000


@dataclass(frozen=True)
class Row:
    """One line of a complexity table: ``params`` in units, ``kmac_per_px`` per pixel of the coded image."""

    name: str
    params: int
    kmac_per_px: float


@contextmanager
def _counting_settings() -> Iterator[None]:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with sdpa_kernel(SDPBackend.MATH):
            yield
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)


def count(module: nn.Module, *inputs: Tensor) -> Cost:
    """Parameters of ``module`` and the MACs of ``module(*inputs)`` in eval mode under ``no_grad``.

    Attention is counted (see the module docstring); the module's train/eval mode is restored afterwards.
    Shared parameters are counted once.
    """
    from torch.utils.flop_counter import FlopCounterMode

    params = sum(p.numel() for p in module.parameters())
    was_training = module.training
    module.eval()
    try:
        with _counting_settings(), torch.no_grad(), FlopCounterMode(display=False) as counter:
            module(*inputs)
    finally:
        module.train(was_training)
    return Cost(params=params, macs=counter.get_total_flops() // 2)


def component_costs(
    codec_model: nn.Module, clip_model: nn.Module, neck: nn.Module, image_size: int = 256, k: int = 2
) -> list[Row]:
    """Table 3's rows for one ``image_size x image_size`` image, measured on the given modules.

    - ``transform-neck T``: on ``y_hat`` of shape ``(1, M, image_size/16, image_size/16)``, M the neck's
      latent channels (320 for ELIC);
    - ``codec synthesis g_s``: on the same ``y_hat`` (what the *Reconstruction* and *Post-processing*
      baselines must run and the neck avoids);
    - ``CLIP C: patch embedding + first k blocks``: :class:`~comneck_cli.clip.ClipHead`, the part of C the
      neck replaces, run at the CLIP tower's own input resolution (224 for ViT-L/14, where an image-domain
      pipeline resizes the decoded image to), but divided by the pixels of the ``image_size`` image like the
      other rows, so the rows add up per coded pixel as the paper's Table 3 does. Resize cost is not counted.

    kMAC/pixel of every row = MACs / image_size^2 / 1000.
    """
    from comneck_cli.clip.tower import ClipHead

    latent = image_size // LATENT_STRIDE
    y_hat = torch.zeros(1, neck.proj.in_features, latent, latent)
    visual = getattr(clip_model, "visual", clip_model)
    clip_h, clip_w = visual.image_size
    images = torch.zeros(1, 3, clip_h, clip_w)

    def row(name: str, cost: Cost) -> Row:
        return Row(name, cost.params, cost.kmac_per_px(image_size, image_size))

    return [
        row("transform-neck T", count(neck, y_hat)),
        row("codec synthesis g_s", count(codec_model.g_s, y_hat)),
        row(f"CLIP C: patch embedding + first {k} blocks", count(ClipHead(visual, k), images)),
    ]


def measure(codec: str, quality: int | None, clip_model: str, image_size: int = 256, k: int = 2
            ) -> tuple[list[Row], str]:
    """:func:`component_costs` of models built with random weights (counts do not depend on them, so nothing is
    downloaded): ``codec`` at ``quality`` (default its highest) sized as the file ``encode`` would load, the
    open_clip tower ``clip_model``, and a neck for both. Returns the rows and the codec's size with where it comes
    from (``codecs.file_config``)."""
    import logging

    import open_clip

    from comneck_cli.codecs import check_quality, file_config, get_spec, latent_channels
    from comneck_cli.models.neck import TransformNeck

    spec = get_spec(codec)
    quality = max(spec.qualities) if quality is None else quality
    check_quality(spec, quality)
    if clip_model not in open_clip.list_models():
        raise UsageError(f"unknown CLIP model {clip_model!r}; use an open_clip model name such as ViT-L-14")
    if image_size % 64:
        raise UsageError(f"`size` must be a multiple of 64 (the codec's padding), not {image_size}", params=["size"])
    config, source = file_config(spec, quality)
    codec_model = spec.constructor()(**config)
    logging.disable(logging.WARNING)  # open_clip logs "initialized randomly", which is the point here
    try:
        clip = open_clip.create_model(clip_model, pretrained=None)
    finally:
        logging.disable(logging.NOTSET)
    visual = clip.visual
    grid = image_size // LATENT_STRIDE
    neck = TransformNeck(
        latent_channels=latent_channels(config), width=visual.transformer.width,
        heads=visual.transformer.resblocks[0].attn.num_heads, grid=(grid, grid),
    )
    sized = ", ".join(f"{key}={value}" for key, value in config.items())
    return component_costs(codec_model, clip, neck, image_size=image_size, k=k), f"q{quality}, {sized}: {source}"
