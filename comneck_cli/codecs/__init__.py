"""Codec registry: name -> CompressAI constructor, qualities, latent channels, weights, entropy coding.

Each codec belongs to a *family* that knows how its entropy coder turns an image into strings and
back into the quantized latents ``y_hat``. CompressAI's own ``decompress`` returns only ``x_hat``
(its issue 329), and the transform-neck needs ``y_hat`` without running ``g_s``, so the families
decode the latents themselves through the model's entropy models.

Device policy (why encode on CUDA decodes on CPU): only the analysis and synthesis transforms
``g_a`` and ``g_s`` run on the chosen device. Everything that produces entropy-coder parameters
(``h_a``, ``h_s``, context models, the entropy tables) stays on the CPU in float32 on both sides,
because a float difference there that crosses one of GaussianConditional's scale-table edges
desynchronises the rANS decoder (CompressAI issues 279, 309, 340). For the same reason they run on one
thread (:func:`one_thread`): a convolution split over another number of threads sums in another order.
"""

from __future__ import annotations

import json
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from comneck_cli import weights as registry
from comneck_cli.formats import CODEC_IDS, PAD_MULTIPLE, latent_grids

from comneck_cli.defaults import CODEC_LEVELS, quality_problem, rate_problem
from comneck_cli.codecs import rans
from comneck_cli.codecs._compressai import import_compressai
from comneck_cli.errors import ComneckError
from comneck_cli.modelfiles import read_safetensors


