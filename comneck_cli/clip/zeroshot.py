"""CLIP zero-shot classification (Radford et al. 2021, §3.1.2): class weights from prompts, a class by cosine.

Each class c gets the weight ``w_c = normalise(mean_t normalise(E_text(template_t(c))))`` over the prompt templates
(open_clip's ``build_zero_shot_classifier``, what its ImageNet evaluation runs); an image embedding ``e`` scores
``logit_scale · cos(e, w_c)``. Training's cross-entropy (``train``) and ``eval``'s top-1 both use these weights.
The templates are open_clip's ``zero_shot_metadata``: its 80 OpenAI ImageNet templates for ImageNet classes, else
the single prompt ``"a photo of a {}."``. Class names come from a class file (:func:`read_class_names`), open_clip's
ImageNet names for WordNet-id folders (:func:`imagenet_class_names`), or the folder names.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from comneck_cli.errors import InputError

if TYPE_CHECKING:  # the CLI reads DEFAULT_TEMPLATES for its --prompt default: keep this module free of torch
    import torch
    from torch import Tensor, nn

DEFAULT_TEMPLATES: tuple[str, ...] = ("a photo of a {}.",)


def imagenet_templates() -> tuple[str, ...]:
    """open_clip's 80 OpenAI ImageNet prompt templates as ``str.format`` strings (open_clip keeps them as functions)."""
    from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES

    return tuple(template("{}") for template in OPENAI_IMAGENET_TEMPLATES)


def imagenet_class_names(folders: list[str]) -> list[str] | None:
    """open_clip's ImageNet class names (``IMAGENET_CLASSNAMES``) for folders that are all ImageNet-1k WordNet ids,
    else None. Those names are in the order of the sorted 1000 ids (class i of the 1k set); the id list is timm's
    (``ImageNetInfo``; timm comes with open_clip), so a subset of the classes gets its own names too."""
    if not folders or not all(len(f) == 9 and f[0] == "n" and f[1:].isdigit() for f in folders):
        return None
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES
    from timm.data import ImageNetInfo

    index = {wnid: i for i, wnid in enumerate(ImageNetInfo("imagenet-1k").label_names())}
    if not all(f in index for f in folders):
        return None
    return [IMAGENET_CLASSNAMES[index[f]] for f in folders]


def read_class_names(path: Path, folders: list[str]) -> list[str]:
    """Class names for ``folders`` (sorted) from a text file.

    Either one name per line in the folders' sorted order, or ``FOLDER NAME...`` lines (ImageNet's
    ``LOC_synset_mapping.txt``: ``n01440764 tench, Tinca tinca``), recognised when every line starts
    with a folder name; for such lines the name is the text up to the first comma.
    """
    try:
        lines = [line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"cannot read class names from {path} ({exc}); pass a UTF-8 text file") from exc
    known = set(folders)
    pairs = [line.split(None, 1) for line in lines]
    if pairs and all(len(p) == 2 and p[0] in known for p in pairs):
        mapping = {p[0]: p[1].split(",")[0].strip() for p in pairs}
        missing = [f for f in folders if f not in mapping]
        if missing:
            raise InputError(f"class file {path} names no class for folder {missing[0]!r}; add a line for it")
        return [mapping[f] for f in folders]
    if len(lines) != len(folders):
        raise InputError(
            f"class file {path} has {len(lines)} names but the data folder has {len(folders)} class folders; "
            "write one name per folder in sorted folder order, or 'FOLDER NAME' lines"
        )
    return lines


def class_weights(clip: "nn.Module", model_name: str, classes: Sequence[str],
                  templates: Sequence[str] = DEFAULT_TEMPLATES, *, device: "torch.device | str" = "cpu",
                  batch_size: int = 256) -> "Tensor":
    """Zero-shot weights ``(classes, embed_dim)``, unit rows, on ``device``; about ``batch_size`` prompts per text pass.

    ``model_name`` picks open_clip's tokenizer for the tower (a Hugging Face tokenizer may need the network).
    """
    import open_clip
    from open_clip.zero_shot_classifier import build_zero_shot_classifier

    tokenizer = open_clip.get_tokenizer(model_name)
    weights = build_zero_shot_classifier(clip, tokenizer, list(classes), list(templates),
                                         num_classes_per_batch=max(1, batch_size // len(templates)), device=device)
    return weights.T.float()


class ZeroShot:
    """A CLIP zero-shot classifier over ``classes``: :func:`class_weights` kept on the CPU, and a prediction."""

    def __init__(self, clip: "nn.Module", model_name: str, classes: Sequence[str],
                 templates: Sequence[str] = DEFAULT_TEMPLATES, *, device: "torch.device | str" = "cpu"):
        self.classes = list(classes)
        self.weights = class_weights(clip, model_name, self.classes, templates, device=device).cpu()

    def predict(self, embeddings: "Tensor") -> "Tensor":
        """Projected image embeddings ``(B, embed_dim)`` -> predicted class indices ``(B,)``."""
        import torch.nn.functional as F

        return (F.normalize(embeddings.float(), dim=-1) @ self.weights.T).argmax(dim=-1)
