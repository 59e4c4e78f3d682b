"""The ``.cnk`` container v1: the ``Record`` dataclass, packing, and a streaming reader.

One record per image; a stream is records back to back (``cat a.cnk b.cnk`` is a valid stream).
SPEC.md in this folder is the byte-level description; this module implements exactly that.

The reader is written for untrusted input arriving through pipes: it reads exactly the bytes the
record declares (never past its end, so the next record stays in the stream), checks every declared
size against ``Limits`` before reading or allocating for it, and turns every problem into one
``CnkError`` sentence.
"""

from __future__ import annotations

import io
import json
import operator
import os
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, BinaryIO

from comneck_cli.formats.codec_ids import codec_name
from comneck_cli.formats.errors import CnkError
from comneck_cli.formats.varint import MAX_VARINT, encode_varint, read_varint

MAGIC = b"CN"
VERSION: tuple[int, int] = (1, 0)  # what this module writes by default
READ_MAJOR = 1  # the one major version this reader understands

FLAG_SECTIONS = 0x01
FLAG_MACHINE_ONLY = 0x02
KNOWN_FLAGS = FLAG_SECTIONS | FLAG_MACHINE_ONLY

TAG_METADATA = 0x02
CRITICAL_BIT = 0x80
# critical: the decoder derives each latent position's quantisation step from the map (importance.py, SPEC §7.1)
TAG_IMPORTANCE_MAP = 0x81
TAG_RATE = 0x83  # critical: decoding at another rate than the encoder's would give garbage
KNOWN_TAGS = frozenset({TAG_IMPORTANCE_MAP, TAG_METADATA, TAG_RATE})

DIGEST_BYTES = 4
CRC_BYTES = 4
MAX_STRINGS = 255

PAD_MULTIPLE = 64  # codecs pad H and W to a multiple of this; latent grids follow from it (SPEC.md)
Y_STRIDE = 16
Z_STRIDE = 64

DEFAULT_MAX_SIDE = 65536
# Pillow's decompression-bomb threshold: the same bound for images read and records decoded.
DEFAULT_MAX_PIXELS = 89_478_485
DEFAULT_MAX_RECORD_BYTES = 256 * 1024 * 1024
# Latent positions (tokens) the neck and CLIP's attention take: a 1024×1024 image's 64×64 grid. Attention memory
# grows with the square of this, unlike everything else, which grows with the pixels.
DEFAULT_MAX_TOKENS = 4096
ENV_MAX_SIDE = "COMNECK_MAX_SIDE"
ENV_MAX_PIXELS = "COMNECK_MAX_PIXELS"
ENV_MAX_RECORD_BYTES = "COMNECK_MAX_RECORD_BYTES"
ENV_MAX_TOKENS = "COMNECK_MAX_TOKENS"

# Strings are read in chunks so a truncated record claiming 200 MB costs at most one chunk of memory
# before the truncation is noticed, instead of one allocation of the claimed size.
_READ_CHUNK = 1 << 20


