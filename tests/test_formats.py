"""The .cnk container: exact round trips, streams and pipes, the SPEC's byte counts, and hostile input."""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
import threading
import tracemalloc
import zlib
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from comneck_cli.formats import (
    CODEC_IDS,
    CODEC_NAMES,
    DEFAULT_MAX_PIXELS,
    CnkError,
    Limits,
    Record,
    codec_name,
    iter_records,
    latent_grids,
    pack,
    read_file,
    read_record,
    unpack,
    write_record,
)
from comneck_cli.formats.varint import decode_varint, encode_varint

REPO = Path(__file__).resolve().parents[1]
DIGEST = bytes.fromhex("deadbeef")


def hyperprior(**extra) -> Record:
    return Record(codec_id=CODEC_IDS["mbt2018-mean"], quality=3, weights_digest=DIGEST, height=300, width=451,
                  strings=(b"y" * 1234, b"z" * 56), **extra)


def elic(**extra) -> Record:
    """256×256 ELIC-like: z of 60 bytes, ten y strings of 200..3000 bytes (order as the coder: y then z)."""
    ys = tuple(bytes([i]) * n for i, n in enumerate(range(200, 3001, 311)))
    assert len(ys) == 10 and max(map(len, ys)) <= 3000
    return Record(codec_id=CODEC_IDS["elic2022-official"], quality=5, weights_digest=DIGEST, height=256, width=256,
                  strings=ys + (b"\x07" * 60,), **extra)


def full() -> Record:
    return elic(machine_only=True, importance_map=b"\x00\x01\x02\xff", metadata={"camera": "x", "n": [1, 2.5, None]},
                unknown_sections=((0x33, b"future optional"),))


def crc_fixed(data: bytes | bytearray) -> bytes:
    """Recompute the CRC so a deliberately altered record fails on its meaning, not on the checksum."""
    body = bytes(data[:-4])
    return body + zlib.crc32(body).to_bytes(4, "big")


# --------------------------------------------------------------------------- round trips
@pytest.mark.parametrize("record", [hyperprior(), elic(), full()], ids=["hyperprior", "elic", "full"])
def test_pack_unpack_round_trip(record):
    data = pack(record)
    back = unpack(data)
    assert back == record
    assert pack(back) == data
    assert len(data) == record.payload_bytes + record.overhead_bytes()


def test_full_record_keeps_every_field():
    back = unpack(pack(full()))
    assert back.machine_only is True
    assert back.importance_map == b"\x00\x01\x02\xff"
    assert back.metadata == {"camera": "x", "n": [1, 2.5, None]}
    assert back.unknown_sections == ((0x33, b"future optional"),)
    assert back.codec_name == "elic2022-official" and back.version == (1, 0)


def test_stream_of_three_records_and_clean_eof():
    records = [hyperprior(), full(), elic(metadata={})]
    stream = io.BytesIO()
    sizes = [write_record(stream, r) for r in records]
    assert sizes == [len(pack(r)) for r in records]
    stream.seek(0)
    assert list(iter_records(stream)) == records
    stream.seek(0)
    assert [read_record(stream) for _ in range(4)] == [*records, None]
    # `cat a.cnk b.cnk` is a stream: concatenated packs read the same.
    assert list(iter_records(io.BytesIO(b"".join(map(pack, records))))) == records


def test_read_record_never_reads_past_a_record_on_a_real_pipe():
    first, second = pack(full()), pack(hyperprior())
    read_fd, write_fd = os.pipe()

    def writer():
        with os.fdopen(write_fd, "wb", buffering=0) as w:
            for i in range(0, len(first + second), 7):  # dribble it in, as a slow producer would
                w.write((first + second)[i:i + 7])

    thread = threading.Thread(target=writer)
    thread.start()
    with os.fdopen(read_fd, "rb", buffering=0) as raw:  # unbuffered: any over-read would be lost from the fd
        assert read_record(raw) == full()
        rest = b""
        while chunk := os.read(read_fd, 65536):
            rest += chunk
    thread.join()
    assert rest == second


