"""Semantic-guided coding (CoTAM): CLIP attention -> importance map -> per-position gain -> record with map section."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from comneck_cli import coding as api
from comneck_cli.codecs import load_codec
from comneck_cli.errors import ComneckError
from comneck_cli.io.images import read_image
from comneck_cli.coding.semantic import Guide, bits_per_position, gain_map, levels_on_grid, quantise, semantic_map
from comneck_cli.formats import CnkError, ImportanceMap, latent_grids, pack, unpack
from comneck_cli.formats.container import CRITICAL_BIT, TAG_IMPORTANCE_MAP
from comneck_cli.formats.varint import encode_varint

from .conftest import TINY_CLIP


@pytest.fixture(scope="module")
def vbr(vbr_codec_file):
    return load_codec("mbt2018-mean-vbr", 3, weights=vbr_codec_file)


@pytest.fixture(scope="module")
def guide(tiny_clip_file):
    from comneck_cli.clip.tower import load_clip

    return Guide(load_clip(TINY_CLIP, None, weights_file=tiny_clip_file))


# --------------------------------------------------------------------------- the section payload
maps = st.integers(1, 8).flatmap(lambda bits: st.builds(
    lambda block, strength, h, w, data: (block, bits, strength, h, w, data),
    st.integers(1, 6), st.integers(0, 0xFFFF), st.integers(1, 700), st.integers(1, 700), st.data()))


@settings(max_examples=60, deadline=None)
@given(maps)
def test_importance_map_payload_round_trips_inside_a_record(case):
    block, bits, strength, height, width, data = case
    rows, cols = ImportanceMap.grid(height, width, block)
    levels = data.draw(st.binary(min_size=rows * cols, max_size=rows * cols).map(
        lambda b: bytes(v % (1 << bits) for v in b)))
    imap = ImportanceMap(block=block, bits=bits, strength=strength, rows=rows, cols=cols, levels=levels)
    assert ImportanceMap.unpack(imap.pack(), height, width) == imap
    record = api.Record(codec_id=12, quality=3, weights_digest=b"abcd", height=height, width=width,
                        strings=(b"y", b"z"), rate=3000, importance_map=imap.pack())
    back = unpack(pack(record))
    assert back == record and ImportanceMap.unpack(back.importance_map, height, width) == imap


def test_importance_map_section_is_critical_and_damage_is_refused():
    assert TAG_IMPORTANCE_MAP & CRITICAL_BIT
    imap = ImportanceMap(block=2, bits=4, strength=1500, rows=4, cols=4, levels=bytes(range(16)))
    good = imap.pack()
    assert ImportanceMap.unpack(good, 128, 128) == imap  # y grid 8×8 in cells of 2×2 positions
    for bad, message in ((good[:3], "shorter"), (b"\x02" + good[1:], "layout 2"),
                         (good + b"x", "exactly"), (good[:5] + b"garbage", "inflate"),
                         (good[:5] + __import__("zlib").compress(bytes(15)), "exactly"),
                         (good[:2] + b"\x03" + good[3:], "exceeds")):
        with pytest.raises(CnkError, match=message):
            ImportanceMap.unpack(bad, 128, 128)
    with pytest.raises(CnkError, match="exactly"):
        ImportanceMap.unpack(good, 192, 128)  # another image size: the grid does not fit


# --------------------------------------------------------------------------- the map
def test_attention_is_class_token_to_patches_averaged_over_heads(guide):
    """Recompute block b's attention from its in_proj weights by hand: softmax(q k^T / sqrt(d)) per head, mean."""
    x = torch.rand(2, 3, 56, 56)
    visual = guide.clip.visual
    with torch.no_grad():
        tokens = guide.head(guide._prep(x))
        block = visual.transformer.resblocks[guide.block - 1]
        h = block.ln_1(tokens)
        heads, width = block.attn.num_heads, h.shape[-1]
        q, k, _ = torch.nn.functional.linear(h, block.attn.in_proj_weight, block.attn.in_proj_bias).chunk(3, -1)
        q = q.reshape(2, -1, heads, width // heads).transpose(1, 2)
        k = k.reshape(2, -1, heads, width // heads).transpose(1, 2)
        weights = torch.softmax(q @ k.transpose(-1, -2) / (width // heads) ** 0.5, dim=-1).mean(1)
    expected = weights[:, 0, 1:].reshape(2, 4, 4)
    assert torch.allclose(guide.attention(x), expected, atol=1e-6)


def test_importance_lies_on_the_latent_grid_with_zero_padding(guide, photos):
    image = read_image(photos["chelsea"])  # 300×451: padded to 320×512, y grid 20×32, image rows 0.6..19.4
    m = guide.importance(image)
    assert m.shape == latent_grids(300, 451)[0]
    assert m.min() == 0 and m.max() == pytest.approx(1)
    assert not m[:, -1].any()  # the right padding column (451 -> 512: 30 px each side, 1 latent) is 0


def test_hierarchical_guidance_fuses_global_and_local_maps_tile_by_tile(guide, photos):
    """Above local_above (112 px for the 56-px CLIP) CLIP-sized tiles add local detail; the number of tiles per
    forward pass (what bounds memory) does not change the map."""
    import dataclasses

    image = read_image(photos["chelsea"])
    fused = guide.importance(image)
    global_only = dataclasses.replace(guide, fuse=1.0).importance(image)
    local_only = dataclasses.replace(guide, fuse=0.0).importance(image)
    inside = np.s_[0:19, 1:30]  # chelsea's 300×451 pixels: rows 10..309 and columns 30..480 of 320×512
    assert not fused[19:].any() and not fused[:, 0].any() and not fused[:, 30:].any()
    mixed = (global_only + local_only)[inside]
    assert np.corrcoef(fused[inside].ravel(), mixed.ravel())[0, 1] > 0.9999  # their mean, renormalised
    assert not np.allclose(global_only, local_only, atol=0.05)
    one_at_a_time = dataclasses.replace(guide, tile_batch=1).importance(image)
    assert np.allclose(one_at_a_time, fused, atol=1e-5)


def test_quantise_averages_cells_and_levels_cover_the_range():
    m = np.zeros((20, 32))
    m[:10, :16] = 1.0
    imap = quantise(m, 300, 451, 2.0, block=4, bits=3)
    assert (imap.rows, imap.cols, imap.strength) == (5, 8, 2000)
    cells = np.frombuffer(imap.levels, np.uint8).reshape(5, 8)
    assert cells[0, 0] == 7 and cells[4, 7] == 0 and cells[2, 0] == 4  # rows 8..11: half ones -> 3.5 -> 4
    assert levels_on_grid(imap, (20, 32)).shape == (20, 32)


# --------------------------------------------------------------------------- coding
def test_semantic_record_decodes_to_exactly_the_encoders_y_hat(vbr, guide, photos):
    image = read_image(photos["chelsea"])
    codec = vbr.at_rate(3.4)
    imap = semantic_map(image, guide, 1.5)
    y = codec.analyze(api.to_tensor(image, 64))
    gain = gain_map(codec.model, codec.rate, imap, tuple(y.shape[-2:]))
    _, y_hat = codec.code(y, gain=gain)
    record = unpack(pack(api.encode(image, codec, importance=imap)))
    assert record.importance_map == imap.pack()
    decoder = api.CodecCache(weights=vbr.source).for_record(record)
    assert torch.equal(api.decode_latents(record, decoder), y_hat)
    # the map is part of the record and so of its bpp
    plain = api.encode(image, codec)
    section = 1 + len(encode_varint(len(imap.pack()))) + len(imap.pack())  # tag, length, payload
    assert record.overhead_bytes() == plain.overhead_bytes() + section


def test_gain_stays_inside_the_trained_range(vbr):
    imap = ImportanceMap(block=1, bits=1, strength=0xFFFF, rows=2, cols=2, levels=bytes([0, 1, 1, 0]))
    g = gain_map(vbr.model, 4.0, imap, (2, 2))
    trained = vbr.model.Gain.detach().abs()
    assert g.min() == pytest.approx(float(trained.min())) and g.max() == pytest.approx(float(trained.max()))


def test_bits_move_to_the_important_region_at_about_equal_total_rate(vbr, guide, photos):
    """The required outcome: at equal total bpp (rate searched), bits per latent position (from the Gaussian
    likelihoods of the coded symbols) rise where the map is high and fall where it is low."""
    image = read_image(photos["astronaut"])
    imap = semantic_map(image, guide, 2.0)
    semantic = api.encode(image, vbr.at_rate(5), importance=imap)
    plain = api.encode_to_bpp(image, vbr, semantic.bits_per_pixel, tolerance=0.02)
    assert abs(plain.bits_per_pixel - semantic.bits_per_pixel) <= 0.02 * semantic.bits_per_pixel

    y = vbr.analyze(api.to_tensor(image, 64))
    grid = tuple(y.shape[-2:])
    m = levels_on_grid(imap, grid)
    at_semantic = vbr.at_rate(semantic.rate / 1000)
    with_map = bits_per_position(vbr.model, y, gain_map(vbr.model, at_semantic.rate, imap, grid)).numpy()
    without = bits_per_position(vbr.model, y, vbr.at_rate(plain.rate / 1000).gain).numpy()
    high, low = m >= np.quantile(m, 0.75), m <= np.quantile(m, 0.25)
    assert with_map[high].mean() > 1.08 * without[high].mean(), (with_map[high].mean(), without[high].mean())
    assert with_map[low].mean() < 0.92 * without[low].mean(), (with_map[low].mean(), without[low].mean())


def test_decoding_refuses_a_damaged_map_and_a_map_on_a_fixed_rate_codec(vbr, guide, photos, codec_files):
    import dataclasses

    image = read_image(photos["chelsea"])
    record = api.encode(image, vbr, importance=semantic_map(image, guide, 1.0))
    damaged = dataclasses.replace(record, importance_map=record.importance_map[:5] + b"\x00")
    with pytest.raises(ComneckError, match="importance map"):
        api.decode_latents(damaged, vbr)
    fixed = load_codec("mbt2018-mean", 1, weights=codec_files["mbt2018-mean"])
    with pytest.raises(ComneckError, match="variable-rate"):
        api.encode(image, fixed, importance=semantic_map(image, guide, 1.0))
    plain = dataclasses.replace(api.encode(image, fixed), importance_map=record.importance_map)
    with pytest.raises(ComneckError, match="not a variable-rate codec"):
        api.decode_latents(plain, fixed)


# --------------------------------------------------------------------------- command line
def test_batch_encode_semantic_writes_what_encode_writes_and_resumes_by_guidance(vbr_codec_file, tiny_clip_file,
                                                                                 photos, tmp_path):
    import shutil

    from click.testing import CliRunner

    from comneck_cli.cli import main

    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    for name in ("coffee", "chelsea"):
        shutil.copy(photos[name], src / photos[name].name)
    runner = CliRunner()
    codec = ["--codec", "mbt2018-mean-vbr", "--weights", str(vbr_codec_file), "--rate", "3", "--quiet"]
    clip = ["--clip", TINY_CLIP, "--clip-tag", "none", "--clip-weights", str(tiny_clip_file)]
    base = ["batch", "encode", "--input", str(src), "--output", str(out), *codec]

    def outputs() -> dict[str, bytes]:
        return {p.name: p.read_bytes() for p in sorted(out.glob("*.cnk"))}

    result = runner.invoke(main, [*base, "--semantic", "--semantic-strength", "2", *clip])
    assert result.exit_code == 0, result.output
    batched = outputs()
    for name in ("coffee", "chelsea"):  # the same record `comneck encode` writes (different sizes: one g_a each)
        single = tmp_path / f"{name}.cnk"
        result = runner.invoke(main, ["encode", str(photos[name]), *codec, "--semantic", "--semantic-strength", "2",
                                      *clip, "-o", str(single)])
        assert result.exit_code == 0, result.output
        assert batched[f"{name}.cnk"] == single.read_bytes()
    stamp = {p: p.stat().st_mtime_ns for p in out.glob("*.cnk")}
    assert runner.invoke(main, [*base, "--semantic", "--semantic-strength", "2", *clip]).exit_code == 0
    assert stamp == {p: p.stat().st_mtime_ns for p in out.glob("*.cnk")}  # done already: skipped
    # Another strength, or no guidance, is other work: the records are redone, not skipped.
    assert runner.invoke(main, [*base, "--semantic", "--semantic-strength", "1", *clip]).exit_code == 0
    records = [unpack(data) for data in outputs().values()]
    assert {ImportanceMap.unpack(r.importance_map, r.height, r.width).strength for r in records} == {1000}
    assert runner.invoke(main, base).exit_code == 0
    assert all(unpack(data).importance_map is None for data in outputs().values())
    result = runner.invoke(main, ["batch", "encode", "--input", str(src), "--output", str(tmp_path / "x"),
                                  "--codec", "mbt2018-mean", "--semantic", *clip])
    assert result.exit_code != 0 and "--semantic needs a variable-rate codec" in result.output
    assert not (tmp_path / "x").exists()
    assert "Traceback" not in result.output and result.output.lower().count("error") == 1  # one line: a usage error (exit 2)


def test_cli_encode_semantic_and_decode(vbr_codec_file, tiny_clip_file, photos, tmp_path):
    from click.testing import CliRunner

    from comneck_cli.cli import main

    runner = CliRunner()
    args = ["encode", str(photos["coffee"]), "--codec", "mbt2018-mean-vbr", "--weights", str(vbr_codec_file),
            "--clip", TINY_CLIP, "--clip-tag", "none", "--clip-weights", str(tiny_clip_file), "--quiet"]
    out = runner.invoke(main, [*args, "--semantic", "--semantic-strength", "2", "--rate", "4",
                               "-o", str(tmp_path / "s.cnk")])
    assert out.exit_code == 0, out.output
    record = unpack((tmp_path / "s.cnk").read_bytes())
    assert ImportanceMap.unpack(record.importance_map, record.height, record.width).strength == 2000
    out = runner.invoke(main, ["decode", str(tmp_path / "s.cnk"), "--weights", str(vbr_codec_file),
                               "-o", str(tmp_path / "s.png"), "--quiet"])
    assert out.exit_code == 0, out.output
    decoded = read_image(tmp_path / "s.png")
    assert decoded.shape == read_image(photos["coffee"]).shape
    out = runner.invoke(main, [*args, "--semantic", "--bpp-target", "0.4", "-o", str(tmp_path / "b.cnk")])
    assert out.exit_code == 0, out.output
    assert abs(unpack((tmp_path / "b.cnk").read_bytes()).bits_per_pixel - 0.4) <= 0.02
    for bad, message in ((["--semantic-strength", "2"], "needs --semantic"),
                         (["--semantic", "--codec", "mbt2018-mean"], "variable-rate")):
        out = runner.invoke(main, [*args, *bad, "-o", str(tmp_path / "x.cnk")])
        assert out.exit_code != 0 and message in out.output and "Traceback" not in out.output
        assert not (tmp_path / "x.cnk").exists()
