"""Import CompressAI without its point-cloud datasets, torch_geometric, torchvision and scipy.stats.

``compressai/__init__.py`` imports every subpackage, and two of them cost most of its start-up: ``datasets`` and
``transforms`` pull in torch_geometric (point clouds), and ``registry.transforms`` imports ``torch_geometric.transforms``
and ``torchvision.transforms`` only to list their classes in CompressAI's ``TRANSFORMS`` table. comneck uses none of
them (its codecs are built from ``compressai.models``, ``entropy_models`` and ``zoo``), and shell pipelines pay the
import on every call. ``entropy_models`` also imports ``scipy.stats`` (about 40 % of ``import torch`` again) for one
call, ``scipy.stats.norm.ppf``, made only when an entropy model's tables are rebuilt; SciPy loads its submodules
lazily on attribute access, so with a stand-in during the import that call still reaches the real ``scipy.stats``.

:func:`import_compressai` imports the real package once with empty stand-ins for those four modules in
``sys.modules`` and takes the stand-ins out again as soon as the import is done. So nothing is patched afterwards:
``import compressai.datasets``, ``torch_geometric`` or ``torchvision`` later in the process import the real modules.
The one visible difference is that ``compressai.registry.TRANSFORMS`` lists no torchvision/torch_geometric classes.
If CompressAI is already imported (by the caller's own code), it is used as it is.
"""

from __future__ import annotations

import sys
import types
from types import ModuleType

# Imported only to fill CompressAI's TRANSFORMS table, or holding point-cloud code comneck never runs.
_STAND_INS = ("compressai.datasets", "compressai.transforms", "torch_geometric", "torch_geometric.transforms",
              "torchvision", "torchvision.transforms", "scipy.stats")


def import_compressai() -> ModuleType:
    """The ``compressai`` package, imported without the modules listed in ``_STAND_INS`` (see the module doc)."""
    if "compressai" in sys.modules:
        return sys.modules["compressai"]
    import scipy  # the real package (light): `import scipy.stats` binds it, and it imports `stats` when first used
    added: dict[str, ModuleType] = {}
    for name in _STAND_INS:
        if name not in sys.modules:
            stand_in = types.ModuleType(name)
            stand_in.__path__ = []  # a package, so `import x.y` finds the child stand-in
            sys.modules[name] = added[name] = stand_in
    for name, stand_in in added.items():
        parent, _, child = name.rpartition(".")
        if parent in added:
            setattr(added[parent], child, stand_in)
    try:
        import compressai
    finally:
        for name, stand_in in added.items():
            if sys.modules.get(name) is stand_in:
                del sys.modules[name]
    for child in ("datasets", "transforms"):
        if f"compressai.{child}" in added:
            compressai.__dict__.pop(child, None)  # a later `import compressai.datasets` loads the real one
    return compressai
