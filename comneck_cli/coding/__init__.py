"""The library API: encode an image into a ``.cnk`` record and decode it back, for people or machines.

The Click commands are thin wrappers over these functions::

    from comneck_cli import load_codec, read_image, encode, decode
    codec = load_codec("mbt2018-mean", 3)
    record = encode(read_image("photo.png"), codec)
    image = decode(record, codec)          # uint8 H×W×3

The code lives in modules named for what they do; this package face only names what the package offers:

- :mod:`~comneck_cli.coding.encoder`: images -> records (``encode``, ``encode_batch``, ``encode_to_bpp``,
  :class:`ImageEncoder`);
- :mod:`~comneck_cli.coding.decoder`: records -> ``y_hat`` and images (``decode_latents``, ``decode``,
  :class:`CodecCache`);
- :mod:`~comneck_cli.coding.device`: the device and out-of-memory splitting;
- :mod:`~comneck_cli.coding.semantic`: CLIP-guided gain maps; :mod:`~comneck_cli.coding.files`: files in, files out.
"""

from comneck_cli.formats import Record

from comneck_cli.codecs import Codec, load_codec
from comneck_cli.io.images import to_tensor
from comneck_cli.coding.device import resolve_device, split_on_oom
from comneck_cli.coding.encoder import (ImageEncoder, check_encodable, check_guidance, code_semantic, encode,
                                        encode_batch, encode_to_bpp, record_from_strings)
from comneck_cli.coding.decoder import (CodecCache, check_record, decode, decode_latents, decode_with_latents,
                                        record_gain)

__all__ = [
    "CodecCache", "Codec", "ImageEncoder", "Record", "check_encodable", "check_guidance", "check_record",
    "code_semantic", "decode", "decode_latents", "decode_with_latents", "encode", "encode_batch", "encode_to_bpp",
    "load_codec", "record_from_strings", "record_gain", "resolve_device", "split_on_oom", "to_tensor",
]