class Family:
    """How one kind of CompressAI model maps x to strings and strings to ``y_hat``.

    ``compress`` returns the strings in record order and the encoder's own ``y_hat``;
    ``decompress`` must rebuild exactly that ``y_hat`` from the strings alone.
    """

    variable_rate = False

    def compress(self, model: nn.Module, y: Tensor, gain: Tensor | None = None) -> tuple[list[bytes], Tensor]:
        raise NotImplementedError

    def decompress(self, model: nn.Module, strings: list[bytes], grid: tuple[int, int],
                   gain: Tensor | None = None) -> Tensor:
        raise NotImplementedError

    def string_count(self, model: nn.Module) -> int:
        return 2

    @staticmethod
    def side_info(model: nn.Module, z: Tensor) -> tuple[bytes, Tensor]:
        """Entropy-code z with the factorized prior; the encoder uses the *decoded* z_hat, as the decoder will."""
        z_strings = model.entropy_bottleneck.compress(z)
        return z_strings[0], model.entropy_bottleneck.decompress(z_strings, z.shape[-2:])

    @staticmethod
    def decode_side_info(model: nn.Module, string: bytes, grid: tuple[int, int]) -> Tensor:
        return model.entropy_bottleneck.decompress([string], (grid[0] // 4, grid[1] // 4))


class ScaleHyperprior(Family):
    """bmshj2018-hyperprior: zero-mean Gaussian, scales from h_s(z_hat); y_hat = round(y)."""

    def compress(self, model, y, gain=None):
        z_string, z_hat = self.side_info(model, model.h_a(torch.abs(y)))
        indexes = model.gaussian_conditional.build_indexes(model.h_s(z_hat))
        y_string = model.gaussian_conditional.compress(y, indexes)[0]
        return [y_string, z_string], model.gaussian_conditional.quantize(y, "dequantize")

    def decompress(self, model, strings, grid, gain=None):
        z_hat = self.decode_side_info(model, strings[1], grid)
        indexes = model.gaussian_conditional.build_indexes(model.h_s(z_hat))
        return model.gaussian_conditional.decompress([strings[0]], indexes, z_hat.dtype)


class MeanScaleHyperprior(Family):
    """mbt2018-mean: Gaussian with means and scales from h_s(z_hat); y_hat = round(y - mu) + mu."""

    def compress(self, model, y, gain=None):
        z_string, z_hat = self.side_info(model, model.h_a(y))
        scales, means = model.h_s(z_hat).chunk(2, 1)
        indexes = model.gaussian_conditional.build_indexes(scales)
        y_string = model.gaussian_conditional.compress(y, indexes, means=means)[0]
        return [y_string, z_string], model.gaussian_conditional.quantize(y, "dequantize", means)

    def decompress(self, model, strings, grid, gain=None):
        z_hat = self.decode_side_info(model, strings[1], grid)
        scales, means = model.h_s(z_hat).chunk(2, 1)
        indexes = model.gaussian_conditional.build_indexes(scales)
        return model.gaussian_conditional.decompress([strings[0]], indexes, means=means)


class Autoregressive(Family):
    """mbt2018 and cheng2020: a 5×5 masked context model decoded position by position on the CPU."""

    kernel = 5

    def compress(self, model, y, gain=None):
        z_string, z_hat = self.side_info(model, model.h_a(y))
        params = model.h_s(z_hat)
        pad = (self.kernel - 1) // 2
        y_hat = F.pad(y, (pad, pad, pad, pad))  # _compress_ar writes y_hat in place as it codes
        y_string = model._compress_ar(y_hat, params, y.shape[2], y.shape[3], self.kernel, pad)
        return [y_string, z_string], F.pad(y_hat, (-pad, -pad, -pad, -pad))

    def decompress(self, model, strings, grid, gain=None):
        """CompressAI's ``_decompress_ar`` step for step, decoding through comneck's bounded rANS stream
        (:mod:`comneck_cli.codecs.rans`) instead of ``compressai.ans.RansDecoder``: the same y_hat, bit for bit."""
        z_hat = self.decode_side_info(model, strings[1], grid)
        params = model.h_s(z_hat)
        pad = (self.kernel - 1) // 2
        y_hat = torch.zeros((1, model.M, grid[0] + 2 * pad, grid[1] + 2 * pad))
        gc = model.gaussian_conditional
        tables = rans.tables_of(gc._quantized_cdf, gc._cdf_length, gc._offset)
        stream = rans.Stream(strings[0])
        for h in range(grid[0]):
            for w in range(grid[1]):
                # the 5×5 masked convolution only where it is needed, and 1×1 entropy parameters at (h, w)
                y_crop = y_hat[:, :, h : h + self.kernel, w : w + self.kernel]
                ctx_p = F.conv2d(y_crop, model.context_prediction.weight, bias=model.context_prediction.bias)
                p = params[:, :, h : h + 1, w : w + 1]
                scales_hat, means_hat = model.entropy_parameters(torch.cat((p, ctx_p), dim=1)).chunk(2, 1)
                symbols = rans.decode(stream, gc.build_indexes(scales_hat), tables)
                rv = torch.from_numpy(symbols.astype("float32")).reshape(1, -1, 1, 1)
                y_hat[:, :, h + pad : h + pad + 1, w + pad : w + pad + 1] = gc.dequantize(rv, means_hat)
        return F.pad(y_hat, (-pad, -pad, -pad, -pad))


class LatentCodecModel(Family):
    """ELIC (SimpleVAECompressionModel): uneven channel groups, each coded in two checkerboard passes.

    Its latent codec yields one string per (group, pass), then z: 5 groups give 11 strings.
    """

    def compress(self, model, y, gain=None):
        out = model.latent_codec.compress(y)
        return [s[0] for s in out["strings"]], out["y_hat"]

    def decompress(self, model, strings, grid, gain=None):
        shape = {
            "y": [torch.Size([g, *grid]) for g in model.groups],
            "hyper": torch.Size([grid[0] // 4, grid[1] // 4]),
        }
        return model.latent_codec.decompress([[s] for s in strings], shape)["y_hat"]

    def string_count(self, model):
        return 2 * len(model.groups) + 1


class VariableRate(Family):
    """mbt2018-mean-vbr (Kamisli et al., DCC 2024): one model for every rate.

    A gain g (the inverse quantisation step) scales the centred latent before rounding:
    q = round(g·y - g·mu), coded with scales g·sigma; ``y_hat = sign(q)·(|q| + offset)/g + mu``, where a small
    network (``QuantABCD``) predicts the reconstruction offset from (g·sigma, g) and the offset is zero where
    q = 0. g may be a scalar or a map broadcastable over y (1, 1, h, w) for spatially varying steps.
    Encoder and decoder both derive y_hat from q with :meth:`dequantize`, so they agree bit for bit.
    """

    variable_rate = True

    def compress(self, model, y, gain=None):
        gain = _gain_tensor(gain)
        z_string, z_hat = self.side_info(model, model.h_a(y))
        scales, means = model.h_s(z_hat).chunk(2, 1)
        gc = model.gaussian_conditional
        indexes = gc.build_indexes(scales * gain)
        y_string = gc.compress(y * gain, indexes, means=means * gain)[0]
        q = torch.round(y * gain - means * gain)  # the symbols gc.compress just wrote
        return [y_string, z_string], self.dequantize(model, q, scales, means, gain)

    def decompress(self, model, strings, grid, gain=None):
        gain = _gain_tensor(gain)
        z_hat = self.decode_side_info(model, strings[1], grid)
        scales, means = model.h_s(z_hat).chunk(2, 1)
        gc = model.gaussian_conditional
        q = gc.decompress([strings[0]], gc.build_indexes(scales * gain), z_hat.dtype)
        return self.dequantize(model, q, scales, means, gain)

    @staticmethod
    def dequantize(model: nn.Module, q: Tensor, scales: Tensor, means: Tensor, gain: Tensor) -> Tensor:
        """Integer symbols q -> y_hat, with the learned quantisation-reconstruction offsets."""
        stdev = model.gaussian_conditional.lower_bound_scale(scales * gain)
        stdev_and_gain = torch.stack((stdev, gain.expand_as(stdev)), dim=4)
        offsets = -model.QuantABCD(stdev_and_gain).squeeze(4)
        offsets = torch.where(q.abs() < 1e-4, torch.zeros_like(offsets), offsets)
        return torch.sign(q) * (q.abs() + offsets) / gain + means


def _gain_tensor(gain: Tensor | float | None) -> Tensor:
    if gain is None:
        raise ValueError("a variable-rate codec needs a gain")
    gain = torch.as_tensor(gain, dtype=torch.float32)
    return gain.reshape(1, 1, 1, 1) if gain.numel() == 1 else gain


def rate_gain(model: nn.Module, rate: float) -> Tensor:
    """Rate parameter R in [1, L] (L = the model's trained levels; R = q reproduces level q) -> gain.

    Between levels the gain is interpolated linearly in log space, so rate (and bpp) move smoothly. Computed in
    float64 and rounded once to float32, so encoder and decoder derive the same gain from the stored R.
    """
    gains = model.Gain.detach().double().abs().log()
    position = min(max(float(rate) - 1.0, 0.0), len(gains) - 1.0)
    low = int(position)
    high = min(low + 1, len(gains) - 1)
    frac = position - low
    return torch.exp(gains[low] * (1 - frac) + gains[high] * frac).float().reshape(1)


@dataclass(frozen=True)
class CodecSpec:
    """One named codec: its CompressAI architecture, family and per-quality constructor arguments.

    The quality levels are ``defaults.CODEC_LEVELS`` (torch-free, so the CLI checks -q before loading anything);
    the constructor arguments of a zoo codec are CompressAI's own table, ``compressai.zoo.image.cfgs``.
    """

    name: str
    family: Family
    zoo: bool
    config: dict[str, Any] | None = None  # the arguments at every level when the zoo has none for this codec
    notes: str = ""

    @property
    def codec_id(self) -> int:
        return CODEC_IDS[self.name]

    @property
    def variable_rate(self) -> bool:
        return self.family.variable_rate

    @property
    def qualities(self) -> dict[int, dict[str, Any]]:
        """Constructor arguments (``N``, ``M``) per quality level, as the zoo (or the paper) sizes them."""
        if self.config is not None:
            return {q: dict(self.config) for q in CODEC_LEVELS[self.name]}
        import_compressai()
        from compressai.zoo.image import cfgs

        return {q: dict(zip(("N", "M"), cfgs[self.name][q])) for q in CODEC_LEVELS[self.name]}

    def constructor(self) -> Callable[..., nn.Module]:
        import_compressai()
        from compressai.registry import MODELS

        from comneck_cli.codecs import elic_comneck  # noqa: F401 - registers elic-comneck, which CompressAI does not have

        return MODELS[self.name]

    def latent_channels(self, quality: int) -> int:
        return latent_channels(self.qualities[quality])


def latent_channels(config: dict[str, Any]) -> int:
    """The channels of y_hat for constructor arguments ``config``."""
    if "groups" in config:  # ELIC's M is the sum of its channel groups
        return int(sum(config["groups"]))
    return int(config.get("M", config["N"]))  # cheng2020's latents have N channels


CODECS: dict[str, CodecSpec] = {
    spec.name: spec
    for spec in (
        CodecSpec("bmshj2018-hyperprior", ScaleHyperprior(), zoo=True),
        CodecSpec("mbt2018-mean", MeanScaleHyperprior(), zoo=True),
        CodecSpec("mbt2018", Autoregressive(), zoo=True, notes="autoregressive: slow to decode"),
        CodecSpec("cheng2020-anchor", Autoregressive(), zoo=True, notes="autoregressive: slow to decode"),
        # The ComNeck paper trains ELIC itself (CompressAI's default N=192, M=320).
        CodecSpec("elic2022-official", LatentCodecModel(), zoo=False, config={"N": 192, "M": 320},
                  notes="the ComNeck paper's codec; no zoo weights"),
        # One file for every level; -q q is rate q, --rate picks any point in between. CompressAI's default size;
        # the shipped file is smaller (its metadata says so: file_config).
        CodecSpec("mbt2018-mean-vbr", VariableRate(), zoo=False, config={"N": 192, "M": 320},
                  notes="variable rate: one model, any --rate in 1..8"),
        # The ComNeck authors' own ELIC (comneck_cli.codecs.elic_comneck), coded through its CompressAI-style latent codec.
        CodecSpec("elic-comneck", LatentCodecModel(), zoo=False, config={"N": 192, "M": 320},
                  notes="the ComNeck authors' released codec (issue #18); no zoo weights"),
    )
}


def get_spec(name: str) -> CodecSpec:
    try:
        return CODECS[name]
    except KeyError:
        raise ComneckError(f"unknown codec {name!r}; choose one of: {', '.join(CODECS)}") from None


def check_quality(spec: CodecSpec, quality: int) -> None:
    problem = quality_problem(spec.name, quality)
    if problem is not None:
        raise ComneckError(problem)


def registry_name(codec: str, quality: int | None) -> str:
    """The weights-registry name of a codec's quality level, e.g. ``mbt2018-mean-q3``.

    A variable-rate codec has one file for every level, registered under its bare name.
    """
    if quality is None or get_spec(codec).variable_rate:
        return codec
    return f"{codec}-q{quality}"


# Encoder-side g_a tiling (Codec.analyze): tiles of 1024² pixels with a 64-pixel border of neighbours, multiples
# of the 64-pixel padding so every tile and border maps onto whole latent positions.
ANALYSIS_TILE = 1024
ANALYSIS_HALO = 64
# Decoder-side g_s tiling (Codec.synthesize), in latent positions (16 pixels each): the same 1024² pixel tiles, with
# 8 positions of real neighbours. g_s's receptive field is a few positions wide (four 5×5 transposed convolutions;
# cheng2020/ELIC add 3×3 residual blocks), so the seams differ from a whole-image g_s by float rounding only
# (README, "Reliability": measured < 1e-5 of the [0, 1] range, far below a grey level).
SYNTHESIS_TILE = ANALYSIS_TILE // 16
SYNTHESIS_HALO = 8


def run_tiled(transform: Callable[[Tensor], Tensor], x: Tensor, tile: int, halo: int, scale: float) -> Tensor:
    """``transform`` (g_a or g_s) over x (B, C, H, W) in tiles of ``tile``² input positions, each with a ``halo`` of
    real neighbours cropped away in the output, which is ``scale`` times the input's size (1/16 for g_a, 16 for
    g_s), so the transform's activations (hundreds of bytes per pixel) never exist for the whole image at once."""
    height, width = x.shape[-2:]
    out = None
    for top in range(0, height, tile):
        for left in range(0, width, tile):
            t0, l0 = max(top - halo, 0), max(left - halo, 0)
            part = transform(x[..., t0 : min(top + tile + halo, height), l0 : min(left + tile + halo, width)])
            if out is None:
                out = part.new_empty(*part.shape[:2], int(height * scale), int(width * scale))
            rows, cols = int(min(tile, height - top) * scale), int(min(tile, width - left) * scale)
            dt, dl = int((top - t0) * scale), int((left - l0) * scale)
            out[..., int(top * scale) : int(top * scale) + rows, int(left * scale) : int(left * scale) + cols] = (
                part[..., dt : dt + rows, dl : dl + cols])
    return out

RATE_STEPS = 1000  # records store a variable-rate codec's R in thousandths of a level (SPEC.md, section 0x83)


def check_rate(spec: CodecSpec, rate: float) -> float:
    """Validate R for a variable-rate codec and snap it to the grid the record stores."""
    problem = rate_problem(spec.name, rate, None)
    if problem is not None:
        raise ComneckError(problem)
    return round(rate * RATE_STEPS) / RATE_STEPS


def check_rate_options(spec: CodecSpec, rate: float | None, bpp_target: float | None) -> None:
    """What ``--rate``/``--bpp-target`` need before any model loads: at most one, a variable-rate codec, in range."""
    problem = rate_problem(spec.name, rate, bpp_target)
    if problem is not None:
        raise ComneckError(problem)


def bpp_out_of_reach(spec: CodecSpec, stored_rate: int | None, bpp: float, target: float) -> str | None:
    """Why a record coded for ``target`` bits per pixel could not meet it, or None: at the codec's highest rate
    below the target (or its lowest above it), no rate reaches the target for that image and the record is the
    closest there is."""
    levels = CODEC_LEVELS[spec.name]
    if stored_rate == levels[-1] * RATE_STEPS and bpp < target:
        return f"{target:g} bpp is out of reach: {spec.name}'s highest rate ({levels[-1]}) gives {bpp:.3f} bpp"
    if stored_rate == levels[0] * RATE_STEPS and bpp > target:
        return f"{target:g} bpp is out of reach: {spec.name}'s lowest rate ({levels[0]}) gives {bpp:.3f} bpp"
    return None


@dataclass
class Codec:
    """A loaded codec, ready to code: model with entropy tables built once at load.

    ``digest`` is the first 4 bytes of the weights file's sha256: every record carries it, and
    decoding a record with different weights is refused instead of producing garbage.
    """

    spec: CodecSpec
    quality: int
    model: nn.Module
    digest: bytes
    source: Path
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    machine_only: bool = False  # retrained for machines only (scenario d3): its records have no image to decode
    rate: float | None = None  # variable-rate codecs: R in [1, L], what -q/--rate chose

    @property
    def name(self) -> str:
        return self.spec.name

    def at_rate(self, rate: float) -> Codec:
        """The same loaded variable-rate model at another rate R (shares the model; nothing is reloaded)."""
        rate = check_rate(self.spec, rate)
        return replace(self, rate=rate, quality=min(max(round(rate), 1), 255))

    @property
    def stored_rate(self) -> int | None:
        """R as the record's rate section stores it (thousandths of a level); None for fixed-rate codecs."""
        return None if self.rate is None else round(self.rate * RATE_STEPS)

    @property
    def gain(self) -> Tensor | None:
        """The variable-rate codec's gain for ``rate`` (None for fixed-rate codecs)."""
        return rate_gain(self.model, self.rate) if self.spec.variable_rate else None

    @property
    def latent_channels(self) -> int:
        groups = getattr(self.model, "groups", None)  # ELIC keeps M only as its channel groups
        return int(sum(groups) if groups else self.model.M)

    @torch.inference_mode()
    def compress(self, x: Tensor) -> tuple[list[bytes], Tensor]:
        """x: (1, 3, H, W) in [0, 1], H and W multiples of PAD_MULTIPLE (64) -> (strings, y_hat on the CPU)."""
        return self.compress_batch(x)[0]

    @torch.inference_mode()
    def compress_batch(self, x: Tensor) -> list[tuple[list[bytes], Tensor]]:
        """x: (B, 3, H, W) -> per image (strings, y_hat (1, M, h, w)).

        Only g_a sees the batch. The entropy parameters are computed image by image, exactly as the decoder
        (which always decodes one record at a time) computes them: a batched h_s may pick other
        convolution kernels and round differently, which would desynchronise the decoder.
        """
        y = self.analyze(x)
        return [self.code(y[i : i + 1]) for i in range(y.shape[0])]

    @torch.inference_mode()
    def analyze(self, x: Tensor) -> Tensor:
        """``g_a``: x (B, 3, H, W) -> y (B, M, H/16, W/16), float32 on the CPU, ready for :meth:`code`.

        Images above ``ANALYSIS_TILE``² pixels run g_a tile by tile, each tile with an ``ANALYSIS_HALO``-pixel
        border of real neighbours that is cropped away in y, so g_a's activations (hundreds of bytes per pixel)
        never exist for the whole image at once. Only the encoder runs g_a: the y differs from a whole-image g_a
        by border effects that the halo keeps far below the quantisation step, and the decoder recovers exactly
        what was coded either way.
        """
        height, width = x.shape[-2:]

        def g_a(part: Tensor) -> Tensor:
            return self.model.g_a(part.to(self.device)).float().cpu()

        if height * width <= ANALYSIS_TILE**2:
            return g_a(x)
        return run_tiled(g_a, x, ANALYSIS_TILE, ANALYSIS_HALO, 1 / 16)

    @torch.inference_mode()
    def code(self, y: Tensor, gain: Tensor | None = None) -> tuple[list[bytes], Tensor]:
        """Entropy-code one image's y (1, M, h, w) -> (strings, y_hat); ``gain`` overrides the rate's gain.

        Separate from g_a so a rate search codes the same y at several rates without re-running the transform.
        """
        with one_thread():
            return self.spec.family.compress(self.model, y, self.gain if gain is None else gain)

    @torch.inference_mode()
    def decompress_latents(self, strings: list[bytes], height: int, width: int, gain: Tensor | None = None) -> Tensor:
        """Entropy-decode ``y_hat`` (CPU, float32) for an H×W original; ``g_s`` does not run.

        ``gain`` overrides the rate's gain, e.g. the per-position gain map of a semantic record (SPEC §7.1)."""
        expected = self.spec.family.string_count(self.model)
        if len(strings) != expected:
            raise ComneckError(
                f"record has {len(strings)} entropy-coded strings but {self.name} writes {expected}; "
                "the file is damaged or was written by another codec"
            )
        try:
            with one_thread():
                return self.spec.family.decompress(self.model, list(strings), latent_grids(height, width)[0],
                                                   self.gain if gain is None else gain)
        except (RuntimeError, ValueError, IndexError) as exc:
            raise ComneckError(f"entropy decoding failed ({exc}); the record is corrupt") from exc

    @torch.inference_mode()
    def synthesize(self, y_hat: Tensor) -> Tensor:
        """``g_s``: y_hat (B, M, h, w) -> x_hat (B, 3, 16h, 16w) in [0, 1], on the codec's device.

        Grids above ``SYNTHESIS_TILE``² positions (images above 1024² pixels) run g_s tile by tile with a
        ``SYNTHESIS_HALO``-position border, as :meth:`analyze` tiles g_a, so decoding memory is bounded by the
        output image, not by g_s's activations; smaller grids run whole, exactly as before.
        """

        def g_s(part: Tensor) -> Tensor:
            return self.model.g_s(part.to(self.device)).clamp_(0, 1)

        if y_hat.shape[-2] * y_hat.shape[-1] <= SYNTHESIS_TILE**2:
            return g_s(y_hat)
        return run_tiled(g_s, y_hat, SYNTHESIS_TILE, SYNTHESIS_HALO, 16)


_ONE_THREAD_LOCK = threading.RLock()


@contextmanager
def one_thread() -> Iterator[None]:
    """Run the entropy parameters' networks (h_a, h_s, context models) on one CPU thread, encoder and decoder
    alike, so their floats, and through the scale table the rANS state, do not depend on torch's thread count.
    They work at 1/16 and 1/64 of the image's resolution: this costs little next to g_a and g_s. The thread count is
    process-wide, so a lock keeps another Python thread from restoring it while one of these runs."""
    with _ONE_THREAD_LOCK:
        before = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            yield
        finally:
            torch.set_num_threads(before)


def save_codec(
    model: nn.Module, path: Path, codec: str, quality: int, config: dict[str, Any], *, machine_only: bool = False
) -> None:
    """Write a codec as a self-describing safetensors file (no pickle), entropy tables included.

    Storing the tables makes encoder and decoder share bit-identical CDFs instead of each
    rebuilding them with float arithmetic.
    """
    from safetensors.torch import save_file

    model.update(force=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    meta = {"format": "comneck-codec", "codec": codec, "quality": str(quality), "config": json.dumps(config)}
    if machine_only:
        meta["machine_only"] = "true"
    save_file(tensors, str(path), metadata=meta)


HALF_PREFIXES = ("g_a.", "g_s.", "h_a.", "h_s.")  # the bulk of the parameters; entropy models stay float32


def half_codec_file(source: Path, target: Path) -> None:
    """Rewrite a comneck codec file with its transforms' float32 weights as float16 (``weights import --half``).

    The entropy models (bottleneck quantiles and tables, the Gaussian scale table) keep float32, so the
    coding tables stay exactly those the codec was exported with. Loading casts back to float32.
    """
    from safetensors.torch import save_file

    state, meta = _read_state(Path(source))
    if meta.get("format") != "comneck-codec":
        raise ComneckError(f"{source} is not a comneck codec file (.safetensors from `comneck train codec`); "
                           "--half needs one")
    halved = {k: v.half() if k.startswith(HALF_PREFIXES) and v.dtype == torch.float32 else v
              for k, v in state.items()}
    save_file(halved, str(target), metadata={**meta, "dtype": "float16"})


def _read_state(path: Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    if path.suffix == ".safetensors":
        return read_safetensors(path, "codec weights")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises UnpicklingError, RuntimeError, EOFError... for bad files
        raise ComneckError(
            f"cannot load codec weights {path}: not a plain tensor checkpoint ({type(exc).__name__}); "
            "comneck only loads weights-only files"
        ) from exc
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ComneckError(f"cannot load codec weights {path}: it holds no state dict")
    return state, {}


def _build(spec: CodecSpec, quality: int, state: dict[str, Tensor], meta: dict[str, str], path: Path) -> nn.Module:
    import_compressai()
    from compressai.zoo.pretrained import load_pretrained

    if meta.get("format") == "comneck-codec":
        if meta.get("codec") != spec.name:
            raise ComneckError(
                f"weights {path} hold codec {meta.get('codec')!r}, not {spec.name!r}; pass --codec {meta.get('codec')}"
            )
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
            raise ComneckError(f"weights {path} carry a damaged codec config {raw[:60]!r} (not a JSON object of "
                               f"sizes, whole numbers or lists of them); export or import the file again")
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
        raise ComneckError(
            f"weights {path} do not fit codec {spec.name} (quality {quality}): {str(exc).splitlines()[0]}"
        ) from exc
    check_entropy_tables(model, path)
    return model


# CompressAI codes at 16-bit precision: a table holds at most 2**16 symbols, each of frequency at least 1.
MAX_TABLE_SYMBOLS = 1 << 16


def _entropy_table_problem(module: nn.Module) -> str | None:
    """What is wrong with one entropy model's tables and what ``update()`` builds them from, or None."""
    quantiles = getattr(module, "quantiles", None)  # EntropyBottleneck: (channels, 1, 3) lower, median, upper
    if quantiles is not None:
        q = quantiles.detach().double()
        if not torch.isfinite(q).all():
            return "its quantiles are not finite"
        if (q[:, 0, 2] - q[:, 0, 0]).max() >= MAX_TABLE_SYMBOLS:
            return "its quantiles span more symbols than a 16-bit table holds"
    scale_table = getattr(module, "scale_table", None)  # GaussianConditional
    if scale_table is not None:
        scales = scale_table.detach().double()
        if scales.numel() == 0 or not torch.isfinite(scales).all() or (scales <= 0).any() or (scales.diff() <= 0).any():
            return "its scale table is not positive, finite and increasing"
        # update() gives the widest Gaussian 2·ceil(scale·multiplier) + 1 symbols
        if 2 * float(scales.max()) * -module._standardized_quantile(module.tail_mass / 2) + 3 >= MAX_TABLE_SYMBOLS:
            return "its scale table needs more symbols than a 16-bit table holds"
    cdfs, lengths, offsets = module._quantized_cdf, module._cdf_length, module._offset
    if cdfs.numel() == 0:
        return None  # no tables in the file: load_codec builds them with update() from the checked inputs
    if any(t.dtype != torch.int32 for t in (cdfs, lengths, offsets)):
        return "its tables are not int32"
    # EntropyBottleneck: a row per channel; GaussianConditional: a row per scale-table entry (build_indexes)
    rows = quantiles.shape[0] if quantiles is not None else scale_table.numel() if scale_table is not None else None
    if cdfs.dim() != 2 or cdfs.shape[0] != (rows or cdfs.shape[0]):
        return f"it has CDF rows of shape {tuple(cdfs.shape)} for {rows} distributions"
    try:
        rans.tables_of(cdfs, lengths, offsets)
    except ValueError as exc:
        return str(exc)
    return None


def check_entropy_tables(model: nn.Module, path: Path) -> None:
    """Refuse damaged entropy tables before CompressAI's coder or comneck's decoder use them.

    CompressAI's encoder trusts the tables: a zero frequency (zeroed or non-increasing CDFs) divides by zero in
    its C++ ``Rans64EncPut`` (SIGFPE) and an index past the rows reads outside them. comneck's decoder checks
    the same rules again (:mod:`comneck_cli.codecs.rans`); here they become one error naming the file.
    """
    for name, module in model.named_modules():
        if hasattr(module, "_quantized_cdf"):
            problem = _entropy_table_problem(module)
            if problem is not None:
                raise ComneckError(f"codec weights {path}: the entropy tables are damaged ({name}: {problem}); "
                                   "re-export the codec or fetch the file again")


def _tables_present(model: nn.Module) -> bool:
    import_compressai()
    from compressai.entropy_models import EntropyModel

    return all(m._quantized_cdf.numel() > 0 for m in model.modules() if isinstance(m, EntropyModel))


def resolve_weights(spec: CodecSpec, quality: int, weights: Path | None = None) -> Path:
    """``--weights FILE|NAME``, else the registry entry ``{codec}-q{quality}``, else the CompressAI zoo."""
    if weights is not None:
        if Path(weights).is_file():
            return Path(weights)
        if registry.lookup(str(weights)) is None:
            raise ComneckError(f"codec weights {weights} are neither a file nor a registered name (`comneck weights list`)")
        name = str(weights)
    else:
        name = registry_name(spec.name, quality)
    if registry.lookup(name) is not None:
        try:
            return registry.resolve(name)
        except registry.WeightsError as exc:
            raise ComneckError(str(exc)) from exc
    if not spec.zoo:
        raise ComneckError(
            f"no weights for {spec.name} quality {quality}: CompressAI's zoo has none for this codec; "
            f"import a trained file with `comneck weights import {name} FILE` or pass --weights FILE"
        )
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
        raise ComneckError(
            f"no weights for {spec.name} quality {quality}: not in the registry and the CompressAI zoo download "
            f"failed ({type(exc).__name__}); download {url} on a connected machine and run "
            f"`comneck weights import {name} FILE`, or pass --weights FILE"
        ) from exc
    finally:
        import shutil

        shutil.rmtree(tmpdir, ignore_errors=True)
    return entry.path()


def _check_file_quality(spec: CodecSpec, quality: int, meta: dict[str, str], path: Path, fix: str) -> None:
    """A comneck file of a fixed-rate codec is trained for one quality: refuse it for another, saying ``fix``."""
    trained_for = meta.get("quality")
    if meta.get("format") == "comneck-codec" and not spec.variable_rate and trained_for not in (None, str(quality)):
        raise ComneckError(f"weights {path} were trained for {spec.name} quality {trained_for}, not {quality}; {fix}")


def load_codec(
    name: str, quality: int, *, weights: Path | str | None = None, device: torch.device | str = "cpu"
) -> Codec:
    """Load a codec for coding: resolve and verify its weights, build entropy tables once, place g_a/g_s."""
    spec = get_spec(name)
    check_quality(spec, quality)
    path = resolve_weights(spec, quality, weights)
    digest = bytes.fromhex(registry.file_sha256(path)[:8])
    state, meta = _read_state(path)
    _check_file_quality(spec, quality, meta, path, f"pass -q {meta.get('quality')}")
    model = _build(spec, quality, state, meta, path).eval()
    if not _tables_present(model):
        model.update(force=True)
    rans.bound_entropy_decoders(model)
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
        raise ComneckError(f"{path} is not a comneck codec weights file (not a valid safetensors file: {exc})") from exc


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
