"""The ComNeck authors' released checkpoints (issue #18): comneck's ELIC and neck against an independent reference.

The reference below is written from the behaviour of the authors' published code (NYCU-MAPL/BridgingCompressionMLLM:
``compressai/models/ELIC.py`` ``ELIC_LLM``, ``examples/adapter_model.py`` ``Linear_Encoder``) step by step as they
compute it: full-resolution zero-filled tensors, index assignments, sequence-first attention. It does not import
comneck_cli.codecs.elic_comneck. Random checkpoints are written in exactly the released layout (``epoch``, ``state_dict``,
``adapter``, ``optimizer``, ``lr_scheduler``), with and without DataParallel's ``module.`` prefix.
"""

from __future__ import annotations

import pickle
from collections import OrderedDict

import pytest
import torch
from torch import nn

from comneck_cli.errors import ComneckError

GROUPS = [0, 16, 16, 32, 64, 192]  # as the authors write them: a leading 0


# --- the reference, from the authors' code's behaviour --------------------------------------------------------

def _conv(i, o, k=5, s=2):
    return nn.Conv2d(i, o, k, s, k // 2)


def _deconv(i, o, k=5, s=2):
    return nn.ConvTranspose2d(i, o, k, s, padding=k // 2, output_padding=s - 1)


class RefBottleneck(nn.Module):  # their ResidualBottleneckBlock
    def __init__(self, n):
        super().__init__()
        self.conv1, self.conv3 = nn.Conv2d(n, n // 2, 1), nn.Conv2d(n // 2, n, 1)
        self.conv2 = nn.Conv2d(n // 2, n // 2, 3, 1, 1)

    def forward(self, x):
        return self.conv3(torch.relu(self.conv2(torch.relu(self.conv1(x))))) + x


class RefCheckboard(nn.Conv2d):  # their CheckboardMaskedConv2d: masks its weight in place on every call
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.register_buffer("mask", torch.zeros_like(self.weight.data))
        self.mask[:, :, 0::2, 1::2] = 1
        self.mask[:, :, 1::2, 0::2] = 1

    def forward(self, x):
        self.weight.data *= self.mask
        return super().forward(x)


class RefElic(nn.Module):
    """ELIC_LLM(N=192, M=320) as the authors compute it (their CompressionModel gives entropy_bottleneck)."""

    def __init__(self, N=192, M=320):
        super().__init__()
        from compressai.entropy_models import EntropyBottleneck, GaussianConditional
        from compressai.layers import AttentionBlock

        b = RefBottleneck
        self.M = M
        self.entropy_bottleneck = EntropyBottleneck(N)
        self.g_a = nn.Sequential(_conv(3, N), b(N), b(N), b(N), _conv(N, N), b(N), b(N), b(N), AttentionBlock(N),
                                 _conv(N, N), b(N), b(N), b(N), _conv(N, M), AttentionBlock(M))
        self.g_s = nn.Sequential(AttentionBlock(M), _deconv(M, N), b(N), b(N), b(N), _deconv(N, N), AttentionBlock(N),
                                 b(N), b(N), b(N), _deconv(N, N), b(N), b(N), b(N), _deconv(N, 3))
        self.h_a = nn.Sequential(nn.Conv2d(M, N, 3, 1, 1), nn.ReLU(), _conv(N, N), nn.ReLU(), _conv(N, N))
        self.h_s = nn.Sequential(_deconv(N, N), nn.ReLU(), _deconv(N, N * 3 // 2), nn.ReLU(),
                                 nn.Conv2d(N * 3 // 2, 2 * M, 3, 1, 1))
        g = GROUPS
        self.cc_transforms = nn.ModuleList(
            nn.Sequential(_conv(g[min(1, i) if i > 0 else 0] + g[i if i > 1 else 0], 224, 5, 1), nn.ReLU(),
                          _conv(224, 128, 5, 1), nn.ReLU(), _conv(128, g[i + 1] * 2, 5, 1))
            for i in range(1, 5))
        self.context_prediction = nn.ModuleList(RefCheckboard(g[i + 1], 2 * g[i + 1], 5, 1, 2) for i in range(5))
        self.ParamAggregation = nn.ModuleList(
            nn.Sequential(nn.Conv2d(640 + g[i + 1 if i > 0 else 0] * 2 + g[i + 1] * 2, 640, 1), nn.ReLU(),
                          nn.Conv2d(640, 512, 1), nn.ReLU(), nn.Conv2d(512, g[i + 1] * 2, 1))
            for i in range(5))
        self.gaussian_conditional = GaussianConditional(None)

    def update(self):
        import math

        self.gaussian_conditional.update_scale_table(torch.exp(torch.linspace(math.log(0.11), math.log(256), 64)),
                                                     force=True)
        self.entropy_bottleneck.update(force=True)

    def _support(self, k, y_hat_slices, latent_means, latent_scales):
        if k == 0:
            return torch.cat([latent_means, latent_scales], 1)
        src = y_hat_slices[0] if k == 1 else torch.cat([y_hat_slices[0], y_hat_slices[k - 1]], 1)
        ch_mean, ch_scale = self.cc_transforms[k - 1](src).chunk(2, 1)
        return torch.cat([ch_mean, ch_scale, latent_means, latent_scales], 1)

    def forward(self, x):  # noisequant=False, eval: what their inference feeds the adapter
        y = self.g_a(x)
        B, C, H, W = y.shape
        z = self.h_a(y)
        z_hat, z_lik = self.entropy_bottleneck(z)
        off = self.entropy_bottleneck._get_medians()
        z_hat = (torch.round(z - off) - (z - off)).detach() + (z - off) + off
        latent_means, latent_scales = self.h_s(z_hat).chunk(2, 1)
        anchor, non_anchor = torch.zeros_like(y), torch.zeros_like(y)
        anchor[:, :, 0::2, 0::2] = y[:, :, 0::2, 0::2]
        anchor[:, :, 1::2, 1::2] = y[:, :, 1::2, 1::2]
        non_anchor[:, :, 0::2, 1::2] = y[:, :, 0::2, 1::2]
        non_anchor[:, :, 1::2, 0::2] = y[:, :, 1::2, 0::2]
        ctx0 = torch.split(torch.zeros(B, C * 2, H, W), [2 * i for i in GROUPS[1:]], 1)
        y_hat_slices, liks = [], []
        for k, (y_slice, ya, yn) in enumerate(zip(y.split(GROUPS[1:], 1), anchor.split(GROUPS[1:], 1),
                                                 non_anchor.split(GROUPS[1:], 1))):
            support = self._support(k, y_hat_slices, latent_means, latent_scales)
            means_a, scales_a = self.ParamAggregation[k](torch.cat([ctx0[k], support], 1)).chunk(2, 1)
            ya_q = torch.round(ya - means_a) - (ya - means_a).detach() + (ya - means_a) + means_a
            ya_q[:, :, 0::2, 1::2] = 0
            ya_q[:, :, 1::2, 0::2] = 0
            means_n, scales_n = self.ParamAggregation[k](
                torch.cat([self.context_prediction[k](ya_q), support], 1)).chunk(2, 1)
            scales, means = scales_a.clone(), means_a.clone()
            scales[:, :, 0::2, 1::2], scales[:, :, 1::2, 0::2] = scales_n[:, :, 0::2, 1::2], scales_n[:, :, 1::2, 0::2]
            means[:, :, 0::2, 1::2], means[:, :, 1::2, 0::2] = means_n[:, :, 0::2, 1::2], means_n[:, :, 1::2, 0::2]
            liks.append(self.gaussian_conditional(y_slice, scales, means=means)[1])
            yn_q = torch.round(yn - means_n) - (yn - means_n).detach() + (yn - means_n) + means_n
            yn_q[:, :, 0::2, 0::2] = 0
            yn_q[:, :, 1::2, 1::2] = 0
            y_hat_slices.append(ya_q + yn_q)
        y_hat = torch.cat(y_hat_slices, 1)
        return {"x_hat": self.g_s(y_hat), "y_hat": y_hat, "likelihoods": {"y": torch.cat(liks, 1), "z": z_lik}}

    def _two_passes(self, y, latent_means, latent_scales, coder):
        """Their compress/decompress loop; ``coder(k, pass, y_half or None, means_half, scales_half)``."""
        _, _, H, W = latent_means.shape
        ctx0 = torch.split(torch.zeros(1, self.M * 2, H, W), [2 * i for i in GROUPS[1:]], 1)
        y_hat_slices = []
        for k in range(5):
            support = self._support(k, y_hat_slices, latent_means, latent_scales)
            means_a, scales_a = self.ParamAggregation[k](torch.cat([ctx0[k], support], 1)).chunk(2, 1)
            g = GROUPS[k + 1]
            enc = lambda t, a: torch.stack(  # noqa: E731 - their y_*_encode: even rows one parity, odd rows the other
                [t[:, :, r, (r + (0 if a else 1)) % 2::2] for r in range(H)], 2)
            ya = None if y is None else enc(y.split(GROUPS[1:], 1)[k], True)
            q = coder(k, 0, ya, enc(means_a, True), enc(scales_a, True))
            anchor_dec = torch.zeros(1, g, H, W)
            anchor_dec[:, :, 0::2, 0::2] = q[:, :, 0::2, :]
            anchor_dec[:, :, 1::2, 1::2] = q[:, :, 1::2, :]
            means_n, scales_n = self.ParamAggregation[k](
                torch.cat([self.context_prediction[k](anchor_dec), support], 1)).chunk(2, 1)
            yn = None if y is None else enc(y.split(GROUPS[1:], 1)[k], False)
            q = coder(k, 1, yn, enc(means_n, False), enc(scales_n, False))
            non_dec = torch.zeros(1, g, H, W)
            non_dec[:, :, 0::2, 1::2] = q[:, :, 0::2, :]
            non_dec[:, :, 1::2, 0::2] = q[:, :, 1::2, :]
            y_hat_slices.append(anchor_dec + non_dec)
        return torch.cat(y_hat_slices, 1)

    def compress_y(self, y):
        z = self.h_a(y)
        z_strings = self.entropy_bottleneck.compress(z)
        z_hat = self.entropy_bottleneck.decompress(z_strings, z.shape[-2:])
        gc, strings = self.gaussian_conditional, []

        def coder(k, p, values, means, scales):
            indexes = gc.build_indexes(scales)
            s = gc.compress(values, indexes, means=means)
            strings.append(s[0])
            return gc.decompress(s, indexes, means=means)

        y_hat = self._two_passes(y, *self.h_s(z_hat).chunk(2, 1), coder)
        return strings + z_strings, y_hat

    def decompress(self, strings, grid):
        z_hat = self.entropy_bottleneck.decompress([strings[-1]], (grid[0] // 4, grid[1] // 4))
        gc, it = self.gaussian_conditional, iter(strings[:-1])

        def coder(k, p, values, means, scales):
            return gc.decompress([next(it)], gc.build_indexes(scales), means=means)

        y_hat = self._two_passes(None, *self.h_s(z_hat).chunk(2, 1), coder)
        return y_hat, self.g_s(y_hat).clamp_(0, 1)


class RefLinearEncoder(nn.Module):
    """Their Linear_Encoder (in_features=320, input_resolution=256): CLIP's embedding and one block, sequence-first."""

    def __init__(self, in_features=320, width=1024):
        super().__init__()
        self.trans_latent_dim = nn.Linear(in_features, width)
        self.class_embedding = nn.Parameter(width**-0.5 * torch.randn(width))
        self.ln_pre = nn.LayerNorm(width)
        self.positional_embedding = nn.Parameter(width**-0.5 * torch.randn(257, width))
        block = nn.Module()
        block.attn = nn.MultiheadAttention(width, width // 64)
        block.ln_1, block.ln_2 = nn.LayerNorm(width), nn.LayerNorm(width)
        block.mlp = nn.Sequential(OrderedDict([("c_fc", nn.Linear(width, 4 * width)),
                                               ("c_proj", nn.Linear(4 * width, width))]))
        self.transformer = nn.Module()
        self.transformer.resblocks = nn.Sequential(OrderedDict([("0", block)]))

    def forward(self, x):
        B, C, H, W = x.shape
        x = self.trans_latent_dim(x.view(B, C, H * W).permute(0, 2, 1))
        x = torch.cat([self.class_embedding + torch.zeros(B, 1, x.shape[-1]), x], 1) + self.positional_embedding
        x = self.ln_pre(x).permute(1, 0, 2)
        blk = self.transformer.resblocks[0]
        h = blk.ln_1(x)
        x = x + blk.attn(h, h, h, need_weights=False)[0]
        h = blk.mlp.c_fc(blk.ln_2(x))
        x = x + blk.mlp.c_proj(h * torch.sigmoid(1.702 * h))  # QuickGELU
        return x.permute(1, 0, 2)


# --- checkpoints in the released layout -------------------------------------------------------------------------

def _old_bottleneck_names(state):
    """CompressAI 1.2.0 (the authors' vendored copy) named the factorized prior's parameters _matrix0, _bias0..."""
    names = {"matrices.": "_matrix", "biases.": "_bias", "factors.": "_factor"}
    out = {}
    for k, v in state.items():
        for new, old in names.items():
            k = k.replace(f"entropy_bottleneck.{new}", f"entropy_bottleneck.{old}")
        out[k] = v
    return out


def _save_release(path, codec_state, adapter_state, *, module=False, old_names=False):
    """torch.save a dict as their train.py does: epoch, state_dict, adapter, optimizer, lr_scheduler."""
    state = _old_bottleneck_names(codec_state) if old_names else dict(codec_state)
    if module:
        state = {f"module.{k}": v for k, v in state.items()}
    param = nn.Parameter(torch.zeros(3))
    optimizer = torch.optim.Adam([param], lr=1e-4)
    param.grad = torch.ones(3)
    optimizer.step()
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=[20], gamma=0.1)  # Counter milestones
    torch.save({"epoch": 39, "state_dict": OrderedDict(state), "adapter": adapter_state,
                "optimizer": optimizer.state_dict(), "lr_scheduler": scheduler.state_dict()}, path)
    return path


@pytest.fixture(scope="module")
def reference():
    """A random ELIC_LLM and Linear_Encoder; weights scaled so the latents carry a few symbols per position."""
    torch.manual_seed(0)
    codec, neck = RefElic().eval(), RefLinearEncoder().eval()
    with torch.no_grad():
        codec.g_a[-2].weight.mul_(40)  # random g_a gives |y| ~ 0.1: everything would round to the mean
        codec.entropy_bottleneck.quantiles.data[:, :, 0] = -4  # a tighter z prior, as training leaves it
        codec.entropy_bottleneck.quantiles.data[:, :, 2] = 4
    return codec, neck


@pytest.fixture(scope="module")
def release_file(reference, tmp_path_factory):
    codec, neck = reference
    return _save_release(tmp_path_factory.mktemp("release") / "d1_1.pth.tar", codec.state_dict(), neck.state_dict(),
                         module=True, old_names=True)


@pytest.fixture(scope="module")
def loaded(reference, release_file):
    """comneck's ElicComneck and TransformNeck loaded (strict) from the release file; the reference updated."""
    from comneck_cli.codecs.elic_comneck import ElicComneck
    from comneck_cli.models.release import read_release

    codec_state, neck = read_release(release_file)
    model = ElicComneck().eval()
    model.load_state_dict(codec_state, strict=True)
    model.update(force=True)
    reference[0].update()
    return model, neck


def _image(side=64):
    torch.manual_seed(1)
    return torch.rand(1, 3, side, side)


# --- the codec ------------------------------------------------------------------------------------------------

@pytest.mark.slow
@torch.no_grad()
def test_forward_y_hat_is_the_references_and_the_coded_one(reference, loaded):
    """The authors' inference feeds the neck forward()'s y_hat: ours equals theirs and what coding gives, exactly."""
    ref, model = reference[0], loaded[0]
    x = _image()
    theirs, ours = ref(x), model(x)
    assert torch.equal(ours["y_hat"], theirs["y_hat"])
    assert torch.equal(ours["likelihoods"]["y"], theirs["likelihoods"]["y"])
    assert torch.equal(ours["x_hat"], theirs["x_hat"])
    assert torch.equal(model.compress(x)[1], ours["y_hat"])


@pytest.mark.slow
@torch.no_grad()
def test_strings_y_hat_and_pixels_match_the_reference(reference, loaded):
    """Same y -> the same 11 strings byte for byte, the same y_hat; decoding either's strings gives the same
    y_hat and pixels; comneck decodes the reference's strings."""
    ref, model = reference[0], loaded[0]
    torch.manual_seed(2)
    y = torch.randn(1, 320, 8, 8) * 6  # a 128² image's grid, coded directly: g_a is checked above
    theirs, their_y_hat = ref.compress_y(y)
    ours, our_y_hat = model.code(y)
    assert len(ours) == 11 and sum(map(len, ours)) > 200  # real symbols, not all-means
    assert ours == theirs
    assert torch.equal(our_y_hat, their_y_hat)
    decoded = model.decompress(theirs, (8, 8))
    ref_y_hat, ref_pixels = ref.decompress(theirs, (8, 8))
    assert torch.equal(decoded, ref_y_hat) and torch.equal(decoded, our_y_hat)
    assert torch.equal(model.g_s(decoded).clamp_(0, 1), ref_pixels)


@pytest.mark.slow
@torch.no_grad()
def test_comneck_codec_codes_like_the_reference(reference, release_file, tmp_path):
    """Through comneck's Codec (save_codec -> load_codec, bounded rANS decoder): the reference's strings and y_hat."""
    from comneck_cli.codecs import load_codec, one_thread, save_codec
    from comneck_cli.codecs.elic_comneck import ElicComneck
    from comneck_cli.models.release import read_release

    model = ElicComneck()
    model.load_state_dict(read_release(release_file)[0], strict=True)
    path = tmp_path / "elic-comneck-q1.safetensors"
    save_codec(model, path, "elic-comneck", 1, {"N": 192, "M": 320})
    codec = load_codec("elic-comneck", 1, weights=path)
    x = _image(128)
    strings, y_hat = codec.compress(x)
    ref = reference[0]
    ref.update()
    y = ref.g_a(x)
    assert torch.equal(codec.analyze(x), y)
    with one_thread():  # comneck computes the entropy parameters on one thread: their floats depend on it
        theirs, their_y_hat = ref.compress_y(y)
    assert [len(s) for s in strings] == [len(s) for s in theirs]
    assert strings == theirs and torch.equal(y_hat, their_y_hat)
    assert torch.equal(codec.decompress_latents(strings, 128, 128), their_y_hat)
    assert codec.latent_channels == 320


# --- the neck ------------------------------------------------------------------------------------------------

@pytest.mark.slow  # two 13 M-parameter necks and open_clip's import: ~30 s on 2 busy cores
@torch.no_grad()
def test_neck_mapping_gives_the_references_tokens():
    """Their sequence-first Linear_Encoder and comneck's batch-first neck under the mapped names: the same tokens."""
    from comneck_cli.models.release import release_neck

    torch.manual_seed(3)
    theirs = RefLinearEncoder().eval()
    ours = release_neck(theirs.state_dict())
    y_hat = torch.round(torch.randn(2, 320, 16, 16) * 3)
    expected, got = theirs(y_hat), ours(y_hat)
    assert got.shape == (2, 257, 1024)
    torch.testing.assert_close(got, expected, rtol=0, atol=2e-5)


# --- wrong files: one sentence ---------------------------------------------------------------------------------

def _layout():
    """Every codec tensor of the released layout at its shape (stride-0 views: tiny files), the real mask."""
    with torch.device("meta"):
        ref = RefElic()
    state = {k: torch.zeros(()).expand(v.shape) for k, v in ref.state_dict().items()}
    for i in range(5):
        state[f"context_prediction.{i}.mask"] = torch.zeros(state[f"context_prediction.{i}.mask"].shape)
        state[f"context_prediction.{i}.mask"][:, :, 0::2, 1::2] = 1
        state[f"context_prediction.{i}.mask"][:, :, 1::2, 0::2] = 1
    with torch.device("meta"):
        neck = RefLinearEncoder()
    return state, {k: torch.zeros(()).expand(v.shape) for k, v in neck.state_dict().items()}


@pytest.fixture(scope="module")
def layout():
    return _layout()


def test_release_layout_reads_with_and_without_module_prefix(layout, tmp_path):
    from comneck_cli.models.release import read_release

    codec, neck = layout
    for module in (False, True):
        codec_state, ours = read_release(_save_release(tmp_path / f"m{module}.pth.tar", codec, neck, module=module))
        assert set(codec_state) == set(codec)
        assert {"proj.weight", "block.attn.in_proj_weight"} <= set(ours.state_dict())


def _error(path) -> str:
    from comneck_cli.models.release import read_release

    with pytest.raises(ComneckError) as info:
        read_release(path)
    message = str(info.value)
    assert "\n" not in message and "Traceback" not in message
    return message


def test_missing_codec_key_is_one_sentence(layout, tmp_path):
    codec, neck = layout
    codec = {k: v for k, v in codec.items() if k != "h_s.4.weight"}
    message = _error(_save_release(tmp_path / "d1_1.pth.tar", codec, neck))
    assert "the codec weights ('state_dict') lack 'h_s.4.weight'" in message


def test_wrong_shape_is_named(layout, tmp_path):
    codec, neck = layout
    codec = {**codec, "cc_transforms.2.0.weight": torch.zeros(224, 80, 5, 5)}  # group 3 reads groups 0 and 2: 48
    message = _error(_save_release(tmp_path / "d1_1.pth.tar", codec, neck))
    assert "'cc_transforms.2.0.weight' has shape (224, 80, 5, 5)" in message and "(224, 48, 5, 5)" in message


def test_wrong_neck_is_named(layout, tmp_path):
    codec, neck = layout
    neck = {**neck, "trans_latent_dim.weight": torch.zeros(1024, 192)}
    message = _error(_save_release(tmp_path / "d1_1.pth.tar", codec, neck))
    assert "the neck ('adapter') is not the ComNeck Linear_Encoder" in message and "proj.weight" in message


def test_wrong_mask_is_refused(layout, tmp_path):
    codec, neck = layout
    codec = {**codec, "context_prediction.0.mask": torch.ones(32, 16, 5, 5)}
    assert "context_prediction.0.mask is not the checkerboard mask" in _error(
        _save_release(tmp_path / "d1_1.pth.tar", codec, neck))


class Payload:
    def __reduce__(self):
        return (print, ("unpickled!",))


def test_pickles_other_than_plain_checkpoints_are_refused(tmp_path, capsys):
    evil = tmp_path / "evil.pth.tar"
    torch.save({"state_dict": {}, "adapter": Payload()}, evil)
    assert "is not a checkpoint comneck loads safely" in _error(evil)
    assert "unpickled!" not in capsys.readouterr().out
    listed = tmp_path / "list.pth.tar"
    torch.save([torch.zeros(1)], listed)
    assert "holds a list, not a ComNeck release checkpoint" in _error(listed)
    no_adapter = tmp_path / "codec-only.pth.tar"
    torch.save({"state_dict": {}}, no_adapter)
    assert "has no 'adapter' dict" in _error(no_adapter)
    garbage = tmp_path / "garbage.pth.tar"
    garbage.write_bytes(pickle.dumps("x", protocol=2)[:3])  # a truncated pickle
    assert "is not a checkpoint comneck loads safely" in _error(garbage)
    assert "cannot read" in _error(tmp_path / "missing.pth.tar")