def test_read_file(tmp_path):
    path = tmp_path / "two.cnk"
    path.write_bytes(pack(hyperprior()) + pack(elic()))
    assert read_file(path) == [hyperprior(), elic()]
    (tmp_path / "empty.cnk").write_bytes(b"")
    with pytest.raises(CnkError, match="empty"):
        read_file(tmp_path / "empty.cnk")
    with pytest.raises(CnkError, match="missing.cnk"):
        read_file(tmp_path / "missing.cnk")
    path.write_bytes(pack(hyperprior()) + pack(elic())[:-1])
    with pytest.raises(CnkError, match=r"two\.cnk: record 2 \(at byte \d+\): truncated"):
        read_file(path)


def test_record_normalises_and_validates():
    import numpy as np

    r = Record(codec_id=np.uint8(4), quality=np.int64(3), weights_digest=bytearray(DIGEST), height=np.int64(300),
               width=451, strings=[bytearray(b"y" * 1234), memoryview(b"z" * 56)])
    assert r == hyperprior() and type(r.height) is int and type(r.strings) is tuple
    assert Record(1, 0, DIGEST, 1, 1, (b"",)).quality == 0
    assert Record(1, 1, DIGEST, 1, 1, (b"",), metadata={1: (2, 3)}).metadata == {"1": [2, 3]}  # its JSON form
    bad = [
        dict(codec_id=0), dict(codec_id=256), dict(quality=-1), dict(quality=256), dict(weights_digest=b"abc"),
        dict(weights_digest="abcd"), dict(height=0), dict(width=-3), dict(height=2.0), dict(strings=()),
        dict(strings=(b"x",) * 256), dict(strings=b"xy"), dict(strings=("text",)), dict(machine_only=1),
        dict(metadata=[1]), dict(metadata={"x": float("nan")}), dict(metadata={"x": object()}),
        dict(unknown_sections=((0x02, b""),)), dict(unknown_sections=((0x80, b""),)),
        dict(unknown_sections=((0x30, b""), (0x30, b"x"))), dict(version=(2, 0)), dict(version=(1, 16)),
        dict(codec_id=True),
    ]
    for change in bad:
        fields = dict(codec_id=1, quality=1, weights_digest=DIGEST, height=1, width=1, strings=(b"",)) | change
        with pytest.raises(CnkError):
            Record(**fields)


def test_repr_is_short():
    text = repr(full())
    assert len(text) < 400 and "elic2022-official" in text and "\\x00" not in text


# --------------------------------------------------------------------------- sizes the SPEC promises
def test_elic_256_overhead_is_exactly_the_spec_count():
    record = elic()
    # 2+1+1+1+1+4 fixed, 2+2 height/width, 1 count, 21 lengths (1 for z, 2 for each y), 4 CRC.
    assert record.overhead_bytes() == 2 + 1 + 1 + 1 + 1 + 4 + 2 + 2 + 1 + 21 + 4 == 40
    assert record.bits_per_pixel == 8 * len(pack(record)) / (256 * 256)


def test_spec_example_matches_the_code():
    spec = (REPO / "formats" / "SPEC.md").read_text(encoding="utf-8")
    block = re.search(r"<!-- example-hex.*?-->\s*```\s*\n(.*?)```", spec, re.S).group(1)
    example = Record(codec_id=3, quality=2, weights_digest=DIGEST, height=300, width=451,
                     strings=(b"\x11\x22\x33", b"\x44\x55"), metadata={"k": "v"})
    assert pack(example) == bytes.fromhex(block)
    assert (len(pack(example)), example.overhead_bytes()) == (38, 33)
    for name, codec_id in CODEC_IDS.items():  # the table in the SPEC is the table in the code
        assert f"| {codec_id} | {name} |" in spec


