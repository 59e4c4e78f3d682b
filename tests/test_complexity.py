"""MAC counting counts attention, and the neck's measured cost is the paper's (Table 3)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from comneck_cli.eval.complexity import Cost, component_costs, count
from comneck_cli.models.neck import TransformNeck


def _block_macs(tokens: int, width: int, mlp_ratio: int = 4) -> int:
    """One pre-norm transformer block: q, k, v and output projections, QK^T and AV, the two MLP layers."""
    return 4 * tokens * width**2 + 2 * tokens**2 * width + 2 * mlp_ratio * tokens * width**2


def test_linear_macs_are_the_hand_formula():
    layer = nn.Linear(48, 40)
    cost = count(layer, torch.zeros(3, 7, 48))
    assert cost == Cost(params=48 * 40 + 40, macs=3 * 7 * 48 * 40)


class SelfAttention(nn.Module):
    """Self-attention called as open_clip calls it (``need_weights=False``)."""

    def __init__(self, width: int, heads: int, batch_first: bool):
        super().__init__()
        self.attn = nn.MultiheadAttention(width, heads, batch_first=batch_first)

    def forward(self, x):
        return self.attn(x, x, x, need_weights=False)[0]


@pytest.mark.parametrize("batch_first", [True, False])
def test_attention_is_counted_in_eval_and_no_grad(batch_first):
    from torch.utils.flop_counter import FlopCounterMode

    b, length, width, heads = 2, 10, 32, 4
    module = SelfAttention(width, heads, batch_first).eval()
    x = torch.zeros((b, length, width) if batch_first else (length, b, width))

    # What a plain FlopCounterMode sees: batch-first, the MHA fast path runs one fused kernel it does not
    # count at all; sequence-first, the projections are counted but the fused SDPA kernel (QK^T, AV) is not.
    with torch.no_grad(), FlopCounterMode(display=False) as naive:
        module(x)
    assert naive.get_total_flops() // 2 == (0 if batch_first else b * 4 * length * width**2)

    fastpath = torch.backends.mha.get_fastpath_enabled()
    cost = count(module, x)
    # q, k, v and output projections (4 L E^2) plus QK^T and AV (2 L^2 E), per batch element
    assert cost.macs == b * (4 * length * width**2 + 2 * length**2 * width)
    assert cost.params == 4 * width**2 + 4 * width
    assert torch.backends.mha.get_fastpath_enabled() == fastpath  # restored


def test_count_restores_mode_and_fastpath_after_an_error():
    class Broken(nn.Module):
        def forward(self, x):
            raise ValueError("boom")

    module = Broken().train()
    torch.backends.mha.set_fastpath_enabled(True)
    with pytest.raises(ValueError):
        count(module, torch.zeros(1))
    assert module.training
    assert torch.backends.mha.get_fastpath_enabled()


def test_full_size_neck_costs_what_the_paper_says():
    torch.manual_seed(0)
    neck = TransformNeck(latent_channels=320, width=1024, heads=16, grid=(16, 16))
    cost = count(neck, torch.zeros(1, 320, 16, 16))
    # Table 3: 13.19 M parameters, 52.795 kMAC/pixel at 256 x 256.
    assert cost.params == 13_191_168
    assert cost.kmac_per_px(256, 256) == pytest.approx(52.795, rel=0.05)
    assert cost.macs == 256 * 320 * 1024 + _block_macs(257, 1024)  # 52.688 kMAC/px, measured
    assert neck.training  # count put it back


def test_component_costs_rows_are_measured_per_image_pixel():
    from open_clip.transformer import VisionTransformer

    torch.manual_seed(0)
    neck = TransformNeck(latent_channels=8, width=64, heads=4, grid=(4, 4))
    codec = SimpleNamespace(g_s=nn.ConvTranspose2d(8, 3, kernel_size=16, stride=16))
    visual = VisionTransformer(image_size=56, patch_size=14, width=64, layers=4, heads=4, mlp_ratio=4.0, output_dim=32)
    clip = SimpleNamespace(visual=visual)

    rows = component_costs(codec, clip, neck, image_size=64, k=2)

    pixels = 64 * 64  # normalised by the coded image, also for the CLIP row run at 56 x 56
    assert [r.name for r in rows] == [
        "transform-neck T",
        "codec synthesis g_s",
        "CLIP C: patch embedding + first 2 blocks",
    ]
    neck_row, gs_row, clip_row = rows
    assert neck_row.params == sum(p.numel() for p in neck.parameters())
    assert neck_row.kmac_per_px == pytest.approx((16 * 8 * 64 + _block_macs(17, 64)) / pixels / 1000)
    assert gs_row.params == 8 * 3 * 16 * 16 + 3
    assert gs_row.kmac_per_px == pytest.approx(8 * 3 * 16 * 16 * 4 * 4 / pixels / 1000)
    head_params = 64 * 3 * 14 * 14 + 64 + 17 * 64 + 2 * 64 + sum(
        p.numel() for b in visual.transformer.resblocks[:2] for p in b.parameters()
    )
    assert clip_row.params == head_params
    assert clip_row.kmac_per_px == pytest.approx((16 * 64 * 3 * 14 * 14 + 2 * _block_macs(17, 64)) / pixels / 1000)


@pytest.mark.slow
def test_table3_with_elic_and_vit_l_14():
    """The full Table 3 rows (random weights: counts do not depend on them). Measured, not tuned:

    - neck 13.19 M / 52.69 kMAC/px (paper 13.19 / 52.795);
    - ELIC g_s 7.34 M / 254.97 kMAC/px (paper 7.34 / 112.00: the parameters agree, the paper's MACs are 2.3x
      lower; the four transposed convolutions alone, 81.6 kMAC/px by hand, and the two attention blocks,
      55.4, already make up most of 112);
    - C's patch embedding + first 2 blocks at 224, per 256^2 pixel: 26.06 M / 105.17 kMAC/px (paper 25.78 /
      70.24, see comneck_cli.eval.complexity for the candidate explanations).
    """
    import compressai.models
    import open_clip

    torch.manual_seed(0)
    codec = compressai.models.Elic2022Official()
    clip = open_clip.create_model("ViT-L-14", pretrained=None)
    neck_row, gs_row, clip_row = component_costs(codec, clip, TransformNeck(), image_size=256, k=2)

    assert neck_row.params == 13_191_168
    assert neck_row.kmac_per_px == pytest.approx(52.795, rel=0.05)
    assert gs_row.params == pytest.approx(7.34e6, rel=0.01)
    assert gs_row.kmac_per_px == pytest.approx(254.968, rel=1e-4)
    assert clip_row.params == 26_060_800  # conv1 602,112 + class/positions/ln_pre 266,240 + 2 blocks 25,192,448
    assert clip_row.kmac_per_px == pytest.approx((256 * 1024 * 588 + 2 * _block_macs(257, 1024)) / 65536 / 1000)
