"""Evaluation images: an ImageFolder-style directory (one sub-folder per class) or a flat folder.

Class names come from the folder names (``_`` read as a space) or from ``--classes FILE`` in the format
``comneck train`` reads: one name per line in sorted folder order, or ``FOLDER NAME`` lines (ImageNet's
``LOC_synset_mapping.txt``; the name is the text up to the first comma). A flat folder has no labels, so
zero-shot accuracy is not measured.

``--limit N`` takes images round-robin over the classes (the first image of every class, then the second, ...)
so a small limit still covers many classes; within a class images are in sorted order. ``--size S`` resizes
the short side to S (bicubic) and centre-crops S × S, as the paper evaluates 256 × 256 images; 0 codes the
images as they are.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from comneck_cli.clip.zeroshot import read_class_names
from comneck_cli.errors import InputError
from comneck_cli.io.images import IMAGE_SUFFIXES, read_image


@dataclass(frozen=True)
class Item:
    """One evaluation image: ``id`` is its path relative to the data folder ('/'-separated), ``label`` the
    class index (None in a flat folder)."""

    id: str
    path: Path
    label: int | None


@dataclass
class Dataset:
    root: Path
    items: list[Item]
    classes: list[str] = field(default_factory=list)  # empty: no labels
    ignored: list[str] = field(default_factory=list)  # loose files beside class folders

    @property
    def labelled(self) -> bool:
        return bool(self.classes)


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def find_images(root: Path, *, limit: int | None = None, classes_file: Path | None = None) -> Dataset:
    """The images under ``root``: class sub-folders if any hold images, else the folder's own images."""
    root = Path(root)
    if not root.is_dir():
        raise InputError(f"data folder {root} does not exist; pass a folder of images or of class sub-folders")
    folders = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    per_class = [(label, _images_in(root / name)) for label, name in enumerate(folders)]
    per_class = [(label, files) for label, files in per_class if files]
    if per_class:
        # Class indices count every sub-folder (an empty one keeps its place, so --classes lines stay aligned).
        classes = read_class_names(classes_file, folders) if classes_file else [f.replace("_", " ") for f in folders]
        ignored = [p.name for p in _images_in(root)]
        items: list[Item] = []
        for rank in range(max(len(files) for _, files in per_class)):
            for label, files in per_class:
                if rank < len(files):
                    items.append(Item(f"{folders[label]}/{files[rank].name}", files[rank], label))
    else:
        if classes_file:
            raise InputError(f"`classes` {classes_file} was given but {root} has no class sub-folders with images",
                             params=("classes",))
        classes, ignored = [], []
        items = [Item(p.name, p, None) for p in _images_in(root)]
    if not items:
        raise InputError(f"data folder {root} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    if limit is not None:
        items = items[:limit]
    return Dataset(root=root, items=items, classes=classes, ignored=ignored)


def fit(image: np.ndarray, size: int) -> np.ndarray:
    """Resize the short side to ``size`` (bicubic), then centre-crop ``size × size``; 0 leaves the image alone.

    Rounding follows torchvision's ``Resize(size)`` + ``CenterCrop(size)``; an image that already is
    ``size × size`` is returned unchanged (no resampling).
    """
    if size <= 0:
        return image
    height, width = image.shape[:2]
    if (height, width) == (size, size):
        return image
    from PIL import Image

    short, long = (height, width) if height <= width else (width, height)
    new_long = int(size * long / short)
    new_h, new_w = (size, new_long) if height <= width else (new_long, size)
    resized = np.asarray(Image.fromarray(image, "RGB").resize((new_w, new_h), Image.Resampling.BICUBIC))
    top, left = int(round((new_h - size) / 2.0)), int(round((new_w - size) / 2.0))
    return np.ascontiguousarray(resized[top : top + size, left : left + size])


def load_image(item: Item, size: int, *, max_pixels: int | None = None) -> tuple[np.ndarray, list[str]]:
    """The evaluated pixels of ``item`` (uint8 H×W×3 after :func:`fit`) and any conversion warnings."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        image = read_image(item.path, name=item.id, max_pixels=max_pixels)
    return fit(image, size), [str(w.message) for w in caught]
