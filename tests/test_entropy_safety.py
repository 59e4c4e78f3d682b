"""Issue #22 (items 1 and 5): decoding hostile strings never reads outside them; damaged entropy tables are refused.

comneck decodes every entropy-coded string with its own bounded rANS decoder (comneck_cli/_rans.c), bit-exact with
CompressAI's ``compressai.ans.RansDecoder`` on what CompressAI's encoder writes. The crafted records run the CLI in
a subprocess, so a regression shows as a failed assertion (exit -11 / -8) rather than a dead test session.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from comneck_cli import coding as api
from comneck_cli.codecs import rans
from comneck_cli.codecs import one_thread
from comneck_cli.errors import ComneckError
from comneck_cli.formats import Record, pack


# --------------------------------------------------------------------------- the decoder against CompressAI's
def random_tables(rng: np.random.Generator, rows: int) -> tuple[list[list[int]], list[int], list[int]]:
    """Valid tables as CompressAI builds them: ``pmf_to_quantized_cdf`` of a pmf plus its tail mass, zero-padded."""
    from compressai.entropy_models.entropy_models import pmf_to_quantized_cdf

    cdfs = []
    for _ in range(rows):
        pmf = rng.random(int(rng.integers(1, 40))) ** 3
        pmf = pmf / pmf.sum() * (1 - 1e-3)
        cdfs.append(pmf_to_quantized_cdf(torch.tensor([*pmf, 1e-3]), 16).tolist())
    width = max(map(len, cdfs)) + int(rng.integers(0, 3))
    return ([c + [0] * (width - len(c)) for c in cdfs], [len(c) for c in cdfs],
            [int(rng.integers(-30, 5)) for _ in cdfs])


def random_message(rng: np.random.Generator, lengths: list[int], offsets: list[int], n: int):
    """Indexes and symbols, a fifth of them outside their table (bypass-coded), up to 2**26 away (CompressAI's
    encoder never returns for values of 2**27 or more: its nibble count loop shifts a uint32 by 32)."""
    indexes = rng.integers(0, len(lengths), n).tolist()
    symbols = []
    for i in indexes:
        if rng.random() < 0.2:
            symbols.append(int(rng.choice([-1, 1]) * rng.integers(0, 2 ** int(rng.integers(1, 27)))))
        else:
            symbols.append(int(rng.integers(offsets[i], offsets[i] + lengths[i] - 2)))
    return indexes, symbols



def test_an_owned_decoder_reuses_its_tables_only_while_they_are_the_owners():
    """The per-model table cache: refreshed when the owner's buffers change, bypassed for other tables."""
    from types import SimpleNamespace

    from compressai.ans import RansEncoder

    rng = np.random.default_rng(5)

    def owner_of(cdfs, lengths, offsets):
        width = max(map(len, cdfs))
        padded = [row + [0] * (width - len(row)) for row in cdfs]
        return SimpleNamespace(_quantized_cdf=torch.tensor(padded, dtype=torch.int32),
                               _cdf_length=torch.tensor(lengths, dtype=torch.int32),
                               _offset=torch.tensor(offsets, dtype=torch.int32))

    def message(tables):
        cdfs, lengths, offsets = tables
        indexes, symbols = random_message(rng, lengths, offsets, 64)
        return indexes, symbols, RansEncoder().encode_with_indexes(symbols, indexes, cdfs, lengths, offsets)

    first, second = random_tables(rng, 3), random_tables(rng, 3)
    owner = owner_of(*first)
    decoder = rans.RansDecoder(owner)

    def as_passed(holder):  # what CompressAI passes: an entropy model's buffers as lists
        return holder._quantized_cdf.tolist(), holder._cdf_length.tolist(), holder._offset.tolist()

    for tables in (first, second):
        new = owner_of(*tables)
        for name in ("_quantized_cdf", "_cdf_length", "_offset"):  # in place, as update() rewrites buffers
            getattr(owner, name).resize_(getattr(new, name).shape).copy_(getattr(new, name))
        indexes, symbols, string = message(tables)
        assert decoder.decode_with_indexes(string, indexes, *as_passed(owner)).tolist() == symbols
    indexes, symbols, string = message(first)  # tables that are not the owner's (now ``second``) still decode
    assert decoder.decode_with_indexes(string, indexes, *as_passed(owner_of(*first))).tolist() == symbols