def test_codec_table_and_latent_grids():
    assert len(CODEC_IDS) == 15 and CODEC_IDS["elic2022-official"] == 9 and CODEC_IDS["elic-comneck"] == 14
    assert CODEC_IDS["lapped-pca-vbr"] == 15  # issue #34
    assert all(CODEC_NAMES[i] == n for n, i in CODEC_IDS.items())
    assert codec_name(10) == "elic2022-chandelier" and codec_name(200) is None
    assert unpack(pack(Record(200, 1, DIGEST, 1, 1, (b"",)))).codec_name is None  # unknown id: read, not refused
    assert latent_grids(300, 451) == ((20, 32), (5, 8))
    assert latent_grids(256, 256) == ((16, 16), (4, 4))


def test_varints_are_canonical_leb128():
    for value, encoded in [(0, "00"), (127, "7f"), (128, "8001"), (300, "ac02"), (16383, "ff7f"),
                           (16384, "808001"), (2**35 - 1, "ffffffff7f")]:
        assert encode_varint(value) == bytes.fromhex(encoded)
        assert decode_varint(bytes.fromhex(encoded)) == (value, len(encoded) // 2)
    for bad in ["8000", "ff00", "8080808000", "8080808080", "808080808001"]:
        with pytest.raises(CnkError):
            decode_varint(bytes.fromhex(bad))
    with pytest.raises(CnkError):
        encode_varint(2**35)


# --------------------------------------------------------------------------- refusals
def test_future_major_version_is_refused_and_future_minor_is_read():
    data = bytearray(pack(hyperprior()))
    data[2] = 0x20
    with pytest.raises(CnkError) as exc:
        unpack(bytes(data))
    assert str(exc.value) == ("unsupported .cnk version 2.0 (this comneck reads version 1.x); upgrade comneck")
    data[2] = 0x13
    record = unpack(crc_fixed(data))
    assert record.version == (1, 3) and pack(record) == crc_fixed(data)


def test_bad_magic_reserved_flags_and_crc():
    data = pack(hyperprior())
    with pytest.raises(CnkError, match=r"not a \.cnk file \(bad magic b'PK'"):
        unpack(b"PK" + data[2:])
    with pytest.raises(CnkError, match="not a .cnk file"):
        unpack(b"\x89PNG\r\n")
    flagged = bytearray(data)
    flagged[3] |= 0x04
    with pytest.raises(CnkError, match="reserved flag bits 0x04"):
        unpack(crc_fixed(flagged))
    damaged = bytearray(data)
    damaged[len(data) // 2] ^= 0x40
    with pytest.raises(CnkError, match=r"CRC mismatch.*damaged in transfer or storage"):
        unpack(bytes(damaged))


def test_truncation_empty_input_and_trailing_bytes():
    data = pack(hyperprior())
    with pytest.raises(CnkError, match=r"truncated \.cnk record: expected 1 more bytes at byte 1 of the record"):
        unpack(data[:1])
    with pytest.raises(CnkError, match="expected 4 more bytes"):
        unpack(data[:-4])
    with pytest.raises(CnkError, match="empty input"):
        unpack(b"")
    with pytest.raises(CnkError, match="3 unexpected bytes after the .cnk record"):
        unpack(data + b"abc")
    with pytest.raises(CnkError, match=r"record 3 \(at byte \d+\): truncated"):
        list(iter_records(io.BytesIO(data * 2 + data[:10])))


def _with_sections(sections: list[tuple[int, bytes]]) -> bytes:
    """A hyperprior record with a raw, hand-made section table (what another writer could produce)."""
    record = hyperprior()
    head = bytearray(pack(record)[: -record.payload_bytes - 4])
    head[3] |= 0x01
    table = encode_varint(len(sections)) + b"".join(bytes([t]) + encode_varint(len(p)) + p for t, p in sections)
    body = bytes(head) + table + b"".join(record.strings)
    return body + zlib.crc32(body).to_bytes(4, "big")


def test_sections_critical_optional_duplicate_and_metadata():
    with pytest.raises(CnkError, match=r"critical section 0x90.*upgrade comneck"):
        unpack(_with_sections([(0x90, b"must understand")]))
    record = unpack(_with_sections([(0x41, b"skip me"), (0x02, b'{"a": 1}'), (0x42, b"")]))
    assert record.metadata == {"a": 1} and record.unknown_sections == ((0x41, b"skip me"), (0x42, b""))
    assert unpack(pack(record)) == record
    with pytest.raises(CnkError, match="more than once"):
        unpack(_with_sections([(0x41, b"a"), (0x41, b"b")]))
    with pytest.raises(CnkError, match="section count is 0"):
        unpack(_with_sections([]))
    for bad in [b"[1, 2]", b"\xff\xfe", b"{nope", b'{"x": NaN}', b"[" * 100_000]:
        with pytest.raises(CnkError, match="metadata"):
            unpack(_with_sections([(0x02, bad)]))


def _header(height: int = 64, width: int = 64, lengths: tuple[int, ...] = (10,)) -> bytes:
    """The start of a record declaring the given sizes, with none of the bytes it promises after."""
    return (b"CN\x10\x00\x03\x01" + DIGEST + encode_varint(height) + encode_varint(width) + bytes([len(lengths)])
            + b"".join(encode_varint(n) for n in lengths))


def _peak_bytes(call) -> tuple[int, str]:
    """Peak traced allocation while `call` fails with CnkError, and the message."""
    tracemalloc.start()
    try:
        with pytest.raises(CnkError) as exc:
            call()
        return tracemalloc.get_traced_memory()[1], str(exc.value)
    finally:
        tracemalloc.stop()


def test_limits_are_enforced_before_allocating(monkeypatch):
    huge_string = _header(lengths=(2**31,)) + b"x" * 100
    peak, message = _peak_bytes(lambda: read_record(io.BytesIO(huge_string), Limits(max_record_bytes=4096)))
    assert "over the limit of 4096 bytes" in message and peak < 1 << 20
    peak, message = _peak_bytes(lambda: unpack(huge_string))  # default limit, 256 MiB
    assert "over the limit of 268435456 bytes" in message and peak < 1 << 20
    # Under the limit but cut short: chunked reads notice the truncation without allocating the claim.
    peak, message = _peak_bytes(lambda: unpack(_header(lengths=(200_000_000,)) + b"x" * 100))
    assert "truncated" in message and peak < 4 << 20
    peak, message = _peak_bytes(lambda: unpack(_header(height=2**34)))
    assert "height of 17179869184 pixels, over the limit of 65536" in message
    with pytest.raises(CnkError, match="longer than 5 bytes"):
        unpack(b"CN\x10\x00\x03\x01" + DIGEST + b"\xff" * 8)

    # Environment variables are read when a read starts; an explicit Limits wins over them.
    data = pack(hyperprior())
    monkeypatch.setenv("COMNECK_MAX_SIDE", "400")
    with pytest.raises(CnkError, match="width of 451 pixels.*COMNECK_MAX_SIDE"):
        unpack(data)
    assert read_record(io.BytesIO(data), Limits(max_side=451)) == hyperprior()
    monkeypatch.setenv("COMNECK_MAX_SIDE", "")
    monkeypatch.setenv("COMNECK_MAX_RECORD_BYTES", "1000")
    with pytest.raises(CnkError, match="COMNECK_MAX_RECORD_BYTES"):
        list(iter_records(io.BytesIO(data)))
    monkeypatch.setenv("COMNECK_MAX_RECORD_BYTES", "lots")
    with pytest.raises(CnkError, match="COMNECK_MAX_RECORD_BYTES must be a positive integer"):
        unpack(data)


def test_text_streams_are_a_clear_type_error():
    with pytest.raises(TypeError, match="binary stream"):
        read_record(io.StringIO("CN"))


def test_importing_formats_does_not_import_torch():
    code = ("import sys, formats; bad = [m for m in ('torch', 'compressai', 'open_clip') if m in sys.modules]; "
            "assert not bad, bad")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


# --------------------------------------------------------------------------- properties
FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**40, 2**40) | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=8,
)

