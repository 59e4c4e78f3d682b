"""The loaded codec (:class:`Codec`): g_a and g_s on the chosen device, in tiles for large images; entropy coding
through the codec's family on one CPU thread.

Device policy (why encode on CUDA decodes on CPU): only the analysis and synthesis transforms ``g_a`` and ``g_s``
run on the chosen device. Everything that produces entropy-coder parameters (``h_a``, ``h_s``, context models, the
entropy tables) stays on the CPU in float32 on both sides, because a float difference there that crosses one of
GaussianConditional's scale-table edges desynchronises the rANS decoder (CompressAI issues 279, 309, 340). For the
same reason they run on one thread (:func:`one_thread`): a convolution split over another number of threads sums
in another order.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterator

import torch
from torch import Tensor, nn

from comneck_cli.codecs.families import rate_gain
from comneck_cli.codecs.specs import RATE_STEPS, CodecSpec, check_rate
from comneck_cli.errors import FormatError, InputError
from comneck_cli.formats import latent_grids


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

def allocation_failure(exc: BaseException) -> bool:
    """Whether ``exc`` is the machine's memory running out on the CPU (Python's MemoryError, or torch's allocator
    refusing, which is a RuntimeError); CUDA's out-of-memory is left to ``split_on_oom``, which retries smaller."""
    return isinstance(exc, MemoryError) or (
        isinstance(exc, RuntimeError) and not isinstance(exc, torch.cuda.OutOfMemoryError)
        and "can't allocate memory" in str(exc))


@contextmanager
def memory_for(what: str, height: int, width: int) -> Iterator[None]:
    """Turn running out of memory while the codec works on an H×W image into one sentence (a damaged record and
    a short machine are different problems)."""
    try:
        yield
    except (MemoryError, RuntimeError) as exc:
        if not allocation_failure(exc):
            raise
        raise InputError(f"not enough memory to {what} a {width}×{height} image on this machine (README, "
                         "\"Reliability\", gives what each size needs); use a machine with more memory, or lower "
                         "`max_pixels` to refuse such images before any work", params=["max_pixels"]) from None


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

    def __repr__(self) -> str:
        # What identifies it, on one line: the dataclass's own repr prints the whole network (~100 lines).
        level = f"quality={self.quality}" if self.rate is None else f"rate={self.rate:g}"
        extra = ", machine_only=True" if self.machine_only else ""
        return (f"Codec({self.spec.name!r}, {level}, digest={self.digest.hex()!r}, device={str(self.device)!r}"
                f"{extra}, source={Path(self.source).name!r})")

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

        with memory_for("encode", height, width):
            if height * width <= ANALYSIS_TILE**2:
                return g_a(x)
            return run_tiled(g_a, x, ANALYSIS_TILE, ANALYSIS_HALO, 1 / 16)

    @torch.inference_mode()
    def code(self, y: Tensor, gain: Tensor | None = None) -> tuple[list[bytes], Tensor]:
        """Entropy-code one image's y (1, M, h, w) -> (strings, y_hat); ``gain`` overrides the rate's gain.

        Separate from g_a so a rate search codes the same y at several rates without re-running the transform.
        """
        with one_thread(), memory_for("entropy-code", y.shape[-2] * 16, y.shape[-1] * 16):
            return self.spec.family.compress(self.model, y, self.gain if gain is None else gain)

    @torch.inference_mode()
    def decompress_latents(self, strings: list[bytes], height: int, width: int, gain: Tensor | None = None) -> Tensor:
        """Entropy-decode ``y_hat`` (CPU, float32) for an H×W original; ``g_s`` does not run.

        ``gain`` overrides the rate's gain, e.g. the per-position gain map of a semantic record (SPEC §7.1)."""
        expected = self.spec.family.string_count(self.model)
        if len(strings) != expected:
            raise FormatError(
                f"record has {len(strings)} entropy-coded strings but {self.name} writes {expected}; "
                "the file is damaged or was written by another codec"
            )
        try:
            with one_thread(), memory_for("entropy-decode", height, width):
                return self.spec.family.decompress(self.model, list(strings), latent_grids(height, width)[0],
                                                   self.gain if gain is None else gain)
        except (RuntimeError, ValueError, IndexError) as exc:
            raise FormatError(f"entropy decoding failed ({exc}); the record is corrupt") from exc

    @torch.inference_mode()
    def synthesize(self, y_hat: Tensor) -> Tensor:
        """``g_s``: y_hat (B, M, h, w) -> x_hat (B, 3, 16h, 16w) in [0, 1], on the codec's device.

        Grids above ``SYNTHESIS_TILE``² positions (images above 1024² pixels) run g_s tile by tile with a
        ``SYNTHESIS_HALO``-position border, as :meth:`analyze` tiles g_a, so decoding memory is bounded by the
        output image, not by g_s's activations; smaller grids run whole, exactly as before.
        """

        def g_s(part: Tensor) -> Tensor:
            return self.model.g_s(part.to(self.device)).clamp_(0, 1)

        with memory_for("decode", y_hat.shape[-2] * 16, y_hat.shape[-1] * 16):
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