def test_bounded_decoder_equals_compressai_on_valid_strings():
    from compressai.ans import RansDecoder, RansEncoder

    rng = np.random.default_rng(22)
    for _ in range(40):
        cdfs, lengths, offsets = random_tables(rng, int(rng.integers(1, 8)))
        # CompressAI's encoder buffers one word per symbol and writes its 2-word flush before that buffer when a
        # message is shorter than its code (a heap overflow for 0 or a few symbols): messages of 32 or more
        indexes, symbols = random_message(rng, lengths, offsets, int(rng.integers(32, 400)))
        string = RansEncoder().encode_with_indexes(symbols, indexes, cdfs, lengths, offsets)
        expected = RansDecoder().decode_with_indexes(string, indexes, cdfs, lengths, offsets)
        assert expected == symbols
        ours = rans.RansDecoder()
        assert ours.decode_with_indexes(string, indexes, cdfs, lengths, offsets).tolist() == expected
        # the streaming pair, in uneven chunks, as an autoregressive decoder calls it
        theirs = RansDecoder()
        theirs.set_stream(string)
        ours.set_stream(string)
        cuts = sorted(rng.integers(0, len(indexes) + 1, 3).tolist())
        for lo, hi in zip([0, *cuts], [*cuts, len(indexes)]):
            part = indexes[lo:hi]
            assert ours.decode_stream(part, cdfs, lengths, offsets) == theirs.decode_stream(part, cdfs, lengths, offsets)


@pytest.fixture(scope="module")
def fuzz_tables():
    rng = np.random.default_rng(7)
    cdfs, lengths, offsets = random_tables(rng, 6)
    indexes, symbols = random_message(rng, lengths, offsets, 300)
    from compressai.ans import RansEncoder

    valid = RansEncoder().encode_with_indexes(symbols, indexes, cdfs, lengths, offsets)
    return rans.tables_of(cdfs, lengths, offsets), indexes, symbols, valid


def crafted_strings(valid: bytes):
    return st.one_of(
        st.just(b""),
        st.binary(max_size=7),
        st.integers(1, 4096).map(lambda n: b"\xff" * n),
        st.binary(max_size=512),
        st.integers(0, len(valid) - 1).map(lambda n: valid[:n]),
        st.tuples(st.integers(0, len(valid) - 1), st.integers(0, 255)).map(
            lambda t: valid[: t[0]] + bytes([t[1]]) + valid[t[0] + 1 :]),
    )


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_crafted_strings_decode_or_fail_cleanly_and_never_read_past_the_end(fuzz_tables, data):
    """Any string: symbols or RansError. When it decodes, it read only its own words: bytes appended after it
    change nothing (an out-of-bounds read would see them)."""
    tables, indexes, _, valid = fuzz_tables
    string = data.draw(crafted_strings(valid))
    n = data.draw(st.integers(0, len(indexes)))
    try:
        symbols = rans.decode(string, indexes[:n], tables)
    except rans.RansError as exc:
        assert str(exc) in {"the entropy-coded string ends early",
                            "the entropy-coded string holds an escape longer than any encoder writes"}
        return
    assert symbols.shape == (n,)
    tail = data.draw(st.binary(min_size=8, max_size=64))
    assert rans.decode(string + tail, indexes[:n], tables).tolist() == symbols.tolist()


def test_the_issues_strings_are_refused(fuzz_tables):
    tables, indexes, symbols, valid = fuzz_tables
    assert rans.decode(valid, indexes, tables).tolist() == symbols
    with pytest.raises(rans.RansError, match="ends early"):
        rans.decode(b"", indexes, tables)
    with pytest.raises(rans.RansError, match="ends early"):
        rans.decode(valid[:-4], indexes, tables)  # the last word missing
    with pytest.raises(rans.RansError, match="ends early"):
        rans.Stream(b"\x00" * 7)
    # 0xFF: every cum_freq is the top one, every symbol an escape whose count nibble is 0xF
    with pytest.raises(rans.RansError, match="escape longer than any encoder writes"):
        rans.decode(b"\xff" * 64, indexes, tables)


def test_indexes_and_tables_out_of_range_are_refused(fuzz_tables):
    tables, indexes, _, valid = fuzz_tables
    with pytest.raises(rans.RansError, match=r"entropy table index 6 is outside 0\.\.5"):
        rans.decode(valid, [0, 6], tables)
    with pytest.raises(rans.RansError, match="index -1"):
        rans.decode(valid, [-1], tables)
    good = [0, 10, 65536, 0]
    for cdf, length, offset, problem in [
        ([0, 0, 0, 0], 3, 0, "not strictly increasing"),
        ([0, 9, 5, 65536], 4, 0, "not strictly increasing"),
        ([1, 10, 65536, 0], 3, 0, "does not start at 0"),
        ([0, 10, 65535, 0], 3, 0, "does not end at 1 << 16"),
        (good, 2, 0, "outside 3..row width"),
        (good, 5, 0, "outside 3..row width"),
        (good, 3, 1 << 25, "offset is out of range"),
    ]:
        with pytest.raises(ValueError, match=problem):
            rans.tables_of([good, cdf], [3, length], [0, offset])


