"""The ComNeck authors' ELIC codec (their ``ELIC_LLM``) and their released checkpoints (issue #18).

The authors (NYCU-MAPL/BridgingCompressionMLLM) released twelve files ``d{1,2,3}_{1,2,3,4}.pth.tar``, each
``{"state_dict": codec, "adapter": neck, ...}``. The codec is not CompressAI's ``elic2022-official``: it shares
g_a, g_s and h_a, but its entropy model differs, and :class:`ElicComneck` rebuilds it from CompressAI 1.2.8's
blocks with the authors' module names, so their ``state_dict`` loads with ``strict=True``:

- ``h_s`` gives the hyper parameters, means first, then scales (every parameter tensor here is means, scales).
- y is split into channel groups 16/16/32/64/192. The channel context ``cc_transforms[i-1]`` of group i reads
  group 0 alone (i = 1) or groups 0 and i-1 (i >= 2), never all earlier groups.
- Each group is coded in two checkerboard passes: anchors at (even, even) and (odd, odd), then the others.
  ``ParamAggregation[i]`` reads ``cat(spatial context, channel context, hyper)``; the spatial context is zero for
  anchors and ``context_prediction[i]`` (a 5×5 convolution with a ``mask`` buffer) of the decoded anchors for the
  rest. Group 0 has no channel context.
- Each pass is entropy-coded as a half-width tensor (even rows keep one column parity, odd rows the other) with
  ``GaussianConditional(..., means=...)``: 10 strings for y, then z's: 11 strings.

The authors' inference feeds the neck the y_hat of their ``forward`` (rounding around the means, as coding does);
:meth:`ElicComneck.forward`, :meth:`~ElicComneck.compress` and :meth:`~ElicComneck.decompress` compute that same
y_hat. Decoding goes through ``gaussian_conditional.decompress`` and ``entropy_bottleneck.decompress``, so the
bounded rANS decoder that :func:`comneck_cli.codecs.rans.bound_entropy_decoders` installs is the one that runs.

:func:`read_checkpoint` reads a released file safely, :func:`release_codec_state` checks its codec, and
:func:`write_release_codec` turns it into comneck's codec file, the one conversion ``comneck weights import-comneck``
and ``--weights dS_Q.pth.tar`` share (so both give the same digest). The neck ('adapter') is the models layer's:
:mod:`comneck_cli.models.release`.
"""

from __future__ import annotations

import collections
import re
import tempfile
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import Tensor, nn

from comneck_cli.codecs._compressai import import_compressai
from comneck_cli.errors import MismatchError, ModelFileError, UsageError

import_compressai()  # the light import (no point-cloud modules) before any compressai submodule

from compressai.entropy_models import EntropyBottleneck, GaussianConditional  # noqa: E402
from compressai.layers import AttentionBlock, CheckerboardMaskedConv2d, conv1x1, conv3x3  # noqa: E402
from compressai.models.base import CompressionModel  # noqa: E402
from compressai.models.sensetime import ResidualBottleneckBlock  # noqa: E402
from compressai.models.utils import conv, deconv, remap_old_keys  # noqa: E402
from compressai.ops import quantize_ste  # noqa: E402
from compressai.registry import register_model  # noqa: E402

GROUPS = (16, 16, 32, 64, 192)  # channels of each group of y, coded in this order
CONTEXT_WIDTHS = (224, 128)  # hidden widths of every cc_transforms network
AGGREGATION_WIDTHS = (640, 512)  # hidden widths of every ParamAggregation network
RELEASE_CONFIG = {"N": 192, "M": 320}  # every released file
# The released files' names: d{scenario}_{quality}.pth.tar, scenarios d1-d3 of the paper, qualities 1-4.
RELEASE_NAME = re.compile(r"d([123])_([1-4])\.pth\.tar")
_TABLES = ("_quantized_cdf", "_offset", "_cdf_length", "scale_table")  # entropy tables: empty until update()


def _anchor_mask(height: int, width: int) -> Tensor:
    """True at anchors, (even, even) and (odd, odd)."""
    rows = torch.arange(height).view(-1, 1)
    cols = torch.arange(width).view(1, -1)
    return (rows + cols) % 2 == 0


