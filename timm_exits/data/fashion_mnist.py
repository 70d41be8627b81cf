"""Fashion-MNIST read from the files on disk, never downloaded.

Zalando's Fashion-MNIST (Xiao, Rasul & Vollgraf, 2017, arXiv:1708.07747; MIT licence): 60,000
training and 10,000 test images of clothing, 28x28 grayscale, 10 classes, in MNIST's IDX format.
`fashion_mnist` reads the four standard files, gzipped or not, from a folder the caller names,
from torchvision's layout under it (``root/FashionMNIST/raw/``, what
``torchvision.datasets.FashionMNIST(root, download=True)`` leaves), or from where Debian's package
``dataset-fashion-mnist`` installs them. It keeps a validation split out of the training images
(stratified by class, the test set is never touched) and returns the same shape of task as the
corrupted digits, so the demo and the loss study take either.
"""
from __future__ import annotations

import dataclasses
import gzip
import os
from pathlib import Path

import torch
import torch.nn.functional as F

from .._checks import is_int, require
from .splits import SplitMethods, TaskMethods

__all__ = ["FASHION_MNIST_CLASSES", "DEBIAN_FASHION_MNIST", "ImageSplit", "ImageTask", "fashion_mnist", "read_idx"]

FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
#: Where `apt-get install dataset-fashion-mnist` puts the files (Debian, Ubuntu).
DEBIAN_FASHION_MNIST = "/usr/share/datasets/fashion-mnist"
_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_HOW_TO_GET = (
    "get the files one of two ways: `apt-get install dataset-fashion-mnist` (Debian, Ubuntu; they land in "
    f"{DEBIAN_FASHION_MNIST}, found without a root), or on a machine with a network "
    "`torchvision.datasets.FashionMNIST(ROOT, download=True)` and then fashion_mnist(root=ROOT)"
)


@dataclasses.dataclass(frozen=True)
class ImageSplit(SplitMethods):
    """One split: images ``x`` (N, C, H, W), standardized with the training split's statistics, and labels ``y`` (N,).

    ``index`` is each image's position in the file it was read from (the training file for the
    train and validation splits, the test file for the test split).
    """

    x: torch.Tensor
    y: torch.Tensor
    index: torch.Tensor


@dataclasses.dataclass(frozen=True)
class ImageTask(TaskMethods):
    """Train, validation and test splits of an image dataset, and which training images keep their label in the limited-label setting."""

    train: ImageSplit
    val: ImageSplit
    test: ImageSplit
    labeled: torch.Tensor  # bool, one per training image
    seed: int
    classes: tuple[str, ...]
    name: str

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def read_idx(path: str | os.PathLike) -> torch.Tensor:
    """The array in one IDX file (MNIST's format; gzipped when the name ends in ``.gz``) as a uint8 tensor.

    Raises ValueError, naming the file, when it is not an unsigned-byte IDX file or is shorter than its header says.
    """
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as err:  # a truncated or corrupt .gz
        raise ValueError(f"{path} could not be read as {'gzip' if opener is gzip.open else 'a file'}: {err}") from err
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise ValueError(f"{path} is not an IDX file of unsigned bytes (its first bytes should be 00 00 08 and the dimension count); "
                         f"it starts {data[:4].hex(' ') or 'empty'}")
    ndim = data[3]
    header = 4 + 4 * ndim
    shape = [int.from_bytes(data[4 + 4 * k : 8 + 4 * k], "big") for k in range(ndim)]
    expected = header + (torch.Size(shape).numel() if ndim else 0)
    if ndim == 0 or len(data) != expected:
        raise ValueError(f"{path}: the header says shape {tuple(shape)}, so {expected} bytes, but the file has {len(data)}: "
                         "it is truncated or not what its name says")
    return torch.frombuffer(bytearray(data[header:]), dtype=torch.uint8).reshape(shape)


def _find(name: str, folders: list[Path]) -> Path | None:
    for folder in folders:
        for candidate in (folder / name, folder / f"{name}.gz"):
            if candidate.is_file():
                return candidate
    return None


def _folders(root) -> list[Path]:
    if root is None:
        return [Path(DEBIAN_FASHION_MNIST)]
    root = Path(root)
    return [root, root / "FashionMNIST" / "raw"]


def _read_split(part: str, folders: list[Path]) -> tuple[torch.Tensor, torch.Tensor]:
    images_name, labels_name = _FILES[part]
    found = {name: _find(name, folders) for name in (images_name, labels_name)}
    missing = [name for name, path in found.items() if path is None]
    if missing:
        looked = ", ".join(str(f) for f in folders)
        raise FileNotFoundError(f"Fashion-MNIST: {' and '.join(missing)} (or .gz) not found in {looked}; {_HOW_TO_GET}")
    images, labels = read_idx(found[images_name]), read_idx(found[labels_name])
    if images.dim() != 3 or labels.dim() != 1 or len(images) != len(labels):
        raise ValueError(f"Fashion-MNIST: {found[images_name]} holds {tuple(images.shape)} and {found[labels_name]} {tuple(labels.shape)}; "
                         "expected (N, 28, 28) images and N labels")
    if int(labels.max()) >= len(FASHION_MNIST_CLASSES):
        raise ValueError(f"Fashion-MNIST: {found[labels_name]} holds label {int(labels.max())}; the 10 classes are 0-9")
    return images, labels.long()