# --------------------------------------------------------------------------- every codec decodes through it
def test_every_entropy_model_of_a_loaded_codec_decodes_through_comneck(codec_files):
    for name, path in codec_files.items():
        codec = api.load_codec(name, 1, weights=path)
        coders = [m.entropy_coder for m in codec.model.modules() if hasattr(m, "entropy_coder")]
        assert coders and all(isinstance(c._decoder, rans.RansDecoder) for c in coders), name


def test_autoregressive_decoding_is_compressais_bit_for_bit(codec_files, photos):
    codec = api.load_codec("cheng2020-anchor", 1, weights=codec_files["cheng2020-anchor"])
    image = np.asarray(Image.open(photos["astronaut"]).convert("RGB").resize((128, 128)))
    record = api.encode(image, codec)
    ours = api.decode_latents(record, codec)
    model, pad = codec.model, 2
    y_hat = torch.zeros((1, model.M, 8 + 2 * pad, 8 + 2 * pad))
    with torch.inference_mode(), one_thread():  # as decode_latents runs h_s and the context model
        z_hat = model.entropy_bottleneck.decompress([record.strings[1]], (2, 2))
        model._decompress_ar(record.strings[0], y_hat, model.h_s(z_hat), 8, 8, 5, pad)  # compressai.ans
    assert torch.equal(ours, y_hat[..., pad:-pad, pad:-pad])


def mutants(record: Record, rng: np.random.Generator, count: int) -> list[Record]:
    """Records with the right CRC (pack recomputes it) and broken strings: truncated, emptied, bytes changed,
    extended, strings swapped."""
    out = []
    for k in range(count):
        strings = list(record.strings)
        i = k % len(strings)
        s = strings[i]
        kind = k % 5
        if kind == 0:
            strings[i] = s[: int(rng.integers(0, len(s)))]
        elif kind == 1:
            strings[i] = b""
        elif kind == 2 and s:
            pos = int(rng.integers(0, len(s)))
            strings[i] = s[:pos] + bytes([int(rng.integers(0, 256))]) + s[pos + 1 :]
        elif kind == 3:
            strings[i] = s + rng.bytes(int(rng.integers(1, 9)))
        else:
            strings = [strings[-1], *strings[:-1]]
        out.append(dataclasses.replace(record, strings=tuple(strings)))
    return out


@pytest.mark.parametrize("name", ["bmshj2018-hyperprior", "mbt2018-mean", "cheng2020-anchor",
                                  "elic2022-official", "mbt2018-mean-vbr"])
def test_mutated_records_with_a_valid_crc_decode_or_fail_with_one_error(name, codec_files, photos):
    codec = api.load_codec(name, 1, weights=codec_files[name])
    image = np.asarray(Image.open(photos["chelsea"]).convert("RGB").resize((64, 64)))
    record = api.encode(image, codec)
    failures = 0
    for mutant in mutants(record, np.random.default_rng(1), 25):
        try:
            y_hat = api.decode_latents(mutant, codec)
        except ComneckError as exc:
            assert "the record is corrupt" in str(exc) and "\n" not in str(exc)
            failures += 1
        else:
            assert y_hat.shape[-2:] == (4, 4)
    assert failures >= 5  # at least the emptied strings


# --------------------------------------------------------------------------- the issue's records, end to end
def comneck(*args, home: Path) -> subprocess.CompletedProcess:
    import os

    return subprocess.run([sys.executable, "-m", "comneck_cli", *map(str, args)], capture_output=True, text=True,
                          env={**os.environ, "COMNECK_HOME": str(home)}, timeout=300)


