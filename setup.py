"""Builds comneck's one C extension, the bounds-checked rANS decoder; the metadata lives in setup.cfg."""

from setuptools import Extension, setup

setup(ext_modules=[Extension("comneck_cli._rans", ["comneck_cli/_rans.c"])])