def _pack(t: Tensor, anchors: bool) -> Tensor:
    """One pass's positions of ``t`` (…, h, w) as a half-width tensor (…, h, w/2), in the authors' order."""
    even, odd = (0, 1) if anchors else (1, 0)  # the column parity even and odd rows keep
    half = t.new_zeros(*t.shape[:-1], t.shape[-1] // 2)
    half[..., 0::2, :] = t[..., 0::2, even::2]
    half[..., 1::2, :] = t[..., 1::2, odd::2]
    return half


def _unpack(half: Tensor, anchors: bool) -> Tensor:
    """:func:`_pack` undone: a full-width tensor, zero at the other pass's positions."""
    even, odd = (0, 1) if anchors else (1, 0)
    full = half.new_zeros(*half.shape[:-1], half.shape[-1] * 2)
    full[..., 0::2, even::2] = half[..., 0::2, :]
    full[..., 1::2, odd::2] = half[..., 1::2, :]
    return full


# code(group, anchors?, means, scales) -> that pass's y_hat, zero at the other pass's positions
PassCoder = Callable[[int, bool, Tensor, Tensor], Tensor]


@register_model("elic-comneck")
class ElicComneck(CompressionModel):
    """The authors' ``ELIC_LLM``: x -> g_a -> y -> 5 channel groups × 2 checkerboard passes (+ z) -> y_hat -> g_s.

    ``N`` is the width of the transforms; ``M`` must be 320, the sum of :data:`GROUPS`. ``groups`` lists the
    channel groups (what :class:`comneck_cli.codecs.Codec` reads the latent width from).
    """

    def __init__(self, N: int = 192, M: int = 320):
        super().__init__()
        if M != sum(GROUPS):
            raise ValueError(f"the ComNeck ELIC codes M = {sum(GROUPS)} latent channels (groups {GROUPS}), not {M}")
        self.N, self.M = int(N), int(M)
        self.groups = list(GROUPS)

        def rbb() -> nn.Module:
            return ResidualBottleneckBlock(N, N)

        self.g_a = nn.Sequential(
            conv(3, N), rbb(), rbb(), rbb(),
            conv(N, N), rbb(), rbb(), rbb(), AttentionBlock(N),
            conv(N, N), rbb(), rbb(), rbb(),
            conv(N, M), AttentionBlock(M),
        )
        self.g_s = nn.Sequential(
            AttentionBlock(M), deconv(M, N), rbb(), rbb(), rbb(),
            deconv(N, N), AttentionBlock(N), rbb(), rbb(), rbb(),
            deconv(N, N), rbb(), rbb(), rbb(),
            deconv(N, 3),
        )
        self.h_a = nn.Sequential(
            conv3x3(M, N), nn.ReLU(inplace=True), conv(N, N), nn.ReLU(inplace=True), conv(N, N),
        )
        self.h_s = nn.Sequential(
            deconv(N, N), nn.ReLU(inplace=True), deconv(N, N * 3 // 2), nn.ReLU(inplace=True),
            conv3x3(N * 3 // 2, 2 * M),
        )
        wide, narrow = CONTEXT_WIDTHS
        self.cc_transforms = nn.ModuleList(
            nn.Sequential(
                conv(sum(GROUPS[j] for j in self._channel_context(i)), wide, stride=1, kernel_size=5),
                nn.ReLU(inplace=True),
                conv(wide, narrow, stride=1, kernel_size=5),
                nn.ReLU(inplace=True),
                conv(narrow, 2 * GROUPS[i], stride=1, kernel_size=5),
            )
            for i in range(1, len(GROUPS))
        )
        self.context_prediction = nn.ModuleList(
            CheckerboardMaskedConv2d(g, 2 * g, kernel_size=5, padding=2, stride=1) for g in GROUPS
        )
        wide, narrow = AGGREGATION_WIDTHS
        self.ParamAggregation = nn.ModuleList(
            nn.Sequential(
                # spatial context (2g), channel context (2g, none for group 0), hyper (2M)
                conv1x1(2 * g + (2 * g if i else 0) + 2 * M, wide),
                nn.ReLU(inplace=True),
                conv1x1(wide, narrow),
                nn.ReLU(inplace=True),
                conv1x1(narrow, 2 * g),
            )
            for i, g in enumerate(GROUPS)
        )
        self.entropy_bottleneck = EntropyBottleneck(N)
        self.gaussian_conditional = GaussianConditional(None)

    @staticmethod
    def _channel_context(i: int) -> tuple[int, ...]:
        """The groups whose y_hat group i's channel context reads: 0, and i-1 from group 2 on."""
        return (0,) if i == 1 else (0, i - 1)

    def _context(self, i: int, anchors_hat: Tensor) -> Tensor:
        """The checkerboard context of group i from its decoded anchors: the masked 5×5 convolution, computed from
        ``weight * mask`` instead of CompressAI's forward, which writes the masked weight back into the parameter."""
        layer = self.context_prediction[i]
        return nn.functional.conv2d(anchors_hat, layer.weight * layer.mask, layer.bias, padding=layer.padding)

    def _latents(self, hyper: Tensor, code: PassCoder) -> Tensor:
        """Group by group, anchors then the rest: compute each pass's (means, scales) and let ``code`` turn
        them into that pass's y_hat; the same walk encodes, decodes and runs the training-style forward."""
        y_hat: list[Tensor] = []
        b, _, h, w = hyper.shape
        for i, g in enumerate(GROUPS):
            support = hyper
            if i:
                context = torch.cat([y_hat[j] for j in self._channel_context(i)], dim=1)
                support = torch.cat([self.cc_transforms[i - 1](context), hyper], dim=1)
            aggregate = self.ParamAggregation[i]
            means, scales = aggregate(torch.cat([hyper.new_zeros(b, 2 * g, h, w), support], dim=1)).chunk(2, 1)
            anchors_hat = code(i, True, means, scales)
            means, scales = aggregate(torch.cat([self._context(i, anchors_hat), support], dim=1)).chunk(2, 1)
            y_hat.append(anchors_hat + code(i, False, means, scales))
        return torch.cat(y_hat, dim=1)

    def forward(self, x: Tensor) -> dict[str, Tensor | dict[str, Tensor]]:
        """The authors' ``forward`` (``noisequant=False``, what their inference feeds the neck): y and z rounded
        around their means with straight-through gradients, likelihoods for the rate term."""
        latents = self.latent_forward(self.g_a(x))
        return {"x_hat": self.g_s(latents["y_hat"]), **latents}

    def latent_forward(self, y: Tensor) -> dict[str, Tensor | dict[str, Tensor]]:
        """y -> ``y_hat`` and the likelihoods of y and z: :meth:`forward` without the transforms, which training
        calls to run g_a under its own autocast (``comneck_cli.train.latents``)."""
        z = self.h_a(y)
        _, z_likelihoods = self.entropy_bottleneck(z)
        medians = self.entropy_bottleneck._get_medians()
        z_hat = quantize_ste(z - medians) + medians
        y_groups = y.split(GROUPS, dim=1)
        anchor = _anchor_mask(*y.shape[-2:]).to(y.device)
        likelihoods = [torch.empty(0)] * len(GROUPS)

        def code(i: int, anchors: bool, means: Tensor, scales: Tensor) -> Tensor:
            mine = anchor if anchors else ~anchor
            _, part = self.gaussian_conditional(y_groups[i], scales, means=means)
            likelihoods[i] = part if anchors else torch.where(mine, part, likelihoods[i])  # anchors come first
            return torch.where(mine, quantize_ste(y_groups[i] - means) + means, torch.zeros_like(means))

        y_hat = self._latents(self.h_s(z_hat), code)
        return {"y_hat": y_hat, "likelihoods": {"y": torch.cat(likelihoods, dim=1), "z": z_likelihoods}}

    def compress(self, x: Tensor) -> tuple[list[bytes], Tensor]:
        """One image x (1, 3, H, W), H and W multiples of 64 -> (11 strings, y_hat)."""
        return self.code(self.g_a(x))

    def code(self, y: Tensor) -> tuple[list[bytes], Tensor]:
        """Entropy-code one image's y (1, M, h, w), h and w even -> (strings, y_hat): per group anchors, then
        the rest, then z; y_hat is what :meth:`decompress` rebuilds from the strings."""
        _check_grid(y.shape[0], y.shape[-2:])
        z = self.h_a(y)
        z_strings = self.entropy_bottleneck.compress(z)
        z_hat = self.entropy_bottleneck.decompress(z_strings, z.shape[-2:])
        y_groups = y.split(GROUPS, dim=1)
        gc = self.gaussian_conditional
        strings: list[bytes] = []

        def code(i: int, anchors: bool, means: Tensor, scales: Tensor) -> Tensor:
            values, means = _pack(y_groups[i], anchors), _pack(means, anchors)
            strings.extend(gc.compress(values, gc.build_indexes(_pack(scales, anchors)), means=means))
            return _unpack(gc.quantize(values, "dequantize", means), anchors)  # what decoding the string gives

        y_hat = self._latents(self.h_s(z_hat), code)
        return [*strings, *z_strings], y_hat

    def decompress(self, strings: list[bytes], grid: tuple[int, int]) -> Tensor:
        """11 strings of an image whose latent grid is ``grid`` (h, w), both even -> y_hat (1, M, h, w)."""
        _check_grid(1, grid)
        if len(strings) != 2 * len(GROUPS) + 1:
            raise ValueError(f"the ComNeck ELIC writes {2 * len(GROUPS) + 1} strings, not {len(strings)}")
        z_hat = self.entropy_bottleneck.decompress([strings[-1]], (grid[0] // 4, grid[1] // 4))
        gc = self.gaussian_conditional
        y_strings = iter(strings[:-1])

        def code(i: int, anchors: bool, means: Tensor, scales: Tensor) -> Tensor:
            means = _pack(means, anchors)
            half = gc.decompress([next(y_strings)], gc.build_indexes(_pack(scales, anchors)), means=means)
            return _unpack(half, anchors)

        return self._latents(self.h_s(z_hat), code)

    @property
    def latent_codec(self) -> _LatentCodec:
        """CompressAI's latent-codec interface (y -> strings, y_hat), which comneck's ELIC family
        (:class:`comneck_cli.codecs.LatentCodecModel`) codes through."""
        return _LatentCodec(self)


class _LatentCodec:
    """:class:`ElicComneck`'s coding in CompressAI's ``LatentCodec`` shape: one list of strings per pass."""

    def __init__(self, model: ElicComneck):
        self.model = model

    def __call__(self, y: Tensor) -> dict[str, Tensor | dict[str, Tensor]]:
        """Training's latent path, as CompressAI's latent codecs are called: y -> y_hat and likelihoods."""
        return self.model.latent_forward(y)

    def compress(self, y: Tensor) -> dict[str, object]:
        strings, y_hat = self.model.code(y)
        return {"strings": [[s] for s in strings], "y_hat": y_hat}

    def decompress(self, strings: list[list[bytes]], shape: dict[str, object]) -> dict[str, Tensor]:
        grid = tuple(shape["y"][0][-2:])
        return {"y_hat": self.model.decompress([s[0] for s in strings], grid)}


def _check_grid(batch: int, grid: tuple[int, int] | torch.Size) -> None:
    if batch != 1 or grid[0] % 2 or grid[1] % 2:
        raise ValueError(f"the ComNeck ELIC codes one image with an even latent grid, not {batch} of {tuple(grid)}")


# --- the released files -------------------------------------------------------------------------------------

@lru_cache(maxsize=1)
def _codec_shapes() -> dict[str, tuple[int, ...]]:
    """Every tensor of a fresh release-size codec and its shape (entropy tables are empty until update())."""
    with torch.device("meta"):  # shapes only: no memory, no initialisation
        return {k: tuple(v.shape) for k, v in ElicComneck(**RELEASE_CONFIG).state_dict().items()}


def _table_problem(key: str, value: Tensor) -> str | None:
    """Why an entropy-table tensor has no shape the release codec can hold, or None: an empty one is rebuilt by
    update(), a filled one is checked in depth when the codec loads (``codecs.check_entropy_tables``)."""
    dims = 2 if key.endswith("_quantized_cdf") else 1
    bottleneck = key.startswith("entropy_bottleneck.")  # one row per channel of z; the Gaussian's, one per scale
    if value.numel() == 0 or (value.dim() == dims and (not bottleneck or value.shape[0] == RELEASE_CONFIG["N"])):
        return None
    return f"a {dims}-D table with one row per {'channel of z' if bottleneck else 'scale'}"


def release_codec_state(state: dict[str, Tensor], source: str = "the codec") -> dict[str, Tensor]:
    """A released codec state dict (``module.`` prefixes and CompressAI's older entropy-bottleneck names allowed)
    -> :class:`ElicComneck`'s, with every key and shape checked; :class:`ModelFileError` names the first problem."""
    state = {k.removeprefix("module."): v for k, v in state.items()}
    state = dict(remap_old_keys("entropy_bottleneck", state))  # _matrix0 (CompressAI 1.2.0) -> matrices.0
    expected = _codec_shapes()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        what = f"lack {missing[0]!r}" if missing else f"hold {unexpected[0]!r}, which ELIC_LLM has not"
        more = len(missing) + len(unexpected) - 1
        raise ModelFileError(f"{source}: the codec weights ('state_dict') {what}"
                             f"{f' (and {more} more key problems)' if more else ''}; is this a ComNeck release file?")
    for key, value in state.items():
        if not isinstance(value, Tensor):
            raise ModelFileError(f"{source}: codec entry {key!r} is a {type(value).__name__}, not a tensor")
        name = key.rsplit(".", 1)[-1]
        problem = _table_problem(key, value) if name in _TABLES else (
            None if tuple(value.shape) == expected[key] else f"shape {expected[key]}")
        if problem is not None:
            raise ModelFileError(f"{source}: codec weight {key!r} has shape {tuple(value.shape)}, but ELIC_LLM "
                                 f"(N=192, M=320) needs {problem}")
    for i in range(len(GROUPS)):
        mask = state[f"context_prediction.{i}.mask"]
        if not torch.equal(mask.bool(), ~_anchor_mask(5, 5).expand_as(mask)):
            raise ModelFileError(f"{source}: context_prediction.{i}.mask is not the checkerboard mask (ones where the "
                                 "row and column parities differ)")
    return state


def read_checkpoint(path: Path | str) -> dict[str, Any]:
    """Read one released ``d{S}_{Q}.pth.tar`` -> its dict, with a ``state_dict`` and an ``adapter`` dict (unchecked).

    The file is unpickled with ``weights_only=True``: tensors, numbers and plain containers, plus
    ``collections.Counter`` (the milestones in the saved learning-rate scheduler's state); anything else is
    refused, never executed.
    """
    path = Path(path)
    try:
        with torch.serialization.safe_globals([collections.Counter]):
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except OSError as exc:
        raise ModelFileError(f"cannot read {path}: {exc.strerror or exc}") from exc
    except Exception as exc:  # torch raises UnpicklingError, RuntimeError, EOFError... for other files
        raise ModelFileError(f"{path} is not a checkpoint comneck loads safely (tensors, numbers and plain containers "
                             f"only; {type(exc).__name__}): is it a ComNeck release file?") from exc
    if not isinstance(checkpoint, dict):
        raise ModelFileError(f"{path} holds a {type(checkpoint).__name__}, not a ComNeck release checkpoint "
                             "(a dict with 'state_dict' and 'adapter')")
    for key in ("state_dict", "adapter"):
        if not isinstance(checkpoint.get(key), dict):
            raise ModelFileError(f"{path} has no {key!r} dict: a ComNeck release checkpoint holds the codec "
                                 "('state_dict') and the neck ('adapter')")
    return checkpoint


def release_of(path: Path | str, scenario: str | None = None, quality: int | None = None) -> tuple[str, int]:
    """(scenario ``"d1"``-``"d3"``, quality 1-4) of a released file: those given, else its name ``d{S}_{Q}.pth.tar``."""
    match = RELEASE_NAME.fullmatch(Path(path).name)
    if match is None and (scenario is None or quality is None):
        raise UsageError(f"cannot tell the scenario and quality of {path} from its name: keep the release name "
                         "d{S}_{Q}.pth.tar or give `scenario` and `quality`", params=("scenario", "quality"))
    return (scenario or f"d{match.group(1)}"), int(quality or match.group(2))


def write_release_codec(codec_state: dict[str, Tensor], target: Path, quality: int, scenario: str) -> None:
    """A checked release codec state (:func:`release_codec_state`) -> comneck's codec file ``target`` (safetensors,
    entropy tables built by ``update()``, machine-only for d3, whose g_a was retrained for the neck alone).

    The same state always gives the same bytes on one installation: the digest records carry does not depend on
    whether the release went through ``weights import-comneck`` or ``--weights FILE``.
    """
    from comneck_cli.codecs import save_codec

    model = ElicComneck(**RELEASE_CONFIG)
    model.load_state_dict(codec_state, strict=True)
    save_codec(model, Path(target), "elic-comneck", quality, dict(RELEASE_CONFIG), machine_only=scenario == "d3")


@contextmanager
def converted_release(path: Path, quality: int) -> Iterator[Path]:
    """A raw released file given as codec weights -> a temporary comneck codec file of it (deleted afterwards);
    ``quality`` is what the caller codes at, refused unless it is the file's."""
    scenario, trained_for = release_of(path)
    if trained_for != quality:
        raise MismatchError(f"{path} is the release for quality {trained_for}, not {quality}; pass `quality` "
                            f"{trained_for}", params=("quality",))
    state = release_codec_state(read_checkpoint(path)["state_dict"], str(path))
    with tempfile.TemporaryDirectory(prefix="comneck-release-") as folder:
        converted = Path(folder) / f"elic-comneck-q{quality}-{scenario}.safetensors"
        write_release_codec(state, converted, quality, scenario)
        yield converted