def latent_grids(height: int, width: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """The (rows, cols) of the y and z latent grids for an H×W image, for every codec in the table.

    The container does not store latent shapes because they are this pure function of (H, W): the
    image is padded up to a multiple of 64, y is 16× smaller, z is 64× smaller.
    """
    padded_h = -(-height // PAD_MULTIPLE) * PAD_MULTIPLE
    padded_w = -(-width // PAD_MULTIPLE) * PAD_MULTIPLE
    return (padded_h // Y_STRIDE, padded_w // Y_STRIDE), (padded_h // Z_STRIDE, padded_w // Z_STRIDE)


# --------------------------------------------------------------------------- limits
@dataclass(frozen=True)
class Limits:
    """The one set of size bounds for every way in: images and video frames read, records written and read, and
    the latent grids the neck and CLIP take.

    They exist so a hostile or damaged file cannot make comneck allocate gigabytes (a decoder allocates H×W×3
    floats and more), and so the encoder never writes a record its own reader refuses. ``Limits.from_env()``
    (what everything uses when given no ``Limits``) honours ``COMNECK_MAX_SIDE``, ``COMNECK_MAX_PIXELS``,
    ``COMNECK_MAX_RECORD_BYTES`` and ``COMNECK_MAX_TOKENS``.
    """

    max_side: int = DEFAULT_MAX_SIDE
    max_record_bytes: int = DEFAULT_MAX_RECORD_BYTES
    max_pixels: int = DEFAULT_MAX_PIXELS
    max_tokens: int = DEFAULT_MAX_TOKENS

    def __post_init__(self) -> None:
        for name in ("max_side", "max_record_bytes", "max_pixels", "max_tokens"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise CnkError(f"limit {name} must be a positive integer, got {value!r}")

    @classmethod
    def from_env(cls) -> Limits:
        """Defaults overridden by the environment, read now (not at import) so a caller can change them."""
        return cls(max_side=_env_int(ENV_MAX_SIDE, DEFAULT_MAX_SIDE),
                   max_record_bytes=_env_int(ENV_MAX_RECORD_BYTES, DEFAULT_MAX_RECORD_BYTES),
                   max_pixels=_env_int(ENV_MAX_PIXELS, DEFAULT_MAX_PIXELS),
                   max_tokens=_env_int(ENV_MAX_TOKENS, DEFAULT_MAX_TOKENS))

    def check_side(self, name: str, value: int, subject: str) -> None:
        """Refuse one image side (``name`` is height or width) over ``max_side``; ``subject`` opens the sentence."""
        if value > self.max_side:
            raise CnkError(f"{subject}: image {name} of {value} pixels, over the limit of {self.max_side} per "
                           f"side; if the file is trusted, raise {ENV_MAX_SIDE}")

    def check_image(self, height: int, width: int, subject: str) -> None:
        """Refuse an image size that a ``.cnk`` reader would refuse (each side, then the pixel count)."""
        self.check_side("height", height, subject)
        self.check_side("width", width, subject)
        if height * width > self.max_pixels:
            raise CnkError(f"{subject}: {width}×{height} image ({height * width} pixels), over the limit of "
                           f"{self.max_pixels} pixels; if the file is trusted, raise `max_pixels` or {ENV_MAX_PIXELS}",
                           params=["max_pixels"])

    def check_tokens(self, rows: int, cols: int, subject: str) -> None:
        """Refuse a latent grid (one token per position; ``latent_grids``) larger than the neck and CLIP take."""
        if rows * cols > self.max_tokens:
            raise CnkError(f"{subject}: latent grid {cols}×{rows} ({rows * cols} tokens), over the limit of "
                           f"{self.max_tokens} tokens for the neck and CLIP (their attention memory grows with its "
                           f"square); encode a smaller image, or if the memory is there, raise {ENV_MAX_TOKENS}")


def _within(where: str, exc: CnkError) -> CnkError:
    """``exc``'s sentence opened by ``where`` (which record, which file), with the parameters it names kept, so the
    command line still spells them as its flags."""
    return CnkError(f"{where}: {exc}", params=exc.params)


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value < 1:
        raise CnkError(f"environment variable {name} must be a positive integer, got {raw!r}; fix or unset it")
    return value


# --------------------------------------------------------------------------- the record
def _as_int(value: Any, name: str, low: int, high: int) -> int:
    # operator.index accepts numpy integers (image shapes, model attributes) but not floats or strings;
    # bool is refused because True/False as a codec id or size is always a caller mistake.
    if isinstance(value, bool):
        raise CnkError(f"{name} must be an integer, got {value!r}")
    try:
        value = operator.index(value)
    except TypeError:
        raise CnkError(f"{name} must be an integer, got {type(value).__name__}") from None
    if not low <= value <= high:
        raise CnkError(f"{name} {value} is out of range (must be {low}..{high})")
    return value


def _as_bytes(value: Any, name: str) -> bytes:
    if not isinstance(value, (bytes, bytearray, memoryview)):
        raise CnkError(f"{name} must be bytes, got {type(value).__name__}")
    return bytes(value)


def _metadata_json(metadata: dict[str, Any]) -> str:
    # Compact and strict (no NaN/Infinity, which are not JSON): the bytes a writer produces must be
    # readable by any JSON parser, not only Python's.
    return json.dumps(metadata, ensure_ascii=False, separators=(",", ":"), allow_nan=False)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _parse_metadata(raw: bytes) -> dict[str, Any]:
    """Section 0x02 payload -> dict; anything but a UTF-8 JSON object is a CnkError."""
    try:
        value = json.loads(raw.decode("utf-8"), parse_constant=_reject_constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise CnkError(f"corrupt .cnk record: the metadata section is not UTF-8 JSON ({exc})") from None
    if not isinstance(value, dict):
        raise CnkError(f"corrupt .cnk record: the metadata section must be a JSON object, not {type(value).__name__}")
    return value


@dataclass(frozen=True)
class Record:
    """One image's entropy-coded strings plus what a decoder needs to find and check its codec.

    Fields are validated and normalised on construction (lists become tuples, bytearrays become
    bytes, numpy integers become ints, metadata becomes its JSON round trip) so that
    ``unpack(pack(r)) == r`` holds for every record that constructs without error.
    """

    codec_id: int
    quality: int
    weights_digest: bytes
    height: int
    width: int
    strings: tuple[bytes, ...] = field(repr=False)
    machine_only: bool = False
    importance_map: bytes | None = field(default=None, repr=False)  # section 0x81 payload (formats.ImportanceMap)
    metadata: dict[str, Any] | None = field(default=None, hash=False)  # dicts are unhashable
    rate: int | None = None  # variable-rate codecs: the rate parameter R in thousandths of a level (u16)
    unknown_sections: tuple[tuple[int, bytes], ...] = field(default=(), repr=False)
    version: tuple[int, int] = VERSION

    def __post_init__(self) -> None:
        # object.__setattr__ because the dataclass is frozen; normalising here is what makes equality
        # after a round trip hold.
        set_ = object.__setattr__
        set_(self, "codec_id", _as_int(self.codec_id, "codec id", 1, 255))
        set_(self, "quality", _as_int(self.quality, "quality", 0, 255))
        digest = _as_bytes(self.weights_digest, "weights digest")
        if len(digest) != DIGEST_BYTES:
            raise CnkError(f"weights digest must be exactly {DIGEST_BYTES} bytes, got {len(digest)}")
        set_(self, "weights_digest", digest)
        set_(self, "height", _as_int(self.height, "height", 1, MAX_VARINT))
        set_(self, "width", _as_int(self.width, "width", 1, MAX_VARINT))

        strings = self.strings
        if isinstance(strings, (bytes, bytearray, memoryview, str)) or not isinstance(strings, Sequence):
            raise CnkError("strings must be a sequence of bytes objects (one per entropy-coded string)")
        if not 1 <= len(strings) <= MAX_STRINGS:
            raise CnkError(f"a record holds 1..{MAX_STRINGS} strings, got {len(strings)}")
        set_(self, "strings", tuple(_as_bytes(s, f"string {i}") for i, s in enumerate(strings)))

        if not isinstance(self.machine_only, bool):
            raise CnkError(f"machine_only must be True or False, got {self.machine_only!r}")
        if self.importance_map is not None:
            set_(self, "importance_map", _as_bytes(self.importance_map, "importance map"))
        if self.rate is not None:
            set_(self, "rate", _as_int(self.rate, "rate", 0, 0xFFFF))
        if self.metadata is not None:
            if not isinstance(self.metadata, dict):
                raise CnkError(f"metadata must be a dict (a JSON object), got {type(self.metadata).__name__}")
            try:
                # Through UTF-8 bytes, as pack writes it: a lone surrogate (JSON's "\ud800") is no Unicode text.
                set_(self, "metadata", json.loads(_metadata_json(self.metadata).encode("utf-8")))
            except UnicodeEncodeError as exc:
                raise CnkError(f"metadata must be Unicode text, but it holds a lone UTF-16 surrogate "
                               f"({exc.object[exc.start:exc.end]!r}), which UTF-8 cannot encode") from None
            except (TypeError, ValueError, RecursionError) as exc:
                raise CnkError(f"metadata must be JSON-serialisable (str keys; str, number, bool, None, "
                               f"list, dict values): {exc}") from None

        sections = []
        for item in self.unknown_sections:
            try:
                tag, payload = item
            except (TypeError, ValueError):
                raise CnkError("unknown_sections must hold (tag, bytes) pairs") from None
            tag = _as_int(tag, "unknown section tag", 0, CRITICAL_BIT - 1)
            if tag in KNOWN_TAGS:
                raise CnkError(f"section 0x{tag:02x} is a known section; use the Record field for it")
            sections.append((tag, _as_bytes(payload, f"section 0x{tag:02x}")))
        tags = [tag for tag, _ in sections]
        if len(set(tags)) != len(tags):
            raise CnkError("a section tag may appear at most once in a record")
        set_(self, "unknown_sections", tuple(sections))

        try:
            major, minor = self.version
        except (TypeError, ValueError):
            raise CnkError(f"version must be a (major, minor) pair, got {self.version!r}") from None
        if major != READ_MAJOR:
            raise CnkError(f"this comneck writes .cnk version {READ_MAJOR}.x only, not {major}.x")
        set_(self, "version", (READ_MAJOR, _as_int(minor, "minor version", 0, 15)))

    def __repr__(self) -> str:
        # The default repr would print megabytes of strings in every error and test report.
        extras = "".join([
            ", machine_only=True" if self.machine_only else "",
            f", importance_map=<{len(self.importance_map)} bytes>" if self.importance_map is not None else "",
            f", metadata={self.metadata!r}" if self.metadata is not None else "",
            f", rate={self.rate}" if self.rate is not None else "",
            f", unknown_sections={[(t, len(p)) for t, p in self.unknown_sections]}" if self.unknown_sections else "",
            f", version={self.version}" if self.version != VERSION else "",
        ])
        return (f"Record(codec={self.codec_name or self.codec_id!r}, quality={self.quality}, "
                f"digest={self.weights_digest.hex()}, {self.height}x{self.width}, "
                f"strings={[len(s) for s in self.strings]}{extras})")

    @property
    def payload_bytes(self) -> int:
        """Bytes of entropy-coded strings: what the codec produced, without the container."""
        return sum(len(s) for s in self.strings)

    def overhead_bytes(self) -> int:
        """Bytes the container adds around the strings (header, sections, CRC): ``len(pack(r)) - payload``."""
        return len(_pack_header(self)) + CRC_BYTES

    @property
    def codec_name(self) -> str | None:
        """The codec's name from the stable table, ``None`` if this version does not know the id."""
        return codec_name(self.codec_id)

    @property
    def bits_per_pixel(self) -> float:
        """8 × packed record bytes / (H × W): the container is counted, as SPEC.md defines bpp."""
        return 8 * (self.overhead_bytes() + self.payload_bytes) / (self.height * self.width)


# --------------------------------------------------------------------------- writing
def _sections(record: Record) -> list[tuple[int, bytes]]:
    # Known sections first in tag order, then unknown ones in their original order, so a record read
    # from a file and written back keeps its unknown sections' order (the reader collects them in order).
    sections: list[tuple[int, bytes]] = []
    if record.metadata is not None:
        sections.append((TAG_METADATA, _metadata_json(record.metadata).encode("utf-8")))
    if record.importance_map is not None:
        sections.append((TAG_IMPORTANCE_MAP, record.importance_map))
    if record.rate is not None:
        sections.append((TAG_RATE, record.rate.to_bytes(2, "big")))
    sections.extend(record.unknown_sections)
    return sections


def _pack_header(record: Record) -> bytes:
    """Every record byte before the strings: fixed fields, varints, string lengths, sections."""
    sections = _sections(record)
    flags = (FLAG_SECTIONS if sections else 0) | (FLAG_MACHINE_ONLY if record.machine_only else 0)
    major, minor = record.version
    parts = [
        MAGIC,
        bytes([(major << 4) | minor, flags, record.codec_id, record.quality]),
        record.weights_digest,
        encode_varint(record.height),
        encode_varint(record.width),
        bytes([len(record.strings)]),
        *(encode_varint(len(s)) for s in record.strings),
    ]
    if sections:
        parts.append(encode_varint(len(sections)))
        for tag, payload in sections:
            parts += [bytes([tag]), encode_varint(len(payload)), payload]
    return b"".join(parts)


def pack(record: Record) -> bytes:
    """The record's bytes: header, strings, then the big-endian CRC-32 of everything before it."""
    if not isinstance(record, Record):
        raise TypeError(f"pack() needs a formats.Record, got {type(record).__name__}")
    body = b"".join([_pack_header(record), *record.strings])
    return body + zlib.crc32(body).to_bytes(CRC_BYTES, "big")


def write_record(stream: BinaryIO, record: Record) -> int:
    """Append one packed record to a binary ``stream``; returns the number of bytes written."""
    data = pack(record)
    view = memoryview(data)
    # Raw (unbuffered) streams may write less than asked; loop so the record is never cut short.
    while view:
        written = stream.write(view)
        if written is None:  # non-blocking raw stream that would block: nothing was written
            raise CnkError("the output stream is non-blocking and not ready; write .cnk to a blocking stream")
        view = view[written:]
    return len(data)


# --------------------------------------------------------------------------- reading
class _RecordReader:
    """Reads one record's bytes from a stream exactly, keeping a running CRC and the position."""

    def __init__(self, stream: BinaryIO) -> None:
        self.stream = stream
        self.pos = 0  # bytes of this record consumed so far
        self.crc = 0
        self.end = 0  # the record's declared size, once its header has told it (0 until then)

    def exact(self, n: int, *, eof_ok: bool = False, checksum: bool = True) -> bytes | None:
        """Exactly ``n`` bytes; ``None`` only if ``eof_ok`` and the stream ended before any byte."""
        chunks = []
        remaining = n
        while remaining:
            chunk = self.stream.read(min(remaining, _READ_CHUNK))
            if chunk is None:
                raise CnkError("the input stream is non-blocking and has no data ready; read .cnk from a "
                               "blocking stream")
            if not isinstance(chunk, (bytes, bytearray)):
                raise TypeError("read .cnk from a binary stream (open the file with 'rb', or use "
                                "sys.stdin.buffer), not a text stream")
            if not chunk:
                if eof_ok and self.pos == 0 and remaining == n:
                    return None
                missing = max(remaining, self.end - self.pos)  # all that is missing, not only this read's
                raise CnkError(f"truncated .cnk record: expected {missing} more bytes at byte {self.pos} "
                               f"of the record; the file is incomplete (interrupted download or copy?)")
            chunks.append(chunk)
            remaining -= len(chunk)
            self.pos += len(chunk)
        data = b"".join(chunks)
        if checksum:
            self.crc = zlib.crc32(data, self.crc)
        return data

    def byte(self) -> int:
        return self.exact(1)[0]

    def varint(self, what: str) -> int:
        return read_varint(self.byte, what)


def _check_size(reader: _RecordReader, still_needed: int, limits: Limits) -> None:
    """Refuse a record whose declared size (bytes read so far + ``still_needed``) exceeds the limit."""
    total = reader.pos + still_needed
    if total > limits.max_record_bytes:
        raise CnkError(f".cnk record declares at least {total} bytes, over the limit of "
                       f"{limits.max_record_bytes} bytes; if the file is trusted, raise {ENV_MAX_RECORD_BYTES}")


def _read_side(reader: _RecordReader, name: str, limits: Limits) -> int:
    value = reader.varint(f"image {name}")
    limits.check_side(name, value, ".cnk record")  # before the next varint: a 2^34 height stops here
    return value


def _read(stream: BinaryIO, limits: Limits, *, keep_going: bool = False) -> tuple[Record | CnkError, int] | None:
    """One record and its size in bytes, or ``None`` at a clean end of stream.

    Only what framing depends on is refused before the CRC is checked (magic, major version,
    reserved flags, varint form, limits); everything else is checked after, so damage in transfer is
    reported as damage ("CRC mismatch") rather than as whatever the damaged byte happens to mean.
    With ``keep_going``, a record read to its end but refused after that (CRC, content) is returned as its
    error instead of raised: the stream stands at the next record.
    """
    reader = _RecordReader(stream)
    try:
        record = _read_record(reader, stream, limits)
    except _Framed as framed:
        if keep_going:
            return framed.error, reader.pos
        raise framed.error from None
    return None if record is None else (record, reader.pos)


class _Framed(Exception):
    """A record read to its end (CRC included) whose content is refused."""

    def __init__(self, error: CnkError) -> None:
        super().__init__(str(error))
        self.error = error


def _read_record(reader: _RecordReader, stream: BinaryIO, limits: Limits) -> Record | None:
    magic = reader.exact(1, eof_ok=True)
    if magic is None:
        return None
    if magic != MAGIC[:1]:
        # Already not a .cnk; one more byte (if any) makes the message show both magic bytes, which is
        # what identifies the real file type (b'PK' zip, b'\x89P' PNG, ...).
        magic += stream.read(1) or b""
        raise CnkError(f"not a .cnk file (bad magic {magic!r}, expected {MAGIC!r})")
    magic += reader.exact(1)
    if magic != MAGIC:
        raise CnkError(f"not a .cnk file (bad magic {magic!r}, expected {MAGIC!r})")

    version, flags, codec_id, quality = reader.exact(4)
    major, minor = version >> 4, version & 0x0F
    if major != READ_MAJOR:
        raise CnkError(f"unsupported .cnk version {major}.{minor} (this comneck reads version {READ_MAJOR}.x); "
                       f"upgrade comneck")
    if flags & ~KNOWN_FLAGS:
        raise CnkError(f"unsupported .cnk record: reserved flag bits 0x{flags & ~KNOWN_FLAGS:02x} are set "
                       f"(the file is damaged or needs a newer comneck)")
    digest = reader.exact(DIGEST_BYTES)
    height = _read_side(reader, "height", limits)
    width = _read_side(reader, "width", limits)
    limits.check_image(height, width, ".cnk record")

    count = reader.byte()
    lengths = []
    strings_and_crc = CRC_BYTES
    for index in range(count):
        lengths.append(reader.varint(f"length of string {index}"))
        strings_and_crc += lengths[-1]
        _check_size(reader, strings_and_crc, limits)  # before the next length, so a 2 GB claim stops here

    sections: list[tuple[int, bytes]] = []
    section_count = None
    if flags & FLAG_SECTIONS:
        section_count = reader.varint("section count")
        # Each tag appears at most once, so more than 256 sections cannot be valid; refusing early
        # also bounds the loop below.
        if section_count > 256:
            raise CnkError(f"corrupt .cnk record: it declares {section_count} sections, at most 256 can exist")
        _check_size(reader, 2 * section_count + strings_and_crc, limits)
        for index in range(section_count):
            tag = reader.byte()
            length = reader.varint(f"length of section 0x{tag:02x}")
            _check_size(reader, length + 2 * (section_count - index - 1) + strings_and_crc, limits)
            sections.append((tag, reader.exact(length)))

    reader.end = reader.pos + strings_and_crc
    strings = tuple(reader.exact(length) for length in lengths)
    computed = reader.crc
    stored = int.from_bytes(reader.exact(CRC_BYTES, checksum=False), "big")
    try:
        return _checked(stored, computed, flags, sections, section_count, codec_id, quality, digest, height, width,
                        strings, major, minor)
    except CnkError as exc:
        raise _Framed(exc) from None


def _checked(stored: int, computed: int, flags: int, sections: list[tuple[int, bytes]], section_count: int | None,
             codec_id: int, quality: int, digest: bytes, height: int, width: int, strings: tuple[bytes, ...],
             major: int, minor: int) -> Record:
    """The record of framed bytes, once its CRC and content check out."""
    if stored != computed:
        raise CnkError("corrupt .cnk record (CRC mismatch): the file was damaged in transfer or storage")

    # From here on the bytes are the ones the writer wrote; what remains is meaning, not damage.
    if section_count == 0:
        raise CnkError("invalid .cnk record: the SECTIONS flag is set but the section count is 0")
    tags = [tag for tag, _ in sections]
    if len(set(tags)) != len(tags):
        raise CnkError("invalid .cnk record: a section tag appears more than once")
    importance_map = None
    metadata = None
    rate = None
    unknown = []
    for tag, payload in sections:
        if tag == TAG_IMPORTANCE_MAP:
            importance_map = payload
        elif tag == TAG_METADATA:
            metadata = _parse_metadata(payload)
        elif tag == TAG_RATE:
            if len(payload) != 2:
                raise CnkError(f"invalid .cnk record: the rate section holds {len(payload)} bytes, not 2")
            rate = int.from_bytes(payload, "big")
        elif tag & CRITICAL_BIT:
            raise CnkError(f"this .cnk record needs a feature this comneck does not know (critical section "
                           f"0x{tag:02x}, file version {major}.{minor}); upgrade comneck")
        else:
            unknown.append((tag, payload))
    try:
        record = Record(codec_id=codec_id, quality=quality, weights_digest=digest, height=height, width=width,
                        strings=strings, machine_only=bool(flags & FLAG_MACHINE_ONLY),
                        importance_map=importance_map, metadata=metadata, rate=rate,
                        unknown_sections=tuple(unknown), version=(major, minor))
    except CnkError as exc:
        raise _within("invalid .cnk record", exc) from None
    return record


def read_record(stream: BinaryIO, limits: Limits | None = None) -> Record | None:
    """Read the next record from a binary stream; ``None`` if the stream ends cleanly before it.

    Works on pipes and ``sys.stdin.buffer``: it reads exactly the record's bytes and nothing after,
    so the following record can be read by the next call (or by anyone else holding the stream).
    ``limits`` defaults to ``Limits.from_env()``.
    """
    found = _read(stream, limits if limits is not None else Limits.from_env())
    return None if found is None else found[0]


def iter_records(stream: BinaryIO, limits: Limits | None = None, *,
                 on_damaged: Callable[[CnkError], None] | None = None) -> Iterator[Record]:
    """Yield every record of a stream in order, reading one record at a time; an error names the record (1-based)
    and its byte offset.

    With ``on_damaged``, a record that was read to its end but is refused (CRC mismatch, invalid content) is passed
    to it and the records after it are still read; damage to the framing itself (magic, sizes) ends the stream
    with the error, as without it.
    """
    limits = limits if limits is not None else Limits.from_env()
    number, offset = 1, 0
    while True:
        try:
            found = _read(stream, limits, keep_going=on_damaged is not None)
        except CnkError as exc:
            raise _within(f"record {number} (at byte {offset})", exc) from None
        if found is None:
            return
        record, size = found
        if isinstance(record, CnkError):
            on_damaged(_within(f"record {number} (at byte {offset})", record))
        else:
            yield record
        number, offset = number + 1, offset + size


def unpack(data: bytes) -> Record:
    """Exactly one record from ``data``; empty input or bytes after the record are a ``CnkError``."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"unpack() needs bytes, got {type(data).__name__}")
    found = _read(io.BytesIO(data), Limits.from_env())
    if found is None:
        raise CnkError("empty input: no .cnk record")
    record, size = found
    extra = len(data) - size
    if extra:
        raise CnkError(f"{extra} unexpected bytes after the .cnk record; for a stream of several records "
                       f"use iter_records() or read_file()")
    return record


def read_file(path: str | os.PathLike[str], limits: Limits | None = None) -> list[Record]:
    """All records of a ``.cnk`` file; a ``CnkError`` names the file (an empty file is an error too)."""
    try:
        with open(path, "rb") as f:
            records = list(iter_records(f, limits))
    except CnkError as exc:
        raise _within(os.fspath(path), exc) from None
    except OSError as exc:
        raise CnkError(f"cannot read {os.fspath(path)}: {exc.strerror or exc}") from exc
    if not records:
        raise CnkError(f"{os.fspath(path)} is empty: it holds no .cnk records")
    return records
