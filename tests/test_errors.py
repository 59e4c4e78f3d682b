"""The one exception root: every error comneck raises on purpose is a ComneckError, in the library's words."""

from __future__ import annotations

import pytest

from comneck_cli import errors
from comneck_cli.errors import ComneckError


def test_every_error_type_of_the_package_has_the_one_root():
    from comneck_cli.formats import CnkError
    from comneck_cli.weights import WeightsError

    assert issubclass(CnkError, errors.FormatError) and issubclass(CnkError, ValueError)
    assert issubclass(WeightsError, errors.RegistryError)
    for typed in (errors.UsageError, errors.FormatError, errors.RegistryError, errors.ModelFileError,
                  errors.MismatchError, errors.InputError):
        assert issubclass(typed, ComneckError)


def test_render_spells_only_the_named_parameters():
    exc = errors.UsageError("pass `clip_weights` FILE, not `other`; see `comneck weights list`",
                            params=("clip_weights",))
    assert exc.render(lambda p: "--" + p.replace("_", "-")) == (
        "pass --clip-weights FILE, not `other`; see `comneck weights list`")
    assert str(exc).startswith("pass `clip_weights`")  # the library's own words


def test_library_messages_name_parameters_not_flags(tmp_path):
    """The codec layer names `weights`/`codec`/`quality`; the CLI turns them into flags."""
    from comneck_cli.codecs import load_codec

    with pytest.raises(errors.RegistryError) as caught:
        load_codec("elic2022-official", 1)
    assert "--" not in str(caught.value) and caught.value.params == ("weights",)
    assert caught.value.render(lambda p: f"--{p}").endswith("or pass --weights FILE")


def test_option_checks_name_parameters_the_cli_spells_as_flags():
    from comneck_cli.defaults import quality_problem, rate_problem

    both = rate_problem("mbt2018-mean-vbr", 3, 0.5)
    assert isinstance(both, errors.UsageError) and str(both) == "pass `rate` or `bpp_target`, not both"
    assert both.render(lambda p: "--" + p.replace("_", "-")) == "pass --rate or --bpp-target, not both"
    fixed = rate_problem("mbt2018-mean", None, 0.5)
    assert fixed.params == ("bpp_target",) and "`bpp_target` needs a variable-rate codec" in str(fixed)
    assert rate_problem("mbt2018-mean-vbr", 3.5, None) is None
    assert str(quality_problem("cheng2020-anchor", 7)) == "codec cheng2020-anchor has quality levels 1..6, not 7"
