"""Usage: python benchmarks/preedit_designs.py 200 fast 1e-2,1e-3,1e-4 (DESIGNS=blend,multiscale NONE=1).

Blend P (former) vs multi-scale P (new): joint `train vbr --pre-edit` on the tests' tiny models, then real records of
held-out photos at R = 1..8: bpp and the semantic-token distortion (L_sem at the token layers) of the decoded image
against the original's tokens; compared at equal bpp (log-bpp interpolation over the common range)."""
import importlib.util, json, os, shutil, sys, time
from pathlib import Path
import numpy as np, torch
torch.set_num_threads(1)
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("COMNECK_HOME", "/tmp/preedit-designs/home")
from tests.conftest import TINY_CLIP, skimage_photo
import open_clip
open_clip.add_model_config(Path(str(Path(__file__).resolve().parent.parent / "tests" / "tiny_configs")))
from safetensors.torch import save_file, load_file

W = Path(os.environ.get("PREEDIT_WORK", "/tmp/preedit-designs")); W.mkdir(parents=True, exist_ok=True)
steps = int(sys.argv[1]) if len(sys.argv) > 1 else 40
setting = sys.argv[2] if len(sys.argv) > 2 else "fast"
# tiny clip + vbr codec exactly as the fixtures
clip_file = W / "tiny-clip.safetensors"
if not clip_file.exists():
    torch.manual_seed(0)
    m = open_clip.create_model(TINY_CLIP, pretrained=None)
    save_file({k: v.contiguous() for k, v in m.state_dict().items()}, str(clip_file))
data = W / "data"; data.mkdir(exist_ok=True)
for n in ("chelsea.png", "coffee.png", "astronaut.png", "rocket.jpg"):
    shutil.copy(skimage_photo(n), data / n)
from comneck_cli.train.codec import CodecTrainConfig, train_codec
codec0 = W / "vbr.safetensors"
if not codec0.exists():
    train_codec(CodecTrainConfig(codec="mbt2018-mean-vbr", config={"N": 16, "M": 24}, data=data, steps=120, crop=64,
                                 batch_size=4, lr=1e-3, output=codec0, register=None, quiet=True, run_dir=W / "codec-run"))
import comneck_cli.models.preedit as pe
import subprocess
BLEND = W / "preedit_blend.py"  # the former P, from the commit before issue #30.4
BLEND.write_text(subprocess.run(["git", "show", "b2faa1193ee7d4f6d43033430ec8ec3dedad7f15:comneck_cli/models/preedit.py"], cwd=Path(__file__).parent, capture_output=True, text=True, check=True).stdout)
spec = importlib.util.spec_from_file_location("blend", BLEND); blend = importlib.util.module_from_spec(spec); sys.modules["blend"] = blend; spec.loader.exec_module(blend)
NEW = pe.PreEditor
from comneck_cli.train.vbr import VbrTrainConfig, train_vbr
weights = {"fast": dict(gamma=0.0, beta=0.3, rank_weight=0.0, lr=3e-4, pre_edit_lr=1e-2),
           "rank": dict(gamma=0.0, beta=0.3, rank_weight=1.0, lr=3e-4, pre_edit_lr=1e-2),
           "mid": dict(gamma=255.0**2 / 60, beta=255.0**2 / 60 , rank_weight=1.0, lr=3e-4, pre_edit_lr=1e-3)}[setting]
held = ["motorcycle_left.png", "retina.jpg", "ihc.png", "hubble_deep_field.jpg", "coffee.png"]
from PIL import Image
images = []
for n in held:
    im = Image.open(skimage_photo(n)).convert("RGB"); w, h = im.size; s = min(w, h, 256)
    images.append(np.asarray(im.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))))
