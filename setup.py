"""Builds comneck's one C extension, the bounds-checked rANS decoder, and installs every import name under
``comneck_cli``: the repository's top-level ``formats/`` and ``weights/`` folders become ``comneck_cli.formats`` and
``comneck_cli.weights`` (the rest of the metadata lives in setup.cfg)."""

from setuptools import Extension, find_packages, setup

MAPPED = {"comneck_cli.formats": "formats", "comneck_cli.weights": "weights"}

setup(
    packages=find_packages(include=["comneck_cli", "comneck_cli.*"]) + list(MAPPED),
    package_dir=MAPPED,
    package_data={"comneck_cli.formats": ["SPEC.md"], "comneck_cli.weights": ["*.json", "*.safetensors", "*.md", "*.png"]},
    ext_modules=[Extension("comneck_cli.codecs._rans", ["comneck_cli/codecs/_rans.c"])],
)