def one_error_line(result: subprocess.CompletedProcess, text: str) -> None:
    assert result.returncode == 1, (result.returncode, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("comneck: error: ") and text in lines[0], result.stderr


@pytest.mark.slow
def test_the_26_byte_record_for_the_shipped_codec_is_one_error(tmp_path):
    codec = api.load_codec("mbt2018-mean-vbr", 4)
    record = Record(codec_id=codec.spec.codec_id, quality=codec.quality, weights_digest=codec.digest,
                    height=1024, width=1024, strings=(b"", b""), rate=codec.stored_rate)
    path = tmp_path / "empty.cnk"
    path.write_bytes(pack(record))
    assert path.stat().st_size == 26
    result = comneck("decode", path, "-o", tmp_path / "out.png", home=tmp_path / "home")
    one_error_line(result, "entropy decoding failed (the entropy-coded string ends early); the record is corrupt")
    assert not (tmp_path / "out.png").exists()


@pytest.mark.slow
def test_batch_decode_records_hostile_records_and_decodes_the_rest(tmp_path, codec_files, photos):
    weights = codec_files["mbt2018-mean"]
    codec = api.load_codec("mbt2018-mean", 1, weights=weights)
    image = np.asarray(Image.open(photos["coffee"]).convert("RGB").resize((64, 64)))
    record = api.encode(image, codec)
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "a_good.cnk").write_bytes(pack(record))
    (folder / "b_empty.cnk").write_bytes(pack(dataclasses.replace(record, strings=(b"", b""), height=1024,
                                                                 width=1024)))
    (folder / "c_ff.cnk").write_bytes(pack(dataclasses.replace(record, strings=(b"\xff" * 4096, b"\xff" * 64))))
    (folder / "d_good.cnk").write_bytes(pack(record))
    out = tmp_path / "out"
    result = comneck("batch", "decode", "--input", folder, "--output", out, "--weights", weights,
                     home=tmp_path / "home")
    assert result.returncode == 1 and "2 done, 0 skipped, 2 failed" in result.stderr, result.stderr
    assert sorted(p.name for p in out.glob("*.png")) == ["a_good.png", "d_good.png"]
    errors = [json.loads(line) for line in (out / "errors.jsonl").read_text().splitlines()]
    assert sorted(Path(e["path"]).name for e in errors) == ["b_empty.cnk", "c_ff.cnk"], errors
    assert all("the record is corrupt" in e["reason"] for e in errors), errors
    result = comneck("decode", folder / "c_ff.cnk", "-o", tmp_path / "ff.png", "--weights", weights,
                     home=tmp_path / "home")
    one_error_line(result, "escape longer than any encoder writes")
    assert np.array_equal(np.asarray(Image.open(out / "a_good.png")), api.decode(record, codec))


# --------------------------------------------------------------------------- damaged entropy tables in a file
def damaged_file(source: Path, target: Path, key: str, damage) -> Path:
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(str(source), "pt") as f:
        meta = f.metadata()
    state = load_file(str(source))
    state[key] = damage(state[key].clone())
    save_file(state, str(target), metadata=meta)
    return target


def _non_monotone(cdf):
    cdf[3, 1], cdf[3, 2] = cdf[3, 2], cdf[3, 1]
    return cdf


def _too_long(lengths):
    lengths[0] = 10**6
    return lengths


def _nan(table):
    table[1] = float("nan")
    return table


DAMAGE = {
    "zeroed CDFs": ("gaussian_conditional._quantized_cdf", torch.zeros_like, "not strictly increasing"),
    "non-monotone CDF": ("gaussian_conditional._quantized_cdf", _non_monotone, "row 3 is not a valid CDF"),
    "zeroed bottleneck CDFs": ("entropy_bottleneck._quantized_cdf", torch.zeros_like, "entropy_bottleneck: "),
    "CDF length past the row": ("entropy_bottleneck._cdf_length", _too_long, "outside 3..row width"),
    "NaN scale table": ("gaussian_conditional.scale_table", _nan, "scale table is not positive, finite"),
    "NaN quantiles": ("entropy_bottleneck.quantiles", _nan, "quantiles are not finite"),
    "missing rows": ("gaussian_conditional._quantized_cdf", lambda c: c[:10].clone(), "for 64 distributions"),
}


@pytest.mark.parametrize("kind", list(DAMAGE))
def test_damaged_entropy_tables_are_refused_at_load(kind, codec_files, tmp_path):
    key, damage, text = DAMAGE[kind]
    path = damaged_file(codec_files["mbt2018-mean"], tmp_path / "damaged.safetensors", key, damage)
    with pytest.raises(ComneckError) as info:
        api.load_codec("mbt2018-mean", 1, weights=path)
    message = str(info.value)
    assert message.startswith(f"codec weights {path}: the entropy tables are damaged") and text in message


@pytest.mark.slow
def test_zeroed_tables_are_one_error_line_for_encode_and_decode(codec_files, photos, tmp_path):
    """Zeroed tables used to kill `comneck encode` with SIGFPE (a zero frequency divides in CompressAI's encoder)."""
    key, damage, _ = DAMAGE["zeroed CDFs"]
    path = damaged_file(codec_files["mbt2018-mean"], tmp_path / "zeroed.safetensors", key, damage)
    good = tmp_path / "good.cnk"
    codec = api.load_codec("mbt2018-mean", 1, weights=codec_files["mbt2018-mean"])
    good.write_bytes(pack(api.encode(np.zeros((64, 64, 3), np.uint8), codec)))
    home = tmp_path / "home"
    expected = f"codec weights {path}: the entropy tables are damaged"
    one_error_line(comneck("encode", photos["chelsea"], "-o", tmp_path / "x.cnk", "--codec", "mbt2018-mean", "-q", "1",
                           "--weights", path, home=home), expected)
    one_error_line(comneck("decode", good, "-o", tmp_path / "x.png", "--weights", path, home=home), expected)
    assert not (tmp_path / "x.cnk").exists() and not (tmp_path / "x.png").exists()