from comneck_cli.codecs import load_codec
from comneck_cli.coding.encoder import encode
from comneck_cli.coding.decoder import decode
from comneck_cli.formats import pack
from comneck_cli.clip.tower import load_clip
from comneck_cli.io.images import to_tensor, from_tensor
clip = load_clip(TINY_CLIP, "test", weights_file=clip_file).requires_grad_(False)
results = {}
plr = [float(v) for v in (sys.argv[3] if len(sys.argv) > 3 else "1e-2,1e-3").split(",")]
for design, cls, lr in ([("none", None, 0)] if os.environ.get("NONE", "1") == "1" else []) + [(f"{d}@{lr:g}", c, lr) for d, c in (("blend", blend.PreEditor), ("multiscale", NEW)) for lr in plr if d in os.environ.get("DESIGNS", "blend,multiscale")]:
    pe.PreEditor = cls or NEW
    out = W / f"{setting}-{steps}-{design}"
    shutil.rmtree(out, ignore_errors=True)
    t = time.time()
    train_vbr(VbrTrainConfig(init=codec0, data=data, steps=steps, crop=64, batch_size=4, clip_model=TINY_CLIP,
                             clip_tag="test", clip_weights=clip_file, log_every=1, quiet=True, device="cpu",
                             pre_edit=cls is not None, output=out / "codec.safetensors", register=None,
                             pre_edit_register=None, run_dir=out / "run", **{**weights, "pre_edit_lr": lr or 1e-4}))
    train_s = time.time() - t
    tokens = pe.ClipTokens(clip, (1, 2, 3, 4))  # tiny tower: default token layers
    editor = None
    if cls is not None:
        from comneck_cli.modelfiles import read_safetensors
        state, meta = read_safetensors(out / "codec.preedit.safetensors", "p")
        editor = cls(**json.loads(meta["config"])); editor.load_state_dict(state); editor.eval()
        guide = pe.ClipTokens(clip, json.loads(meta["config"])["layers"])
    rows = []
    for rate in (4, 5, 6, 7, 8):
        codec = load_codec("mbt2018-mean-vbr", rate, weights=out / "codec.safetensors")
        bits = sem = 0.0; pix = 0
        for img in images:
            x = to_tensor(img, 1)
            src = img
            with torch.no_grad():
                if editor is not None:
                    src = from_tensor(editor(x, guide.grids(guide(x))), img.shape[0], img.shape[1], 1)
                rec = encode(src, codec)
                dec = decode(rec, codec)
                a, b = tokens(to_tensor(dec, 1)), tokens(x)
                sem += float(sum(torch.nn.functional.mse_loss(u, v) for u, v in zip(a, b)) / len(a))
            bits += 8 * len(pack(rec)); pix += img.shape[0] * img.shape[1]
        rows.append({"rate": rate, "bpp": bits / pix, "sem": sem / len(images)})
    results[design] = {"train_s": round(train_s, 1), "rows": rows}
    print(design, json.dumps(results[design]), flush=True)

def at_equal_bpp(a, b):
    """Mean of log(sem_b/sem_a) over the common log-bpp range (piecewise linear in log bpp): <0 means b better."""
    la, lb = [np.log([r["bpp"] for r in x["rows"]]) for x in (a, b)]
    sa, sb = [np.log([r["sem"] for r in x["rows"]]) for x in (a, b)]
    lo, hi = max(la.min(), lb.min()), min(la.max(), lb.max())
    grid = np.linspace(lo, hi, 50)
    ia, ib = np.argsort(la), np.argsort(lb)
    return float(np.mean(np.interp(grid, lb[ib], sb[ib]) - np.interp(grid, la[ia], sa[ia])))
summary = {} if "none" not in results else {f"{b} vs none": round(100 * (np.exp(at_equal_bpp(results["none"], results[b])) - 1), 2) for b in results if b != "none"}
print("L_sem change at equal bpp (%):", summary)
json.dump({"setting": setting, "steps": steps, "weights": weights, "results": results, "equal_bpp_sem_change_pct": summary},
          open(W / f"preedit_{setting}_{steps}.json", "w"), indent=1)
