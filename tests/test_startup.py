"""Start-up: `comneck encode` imports CompressAI without its point-cloud datasets, torch_geometric, torchvision or
scipy.stats."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
from PIL import Image

PROBE = """
import sys
from comneck_cli.cli import main
try:
    main(sys.argv[1:], standalone_mode=False)
finally:
    heavy = sorted({m.split('.')[0] for m in sys.modules
                    if m.startswith(('torch_geometric', 'torchvision', 'compressai.datasets', 'scipy.stats'))})
    print('HEAVY', ','.join(heavy), file=sys.stderr)
"""


def test_encode_does_not_import_point_cloud_or_torchvision_modules(tmp_path):
    """Fails without ``codecs._compressai``'s stand-ins: CompressAI's package ``__init__`` then imports
    ``compressai.datasets``, torch_geometric, torchvision and scipy.stats (checked by emptying ``_STAND_INS``)."""
    image = tmp_path / "p.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(image)
    out = tmp_path / "p.cnk"
    result = subprocess.run([sys.executable, "-c", PROBE, "encode", str(image), "-o", str(out), "--quiet"],
                            capture_output=True, text=True, timeout=300)
    assert out.is_file(), result.stderr
    assert "HEAVY \n" in result.stderr, result.stderr


def test_the_real_modules_still_import_after_the_light_import():
    code = ("from comneck_cli.codecs._compressai import import_compressai; import_compressai();"
            "import compressai.datasets, compressai.transforms, torchvision.transforms;"
            "from compressai.registry import MODELS; from compressai.entropy_models import GaussianConditional;"
            "print(hasattr(compressai.datasets, 'ImageFolder'), torchvision.transforms.Resize.__name__,"
            " 'mbt2018-mean-vbr' in MODELS, GaussianConditional(None)._standardized_quantile(0.5))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.stdout.split() == ["True", "Resize", "True", "0.0"], result.stderr
