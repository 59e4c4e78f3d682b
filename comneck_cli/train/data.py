"""Training data: an ImageFolder-style directory -> random square crops in [0, 1], with labels.

Layout: one sub-folder per class (``DATA/tench/*.jpg``, ``DATA/goldfish/*.jpg``), class names from
a ``classes`` file, else open_clip's ImageNet class names when every folder is an ImageNet-1k WordNet id
(``imagenet/train/n01440764``: "tench", not "n01440764"), else the folder names; a flat folder of images (no labels)
serves the stages without cross-entropy (``comneck train codec``, distillation-only stages).

Crops: random squares at native resolution (CompressAI's codec training), or with ``resize`` the ComNeck authors'
protocol, training and evaluation alike: the short side resized to the crop size, then the centre square. Their code
resizes with torchvision's default filter, bilinear (``resize="bilinear"``, what ``train neck``'s release recipe
uses); ``"bicubic"`` is the paper recipe's.

Reproducibility: the order of every epoch is a seeded permutation (``DistributedSampler`` with the run's
seed, sharded across torchrun ranks) and every crop position is drawn from a generator seeded with
``(seed, epoch, index)``. The batch of any global step is therefore a pure function of the seed and the
step: a resumed run reads exactly the batches an uninterrupted one would, with any number of loader
workers, without replaying the skipped ones.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from comneck_cli.clip.zeroshot import imagenet_class_names, read_class_names
from comneck_cli.errors import ComneckError, InputError
from comneck_cli.io.images import IMAGE_SUFFIXES, ImageConversionWarning, read_image, to_tensor

UNLABELLED = -1


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


class ImageFolderCrops(Dataset):
    """Images under ``root`` -> ``(x, label)``: x a (3, crop, crop) float tensor in [0, 1].

    Images smaller than the crop are padded as coding pads them (centred, edge pixels repeated). Items are
    addressed by ``(index, seed)`` pairs from :class:`EpochSampler`; the seed fixes the crop position. With
    ``resize`` (True or a filter of :data:`RESIZE_FILTERS`; True is bicubic) every image is resized (short side =
    crop) and centre-cropped instead (``resize_centre_crop``). ``class_source`` says where the class names came from.
    """

    def __init__(self, root: Path, crop: int, *, classes_file: Path | None = None, labelled: bool = True,
                 resize: bool | str = False):
        root = Path(root)
        if not root.is_dir():
            raise InputError(f"training data folder {root} does not exist; pass an ImageFolder-style directory")
        if crop < 1:
            raise ComneckError(f"`crop` {crop} is not positive; use a multiple of 64 such as 256", params=("crop",))
        if resize is True:
            resize = "bicubic"
        if resize and resize not in RESIZE_FILTERS:
            raise ValueError(f"resize filter {resize!r} is not one of {', '.join(RESIZE_FILTERS)}")
        self.root, self.crop, self.resize = root, crop, resize
        folders = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
        self.samples: list[tuple[Path, int]] = []
        for label, folder in enumerate(folders):
            self.samples += [(p, label) for p in _images_in(root / folder)]
        self.class_source = "none"
        if self.samples:
            self.folders = folders
            imagenet = None if classes_file else imagenet_class_names(folders)
            if classes_file:
                self.classes, self.class_source = read_class_names(classes_file, folders), f"the file {classes_file}"
            elif imagenet is not None:
                self.classes, self.class_source = imagenet, "open_clip's ImageNet class names (WordNet-id folders)"
            else:
                self.classes, self.class_source = [f.replace("_", " ") for f in folders], "the folder names"
        else:
            if labelled:
                raise InputError(
                    f"training data folder {root} has no class sub-folders with images; cross-entropy needs "
                    "one sub-folder of images per class (ImageFolder layout)"
                )
            self.samples = [(p, UNLABELLED) for p in _images_in(root)]
            self.folders, self.classes = [], []
        if not self.samples:
            raise InputError(f"training data folder {root} holds no images ({', '.join(IMAGE_SUFFIXES)})")

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, item: tuple[int, tuple[int, ...]]) -> tuple[Tensor, int]:
        index, seed = item
        path, label = self.samples[index]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ImageConversionWarning)
            image = read_image(path)
        if self.resize:
            return resize_centre_crop(image, self.crop, self.resize), label
        return random_crop(image, self.crop, np.random.default_rng(seed)), label


RESIZE_FILTERS = ("bilinear", "bicubic")


def resize_centre_crop(image: np.ndarray, size: int, resize_filter: str = "bicubic") -> Tensor:
    """uint8 H×W×3 -> (3, size, size) float in [0, 1]: torchvision's ``Resize(size, filter)`` then ``CenterCrop(size)``
    on a PIL image, pixel for pixel: the short side resized to ``size`` with Pillow's (antialiased) ``resize_filter``
    (:data:`RESIZE_FILTERS`), the long side to ``int(size · long / short)``, then the centre square."""
    from PIL import Image

    height, width = image.shape[:2]
    short, long = min(height, width), max(height, width)
    long = int(size * long / short)  # torchvision truncates (``_compute_resized_output_size``)
    new = (size, long) if width <= height else (long, size)  # (W, H)
    pil_filter = Image.BILINEAR if resize_filter == "bilinear" else Image.BICUBIC
    resized = np.asarray(Image.fromarray(image).resize(new, pil_filter))
    top, left = round((new[1] - size) / 2), round((new[0] - size) / 2)
    return to_tensor(resized[top : top + size, left : left + size], size)[0]


def random_crop(image: np.ndarray, size: int, rng: np.random.Generator) -> Tensor:
    """uint8 H×W×3 -> (3, size, size) float in [0, 1]: a uniformly placed crop, padded as coding pads
    (:func:`images.to_tensor`: centred, edges repeated) when smaller."""
    height, width = image.shape[:2]
    top = int(rng.integers(0, max(height - size, 0) + 1))
    left = int(rng.integers(0, max(width - size, 0) + 1))
    return to_tensor(image[top : top + size, left : left + size], size)[0]  # a smaller patch pads up to size


class EpochSampler(Sampler):
    """One epoch's ``(index, crop seed)`` items for this rank, from position ``start`` on.

    The order is ``DistributedSampler``'s seeded permutation for the epoch (sharded over ranks; padded so
    every rank gets as many items), the crop seed ``(seed, epoch, index)``.
    """

    def __init__(self, size: int, *, seed: int, epoch: int, rank: int = 0, world: int = 1, start: int = 0):
        self.inner = DistributedSampler(range(size), num_replicas=world, rank=rank, shuffle=True, seed=seed)
        self.inner.set_epoch(epoch)
        self.seed, self.epoch, self.start = seed, epoch, start

    def __len__(self) -> int:
        return len(self.inner) - self.start

    def __iter__(self) -> Iterator[tuple[int, tuple[int, ...]]]:
        indices = list(self.inner)[self.start :]
        return iter([(i, (self.seed, self.epoch, i)) for i in indices])


@dataclass
class Batches:
    """The batches of a run, addressed by global step: step s is batch ``s % per_epoch`` of epoch ``s // per_epoch``."""

    dataset: ImageFolderCrops
    batch_size: int
    seed: int
    rank: int = 0
    world: int = 1
    workers: int = 0
    pin_memory: bool = False

    @property
    def per_rank(self) -> int:
        return math.ceil(len(self.dataset) / self.world)

    @property
    def per_epoch(self) -> int:
        """Optimizer steps per epoch (the last batch may be smaller)."""
        return math.ceil(self.per_rank / self.batch_size)

    def iterate(self, start: int, stop: int) -> Iterator[tuple[int, Tensor, Tensor]]:
        """Yield ``(step, x, labels)`` for global steps ``start <= step < stop``.

        One DataLoader serves the whole range, so its worker processes start once per run rather than once per
        epoch (an epoch of a small folder is a handful of steps).
        """
        # Its own generator: a DataLoader otherwise draws its worker seed from torch's global generator, which the
        # training step's quantisation noise also draws from, and a resume would shift it. Crops do not depend on
        # it: every crop is seeded by (seed, epoch, index).
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + start)
        loader = DataLoader(self.dataset, batch_sampler=StepBatches(self, start, stop), num_workers=self.workers,
                            pin_memory=self.pin_memory, generator=generator)
        for step, (x, labels) in enumerate(loader, start):
            yield step, x, labels


