"""Semantic-guided bit allocation (CoTAM): CLIP attention decides, on the sending side, where the bits go.

ComNeck adapts the latents on the receiving side; CoTAM steers the encoder instead. A shallow CLIP block's
attention from the class token to the patches (averaged over heads) marks what the vision tower looks at. The map
is brought to the codec's latent grid, quantised coarsely (``formats.ImportanceMap``, critical section 0x81 of the
record, counted in bpp) and turned into a per-position gain of the variable-rate codec (:func:`gain_map`):

    x ──► CLIP block b attention (cls → patches) ──► map m on the y grid ──► levels (in the record)
    x ──► g_a ──► y ──► q = round(g(m)·(y − mu)) ──► rANS                  g(i, j) = g_R · 2^(S·(m(i, j) − m̄))

High-importance positions get a finer step (more bits), low ones a coarser step; the zero-mean exponent keeps the
geometric mean of g at the rate's g_R, but not the total rate: at low rates the finer steps add more bits than the
coarser ones save (about +15 % at R = 1 with the shipped codec, S = 1.5, in the README's measurement), so hold the size with a bpp target where
it matters. The decoder rebuilds g from the record and
recovers exactly the encoder's ``y_hat``.

Large images use *hierarchical guidance*: a global map from the whole image resized to CLIP's input, fused with
local maps from CLIP-sized tiles at full resolution (a few tiles at a time, so memory stays bounded); the global map
keeps the scene's priorities, the local ones the detail a 224-pixel view cannot see.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from comneck_cli.formats import PAD_MULTIPLE, ImportanceMap, latent_grids

from comneck_cli.codecs import rate_gain
from comneck_cli.errors import ComneckError, UsageError
from comneck_cli.io.images import pad_amounts

Y_STRIDE = 16  # pixels per latent position (formats.latent_grids)
DEFAULT_STRENGTH = 1.5
DEFAULT_BLOCK = 2  # shallow CLIP block (1-based) whose attention is read
MAP_BLOCK = 2  # latent positions per map cell side: one level per 32×32 pixels
MAP_BITS = 4


@dataclass
class Guide:
    """A CLIP visual tower reading importance maps from block ``block``'s attention (1-based, shallow).

    ``fuse``: weight of the global map against the local tiles' map for large images; images whose longer side
    exceeds ``local_above`` pixels (default: twice CLIP's input) get local maps. ``tile_batch`` tiles go through
    CLIP at once, which bounds memory for any image size.
    """

    clip: nn.Module
    block: int = DEFAULT_BLOCK
    fuse: float = 0.5
    local_above: int | None = None
    tile_batch: int = 16
    _prep: nn.Module | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        from comneck_cli.clip.preprocess import ClipPreprocess
        from comneck_cli.clip.tower import ClipHead

        visual = self.clip.visual
        blocks = len(visual.transformer.resblocks)
        if not 1 <= self.block <= blocks:
            raise ComneckError(f"semantic guidance reads a CLIP block in 1..{blocks}, not {self.block}")
        self.head = ClipHead(visual, self.block - 1)  # tokens entering the block whose attention is read
        self.attn_block = visual.transformer.resblocks[self.block - 1]
        self.batch_first = visual.transformer.batch_first
        self._prep = ClipPreprocess(self.clip).to(self.device)  # CLIP's resize + normalisation, as training uses
        self.size = self._prep.size
        if self.local_above is None:
            self.local_above = 2 * max(self.size)

    @property
    def device(self) -> torch.device:
        return next(self.clip.parameters()).device

    @torch.inference_mode()
    def attention(self, x: Tensor) -> Tensor:
        """Images (B, 3, H, W) in [0, 1] -> class-token-to-patch attention (B, gh, gw), mean over heads."""
        tokens = self.head(self._prep(x.to(self.device)))
        q = self.attn_block.ln_1(tokens)
        if not self.batch_first:
            q = q.transpose(0, 1)
        _, weights = self.attn_block.attn(q, q, q, need_weights=True, average_attn_weights=True)  # (B, T, T)
        grid = self.head.conv1(torch.zeros(1, 3, *self.size, device=self.device)).shape[-2:]
        return weights[:, 0, 1:].reshape(-1, *grid).float().cpu()

    def importance(self, image: np.ndarray) -> np.ndarray:
        """uint8 H×W×3 -> importance in [0, 1] on the codec's y grid (h, w) of the padded image; padding is 0."""
        height, width = image.shape[:2]
        out = (-(-height // Y_STRIDE), -(-width // Y_STRIDE))
        x = torch.from_numpy(np.array(image, copy=True)).permute(2, 0, 1).unsqueeze(0)  # uint8: 3 B/px
        fused = _normalise(_resize(self.attention(x.float().div(255)), out))
        if max(height, width) > self.local_above:
            fused = self.fuse * fused + (1 - self.fuse) * _normalise(self._local(x, out))
        (h, w), _ = latent_grids(height, width)
        left, _, top, _ = pad_amounts(height, width, PAD_MULTIPLE)
        top, left = top // Y_STRIDE, left // Y_STRIDE
        grid = np.zeros((h, w), dtype=np.float64)
        grid[top : top + out[0], left : left + out[1]] = _normalise(fused).numpy()[: h - top, : w - left]
        return grid

    def _local(self, x: Tensor, out: tuple[int, int]) -> Tensor:
        """Maps of CLIP-sized tiles at full resolution, mosaicked and resized to ``out`` (positions of 16 px)."""
        th, tw = self.size
        height, width = x.shape[-2:]
        rows, cols = -(-height // th), -(-width // tw)
        corners = [(r * th, c * tw) for r in range(rows) for c in range(cols)]
        maps = []
        for start in range(0, len(corners), self.tile_batch):
            tiles = []
            for top, left in corners[start : start + self.tile_batch]:
                tile = x[..., top : top + th, left : left + tw].float().div(255)
                short_h, short_w = th - tile.shape[-2], tw - tile.shape[-1]
                if short_h or short_w:  # edge tiles: replicate the border rather than show CLIP black bars
                    tile = F.pad(tile, (0, short_w, 0, short_h), mode="replicate")
                tiles.append(tile)
            maps.append(self.attention(torch.cat(tiles)))
        maps = torch.cat(maps)  # (rows·cols, gh, gw)
        gh, gw = maps.shape[-2:]
        mosaic = maps.reshape(rows, cols, gh, gw).permute(0, 2, 1, 3).reshape(rows * gh, cols * gw)
        covered = (-(-rows * th // Y_STRIDE), -(-cols * tw // Y_STRIDE))
        return _resize(mosaic[None], covered)[: out[0], : out[1]]


def _resize(maps: Tensor, size: tuple[int, int]) -> Tensor:
    """(B, gh, gw) or (gh, gw) -> (size) bilinear; a batch of one is squeezed."""
    resized = F.interpolate(maps.reshape(-1, 1, *maps.shape[-2:]).float(), size=size, mode="bilinear",
                            align_corners=False)
    return resized[0, 0]


def _normalise(m: Tensor) -> Tensor:
    low, high = m.min(), m.max()
    return (m - low) / (high - low) if high > low else torch.zeros_like(m)


def strength_steps(strength: float) -> int:
    """The strength S as the importance map stores it (thousandths, SPEC §7.1)."""
    steps = round(strength * 1000)
    if not 0 <= steps <= 0xFFFF:
        raise UsageError(f"`semantic_strength` must be between 0 and 65.535, not {strength:g}",
                         params=["semantic_strength"])
    return steps


def quantise(importance: np.ndarray, height: int, width: int, strength: float, *, block: int = MAP_BLOCK,
             bits: int = MAP_BITS) -> ImportanceMap:
    """Importance in [0, 1] on the y grid -> the record's map: cell means over ``block``² positions, ``bits`` levels."""
    steps = strength_steps(strength)
    rows, cols = ImportanceMap.grid(height, width, block)
    padded = np.full((rows * block, cols * block), np.nan)
    padded[: importance.shape[0], : importance.shape[1]] = importance
    cells = np.nanmean(padded.reshape(rows, block, cols, block), axis=(1, 3))
    top = (1 << bits) - 1
    levels = np.clip(np.rint(cells * top), 0, top).astype(np.uint8)
    return ImportanceMap(block=block, bits=bits, strength=steps, rows=rows, cols=cols,
                         levels=levels.tobytes())


def levels_on_grid(imap: ImportanceMap, grid: tuple[int, int]) -> np.ndarray:
    """m(i, j) in [0, 1] (float64) on the y grid: each cell's level / (2^bits − 1), repeated over its positions."""
    cells = np.frombuffer(imap.levels, dtype=np.uint8).reshape(imap.rows, imap.cols) / ((1 << imap.bits) - 1)
    return np.repeat(np.repeat(cells, imap.block, axis=0), imap.block, axis=1)[: grid[0], : grid[1]]


def gain_map(model: nn.Module, rate: float, imap: ImportanceMap, grid: tuple[int, int]) -> Tensor:
    """The per-position gain (1, 1, h, w) of SPEC §7.1: g = clamp(g_R · 2^(S·(m − m̄)), g_min, g_max).

    float64 from integers and the model's stored gains, rounded once to float32: the encoder and the decoder
    compute the same bits. The clamp keeps every position inside the gains the codec was trained at.
    """
    m = levels_on_grid(imap, grid)
    trained = model.Gain.detach().double().abs()
    g = float(rate_gain(model, rate)) * np.exp2(imap.strength / 1000 * (m - m.mean()))
    g = np.clip(g, float(trained.min()), float(trained.max()))
    return torch.from_numpy(g.astype(np.float32)).reshape(1, 1, *grid)


@torch.inference_mode()
def bits_per_position(model: nn.Module, y: Tensor, gain: Tensor) -> Tensor:
    """Code length of y's symbols, summed over channels: (h, w) bits, −log2 of the Gaussian likelihoods the rANS
    coder uses for q = round(g·(y − mu)) (hyperprior side information z not included)."""
    from comneck_cli.codecs import Family

    gain = torch.as_tensor(gain, dtype=torch.float32)  # a scalar's (1,) and a map's (1, 1, h, w) both broadcast
    _, z_hat = Family.side_info(model, model.h_a(y))
    scales, means = model.h_s(z_hat).chunk(2, 1)
    gc = model.gaussian_conditional
    q = torch.round(y * gain - means * gain)
    likelihood = gc.likelihood_lower_bound(gc._likelihood(q, scales * gain))
    return -torch.log2(likelihood).sum(dim=1)[0]


def load_guide(clip_model: str, clip_tag: str | None, clip_weights=None, *, block: int = DEFAULT_BLOCK,
               device: torch.device | str = "cpu") -> Guide:
    """A :class:`Guide` on ``clip_model`` (weights from a file, the registry or open_clip's cache)."""
    from comneck_cli.clip.tower import resolve_clip

    return Guide(resolve_clip(clip_model, clip_tag, clip_weights, device=device), block=block)


def semantic_map(image: np.ndarray, guide: Guide, strength: float, **quantise_options) -> ImportanceMap:
    """The record's map for one image: guide's importance, quantised (``block``, ``bits``) with ``strength``."""
    height, width = image.shape[:2]
    return quantise(guide.importance(image), height, width, strength, **quantise_options)