def _stratified(y: torch.Tensor, size: int, g: torch.Generator) -> torch.Tensor:
    """A bool mask choosing `size` rows of `y`, each class in proportion (largest remainders), drawn with `g`."""
    classes, counts = torch.unique(y, return_counts=True)
    exact = counts.double() * size / len(y)
    take = exact.floor().long()
    rest = size - int(take.sum())
    take[torch.argsort(exact - take, descending=True, stable=True)[:rest]] += 1
    mask = torch.zeros(len(y), dtype=torch.bool)
    for c, n in zip(classes.tolist(), take.tolist()):
        rows = torch.nonzero(y == c).flatten()
        mask[rows[torch.randperm(len(rows), generator=g)[:n]]] = True
    return mask


def fashion_mnist(root: str | os.PathLike | None = None, *, seed: int = 0, val_size: int = 5000, train_size: int | None = None,
                  test_size: int | None = None, size: int = 28, labels_per_class: int = 20) -> ImageTask:
    """Fashion-MNIST as train, validation and test splits of 1 x `size` x `size` images, 10 classes; nothing is downloaded.

    Args:
        root: a folder holding ``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``,
            ``t10k-images-idx3-ubyte`` and ``t10k-labels-idx1-ubyte`` (each may end in ``.gz``),
            directly or in torchvision's ``root/FashionMNIST/raw/``. None: Debian's
            ``/usr/share/datasets/fashion-mnist`` (``apt-get install dataset-fashion-mnist``).
        seed: fixes which training images go to validation, the training subset, the test subset and
            the limited labels (same seed and files, same bytes).
        val_size: training images kept out for validation (calibration), stratified by class.
        train_size: how many of the remaining training images to train on (stratified); None: all.
        test_size: how many test images to evaluate on (stratified); None: all 10,000.
        size: image side in pixels; other than 28, the images are resized bilinearly.
        labels_per_class: training images per class that keep their label in `ImageTask.limited`.

    The images are scaled to [0, 1] and standardized with the training split's mean and standard
    deviation. Missing files raise FileNotFoundError saying where it looked and how to get them.

    Example::

        >>> task = fashion_mnist(train_size=10000)  # with the Debian package installed
        >>> len(task.train), len(task.val), len(task.test), task.num_classes
        (10000, 5000, 10000, 10)
    """
    require("seed", seed, "an int", is_int(seed))
    require("val_size", val_size, "an int >= 10 (one image per class at least)", is_int(val_size) and val_size >= 10)
    require("train_size", train_size, "None or an int >= 10", train_size is None or (is_int(train_size) and train_size >= 10))
    require("test_size", test_size, "None or an int >= 10", test_size is None or (is_int(test_size) and test_size >= 10))
    require("size", size, "an int >= 8", is_int(size) and size >= 8)
    require("labels_per_class", labels_per_class, "an int >= 1", is_int(labels_per_class) and labels_per_class >= 1)
    folders = _folders(root)
    train_images, train_labels = _read_split("train", folders)
    test_images, test_labels = _read_split("test", folders)
    available = len(train_labels) - val_size
    require("val_size", val_size, f"below the {len(train_labels)} training images in the files", available > 0)
    require("train_size", train_size, f"at most {available} (the training images left after val_size={val_size})",
            train_size is None or train_size <= available)
    require("test_size", test_size, f"at most {len(test_labels)} (the test images in the files)",
            test_size is None or test_size <= len(test_labels))
    g = torch.Generator().manual_seed(seed)
    val_rows = _stratified(train_labels, val_size, g)
    rest = torch.nonzero(~val_rows).flatten()
    if train_size is not None:
        rest = rest[_stratified(train_labels[rest], train_size, g)]
    val_index, test_index = torch.nonzero(val_rows).flatten(), torch.arange(len(test_labels))
    if test_size is not None:
        test_index = test_index[_stratified(test_labels, test_size, g)]

    def images(raw: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        x = raw[index].unsqueeze(1).float() / 255.0
        return x if size == raw.shape[-1] else F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False).clamp(0, 1)

    x_train, x_val, x_test = images(train_images, rest), images(train_images, val_index), images(test_images, test_index)
    mean, std = x_train.mean(), x_train.std()
    splits = [ImageSplit((x - mean) / std, labels[index], index)
              for x, labels, index in ((x_train, train_labels, rest), (x_val, train_labels, val_index), (x_test, test_labels, test_index))]
    labeled = torch.zeros(len(splits[0]), dtype=torch.bool)
    for c in range(len(FASHION_MNIST_CLASSES)):
        rows = torch.nonzero(splits[0].y == c).flatten()
        require("labels_per_class", labels_per_class, f"at most {len(rows)} (the training images of class {c})",
                labels_per_class <= len(rows))
        labeled[rows[torch.randperm(len(rows), generator=g)[:labels_per_class]]] = True
    return ImageTask(*splits, labeled=labeled, seed=seed, classes=FASHION_MNIST_CLASSES, name="Fashion-MNIST")