records = st.builds(
    Record,
    codec_id=st.integers(1, 255),
    quality=st.integers(0, 255),
    weights_digest=st.binary(min_size=4, max_size=4),
    height=st.integers(1, 65536),
    width=st.integers(1, 65536),
    strings=st.lists(st.binary(max_size=300), min_size=1, max_size=12).map(tuple),
    machine_only=st.booleans(),
    importance_map=st.none() | st.binary(max_size=200),
    metadata=st.none() | st.dictionaries(st.text(max_size=6), json_values, max_size=4),
    unknown_sections=st.dictionaries(st.integers(3, 0x7F), st.binary(max_size=20), max_size=3)
    .map(lambda d: tuple(d.items())),
    version=st.tuples(st.just(1), st.integers(0, 15)),
)


@FAST
@given(records)
def test_generated_records_round_trip(record):
    data = pack(record)
    if record.height * record.width > DEFAULT_MAX_PIXELS:
        with pytest.raises(CnkError, match="COMNECK_MAX_PIXELS"):
            unpack(data)
        return
    assert unpack(data) == record
    assert record.overhead_bytes() == len(data) - record.payload_bytes


@FAST
@given(st.binary(max_size=200) | st.binary(max_size=60).map(lambda b: b"CN\x10" + b))
def test_arbitrary_bytes_raise_only_cnk_error(data):
    for parse in (unpack, lambda d: list(iter_records(io.BytesIO(d)))):
        try:
            parse(data)
        except CnkError:
            pass