class StepBatches(Sampler):
    """The items of global steps ``start..stop``, one list per step: step s is batch ``s % per_epoch`` of epoch
    ``s // per_epoch`` (the epoch's last batch may be smaller), whatever step iteration starts from."""

    def __init__(self, batches: Batches, start: int, stop: int):
        self.batches, self.start, self.stop = batches, start, stop

    def __len__(self) -> int:
        return max(self.stop - self.start, 0)

    def __iter__(self) -> Iterator[list[tuple[int, tuple[int, ...]]]]:
        b, step = self.batches, self.start
        while step < self.stop:
            epoch, position = divmod(step, b.per_epoch)
            items = list(EpochSampler(len(b.dataset), seed=b.seed, epoch=epoch, rank=b.rank, world=b.world,
                                      start=position * b.batch_size))
            for first in range(0, len(items), b.batch_size):
                yield items[first : first + b.batch_size]
                step += 1
                if step >= self.stop:
                    return


def steps_for(epochs: int | None, steps: int | None, per_epoch: int, what: str = "training") -> int:
    """Optimizer steps from ``epochs`` or ``steps`` (exactly one of them)."""
    if (epochs is None) == (steps is None):
        raise ComneckError(f"give the length of {what} as either `epochs` or `steps` (exactly one)",
                           params=("epochs", "steps"))
    total = steps if steps is not None else epochs * per_epoch
    if total < 0:
        raise ComneckError(f"the length of {what} must not be negative, got {total}")
    return total
