"""Codec registry and entropy coding: y_hat survives the round trip bit for bit."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from comneck_cli import ComneckError, decode, decode_latents, encode, load_codec, read_image
from comneck_cli.codecs import CODECS
from comneck_cli.io.images import to_tensor
from comneck_cli.formats import PAD_MULTIPLE, latent_grids, pack, unpack

from .conftest import TINY_CODECS


@pytest.fixture(params=sorted(TINY_CODECS))
def codec(request, codec_files):
    return load_codec(request.param, 1, weights=codec_files[request.param])


def _with_threads(n: int, fn, *args):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        return fn(*args)
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("enc_threads,dec_threads", [(1, 2), (2, 1)])
def test_decoder_recovers_encoders_y_hat_bit_identically(codec, photos, enc_threads, dec_threads):
    image = read_image(photos["chelsea"])  # 451×300: exercises padding
    strings, y_hat = _with_threads(enc_threads, codec.compress, to_tensor(image, PAD_MULTIPLE))
    record = unpack(pack(encode(image, codec)))
    assert list(record.strings) == strings  # encoding is deterministic
    decoded = _with_threads(dec_threads, decode_latents, record, codec)
    assert decoded.shape == (1, codec.latent_channels, *latent_grids(*image.shape[:2])[0])
    assert decoded.dtype == y_hat.dtype == torch.float32
    assert torch.equal(decoded, y_hat)


def test_elic_writes_eleven_strings(codec_files, photos):
    codec = load_codec("elic2022-official", 1, weights=codec_files["elic2022-official"])
    record = encode(read_image(photos["coffee"]), codec)
    assert len(record.strings) == 11


def test_elic_container_overhead_at_256_is_at_most_40_bytes(codec_files, photos):
    codec = load_codec("elic2022-official", 1, weights=codec_files["elic2022-official"])
    record = encode(read_image(photos["astronaut"])[128:384, 128:384], codec)
    assert (record.height, record.width) == (256, 256)
    assert record.overhead_bytes() == len(pack(record)) - sum(map(len, record.strings)) <= 40


def test_record_from_other_weights_is_refused(codec_files, other_weights, photos):
    a = load_codec("mbt2018-mean", 1, weights=codec_files["mbt2018-mean"])
    b = load_codec("mbt2018-mean", 1, weights=other_weights)
    assert a.digest != b.digest
    record = encode(read_image(photos["rocket"]), a)
    with pytest.raises(ComneckError, match="codec weights"):
        decode(record, b)


def test_record_from_other_codec_is_refused(codec_files, photos):
    a = load_codec("mbt2018-mean", 1, weights=codec_files["mbt2018-mean"])
    b = load_codec("bmshj2018-hyperprior", 1, weights=codec_files["bmshj2018-hyperprior"])
    with pytest.raises(ComneckError, match="mbt2018-mean quality 1, not bmshj2018-hyperprior"):
        decode(encode(read_image(photos["rocket"]), a), b)


def test_decode_crops_back_to_original_size(codec_files, photos):
    codec = load_codec("bmshj2018-hyperprior", 1, weights=codec_files["bmshj2018-hyperprior"])
    image = read_image(photos["chelsea"])
    out = decode(encode(image, codec), codec)
    assert out.shape == image.shape and out.dtype == image.dtype


def test_entropy_tables_come_from_the_file_not_rebuilt_per_image(codec_files, photos, monkeypatch):
    codec = load_codec("mbt2018-mean", 1, weights=codec_files["mbt2018-mean"])

    def forbidden(*args, **kwargs):
        raise AssertionError("entropy tables rebuilt while coding")

    monkeypatch.setattr(codec.model, "update", forbidden)
    image = read_image(photos["camera"])
    for _ in range(2):
        decode(encode(image, codec), codec)


def test_wrong_architecture_weights_give_one_sentence(codec_files):
    with pytest.raises(ComneckError, match="hold codec 'mbt2018-mean', not 'elic2022-official'"):
        load_codec("elic2022-official", 1, weights=codec_files["mbt2018-mean"])


def test_quality_out_of_range_and_unknown_codec():
    with pytest.raises(ComneckError, match="quality levels 1..4, not 9"):
        load_codec("elic2022-official", 9)
    with pytest.raises(ComneckError, match="unknown codec 'jpeg'"):
        load_codec("jpeg", 1)


def test_missing_weights_offline_names_the_file_and_the_fix():
    with pytest.raises(ComneckError, match=r"no weights for elic2022-official quality 2.*comneck weights import elic2022-official-q2 FILE"):
        load_codec("elic2022-official", 2)
    # A zoo codec: the download is attempted, the network is blocked, and the message says what to do.
    with pytest.raises(ComneckError, match=r"zoo download failed.*comneck weights import mbt2018-mean-q3 FILE"):
        load_codec("mbt2018-mean", 3)


def test_registered_weights_are_found_by_name(codec_files, photos):
    from comneck_cli import weights as registry

    registry.import_file("mbt2018-mean-q1", codec_files["mbt2018-mean"], "codec")
    codec = load_codec("mbt2018-mean", 1)
    assert codec.digest == bytes.fromhex(registry.lookup("mbt2018-mean-q1").sha256[:8])


def test_malicious_pickle_is_not_executed(tmp_path):
    import pickle

    class Boom:
        def __reduce__(self):
            return (exec, ("open(%r, 'w').write('pwned')" % str(tmp_path / "pwned"),))

    bad = tmp_path / "evil.pth.tar"
    bad.write_bytes(pickle.dumps({"g_a.0.weight": Boom()}))
    with pytest.raises(ComneckError, match="not a plain tensor checkpoint"):
        load_codec("mbt2018-mean", 1, weights=bad)
    assert not (tmp_path / "pwned").exists()


def test_registry_covers_the_papers_codecs():
    assert {"elic2022-official", "mbt2018-mean", "cheng2020-anchor", "bmshj2018-hyperprior"} <= set(CODECS)
    assert CODECS["elic2022-official"].latent_channels(1) == 320


def test_weights_by_registry_name(codec_files, photos):
    from comneck_cli import weights as registry

    registry.import_file("mbt2018-mean-q1-d2", codec_files["mbt2018-mean"], "codec")
    codec = load_codec("mbt2018-mean", 1, weights="mbt2018-mean-q1-d2")
    assert codec.source.name.startswith("mbt2018-mean-q1-d2")
    with pytest.raises(ComneckError, match="neither a file nor a registered name"):
        load_codec("mbt2018-mean", 1, weights="no-such-weights")


def test_large_images_run_g_a_in_tiles_and_still_decode_exactly(codec, monkeypatch):
    """Above ANALYSIS_TILE² pixels g_a runs tile by tile with a halo of real neighbours; the record decodes to
    exactly the encoder's y_hat, and for g_a's whose receptive field fits in the halo (the hyperprior families)
    the tiled y is the whole-image y."""
    from comneck_cli import codecs

    x = torch.rand(1, 3, 320, 448, generator=torch.Generator().manual_seed(5))
    whole = codec.model.g_a(x).float()
    monkeypatch.setattr(codecs.runtime, "ANALYSIS_TILE", 128)
    calls = []
    hook = codec.model.g_a.register_forward_pre_hook(lambda _, args: calls.append(tuple(args[0].shape[-2:])))
    try:
        tiled = codec.analyze(x)
    finally:
        hook.remove()
    assert len(calls) == 12 and max(h * w for h, w in calls) <= (128 + 2 * 64) ** 2  # 3 × 4 tiles, never whole
    assert tiled.shape == whole.shape
    if codec.name in ("bmshj2018-hyperprior", "mbt2018-mean", "mbt2018-mean-vbr"):
        assert torch.allclose(tiled, whole, atol=1e-5)
    strings, y_hat = codec.code(tiled)
    assert torch.equal(codec.decompress_latents(strings, 320, 448), y_hat)



def test_entropy_parameters_run_on_one_thread_and_the_count_comes_back():
    from comneck_cli.codecs import one_thread

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with one_thread():
            assert torch.get_num_threads() == 1
            with one_thread():  # re-entrant (an RLock): nesting must not deadlock
                assert torch.get_num_threads() == 1
            assert torch.get_num_threads() == 1
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_codec_sizes_come_from_compressai_and_the_file():
    """No size is typed by hand: the zoo's table for zoo codecs, the constructor's defaults for the others, and a
    registered comneck file's own metadata over both (the shipped mbt2018-mean-vbr is N=128, M=192)."""
    import inspect

    from compressai.registry import MODELS
    from compressai.zoo.image import cfgs

    from comneck_cli.codecs import file_config, get_spec

    assert CODECS["cheng2020-anchor"].qualities[6] == dict(zip(("N", "M"), cfgs["cheng2020-anchor"][6]))
    for name in ("elic2022-official", "mbt2018-mean-vbr", "elic-comneck"):
        signature = inspect.signature(MODELS[name]).parameters
        assert CODECS[name].qualities[1] == {"N": signature["N"].default, "M": signature["M"].default}
    assert file_config(get_spec("mbt2018-mean-vbr"), 3) == ({"N": 128, "M": 192}, "registered file mbt2018-mean-vbr")


def test_the_same_codec_saves_to_the_same_bytes_in_any_process(tmp_path):
    """A codec file's digest names it in every record: safetensors alone orders its header from a per-process hash
    map, so two processes exporting the same weights would write files of different digests."""
    import subprocess
    import sys

    script = ("import sys, torch; from compressai.registry import MODELS; from comneck_cli.codecs import save_codec, "
              "half_codec_file; torch.manual_seed(0); m = MODELS['mbt2018-mean'](N=8, M=12).eval(); "
              "save_codec(m, sys.argv[1], 'mbt2018-mean', 1, {'N': 8, 'M': 12}); "
              "half_codec_file(sys.argv[1], sys.argv[1] + '.half')")
    outs = [tmp_path / f"c{i}.safetensors" for i in range(3)]
    for out in outs:
        subprocess.run([sys.executable, "-c", script, str(out)], check=True, capture_output=True, timeout=300)
    assert len({out.read_bytes() for out in outs}) == 1
    assert len({Path(f"{out}.half").read_bytes() for out in outs}) == 1
