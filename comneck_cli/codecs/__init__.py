"""Codecs: the learned image codecs comneck codes with, one concept per module, re-exported here.

- :mod:`~comneck_cli.codecs.families`: how each kind of CompressAI model maps y to strings and strings back to
  ``y_hat`` (hyperprior, mean-scale, autoregressive, ELIC's latent codec, variable rate);
- :mod:`~comneck_cli.codecs.specs`: the registry of named codecs (name -> family and CompressAI constructor) and
  their sizes from CompressAI's own tables; quality and rate checks;
- :mod:`~comneck_cli.codecs.runtime`: :class:`Codec`, a loaded codec (g_a/g_s on a device, in tiles; entropy coding
  on one CPU thread);
- :mod:`~comneck_cli.codecs.files`: weight files (found by :mod:`comneck_cli.hub`'s rule, else CompressAI's zoo),
  :func:`load_codec`, :func:`save_codec`, the sizes a file records;
- :mod:`~comneck_cli.codecs.tables`: the entropy-table checks every file passes before a coder uses it;
- :mod:`~comneck_cli.codecs.rans`, :mod:`~comneck_cli.codecs.elic_comneck`: comneck's bounded rANS decoder and the
  ComNeck authors' ELIC.
"""

from comneck_cli.codecs.families import (Autoregressive, Family, LatentCodecModel, MeanScaleHyperprior,
                                         ScaleHyperprior, VariableRate, rate_gain)
from comneck_cli.codecs.files import (HALF_PREFIXES, check_codec_file, file_config, half_codec_file, load_codec,
                                      resolve_weights, save_codec, weights_info)
from comneck_cli.codecs.runtime import (ANALYSIS_HALO, ANALYSIS_TILE, SYNTHESIS_HALO, SYNTHESIS_TILE, Codec,
                                        one_thread, run_tiled)
from comneck_cli.codecs.specs import (CODECS, RATE_STEPS, CodecSpec, bpp_out_of_reach, check_quality, check_rate,
                                      check_rate_options, check_record_level, get_spec, latent_channels, registry_name)
from comneck_cli.codecs.tables import MAX_TABLE_SYMBOLS, check_entropy_tables

__all__ = [
    "ANALYSIS_HALO", "ANALYSIS_TILE", "CODECS", "HALF_PREFIXES", "MAX_TABLE_SYMBOLS", "RATE_STEPS", "SYNTHESIS_HALO",
    "SYNTHESIS_TILE", "Autoregressive", "Codec", "CodecSpec", "Family", "LatentCodecModel", "MeanScaleHyperprior",
    "ScaleHyperprior", "VariableRate", "bpp_out_of_reach", "check_codec_file", "check_entropy_tables",
    "check_quality", "check_rate", "check_rate_options", "check_record_level", "file_config", "get_spec",
    "half_codec_file", "latent_channels", "load_codec", "one_thread", "rate_gain", "registry_name", "resolve_weights",
    "run_tiled", "save_codec", "weights_info",
]