@FAST
@given(records, st.data())
def test_every_truncation_is_refused(record, data):
    packed = pack(record)
    cut = data.draw(st.integers(0, len(packed) - 1))
    with pytest.raises(CnkError):
        unpack(packed[:cut])


@FAST
@given(records, st.data())
def test_any_damaged_byte_is_refused(record, data):
    packed = bytearray(pack(record))
    index = data.draw(st.integers(0, len(packed) - 1))
    packed[index] ^= data.draw(st.integers(1, 255))
    with pytest.raises(CnkError):  # a CRC collision that also re-frames the record: probability ~2**-32
        unpack(bytes(packed))


@FAST
@given(records, st.data())
def test_altered_records_with_a_valid_crc_raise_only_cnk_error(record, data):
    # What a buggy or hostile writer could produce: damage the CRC would not reveal reaches every later check.
    packed = bytearray(pack(record))
    for _ in range(data.draw(st.integers(1, 3))):
        packed[data.draw(st.integers(0, len(packed) - 5))] ^= data.draw(st.integers(1, 255))
    try:
        unpack(crc_fixed(packed))
    except CnkError:
        pass


def test_every_single_bit_flip_and_every_truncation_of_a_record_with_sections():
    small = Record(codec_id=4, quality=1, weights_digest=DIGEST, height=200, width=129, strings=(b"y" * 40, b"z" * 9),
                   machine_only=True, importance_map=b"\x01\x02", metadata={"k": [1, "v"]},
                   unknown_sections=((0x33, b"opt"),))
    packed = pack(small)
    assert unpack(packed) == small
    for cut in range(len(packed)):
        with pytest.raises(CnkError):
            unpack(packed[:cut])
    for bit in range(8 * len(packed)):
        damaged = bytearray(packed)
        damaged[bit // 8] ^= 1 << (bit % 8)
        with pytest.raises(CnkError):
            unpack(bytes(damaged))


def test_pixel_limit_refuses_before_reading_strings(monkeypatch):
    big = Record(codec_id=4, quality=1, weights_digest=DIGEST, height=20000, width=20000, strings=(b"y", b"z"))
    with pytest.raises(CnkError, match=r"20000×20000 image .* over the limit of 89478485 pixels"):
        unpack(pack(big))
    monkeypatch.setenv("COMNECK_MAX_PIXELS", str(20000 * 20000))
    assert unpack(pack(big)) == big
