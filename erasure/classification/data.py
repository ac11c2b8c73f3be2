"""Data sets as in-memory tensors, and deterministic forget/retain splits saved as JSON index lists.

The offline default is scikit-learn's bundled handwritten digits (1,797 real 8x8 images, no download),
split once into a fixed stratified 80/20 train/test partition. CIFAR-10, CIFAR-100 and SVHN are read
through torchvision from a user's data root; they are downloaded only when ``download=True``.

Like the official SalUn code (``Classification/dataset.py``), CIFAR-10, CIFAR-100 and SVHN hold out 10% of every
class of their training set as a validation set by default (``train_split="official"``: CIFAR-10 45,000 train /
5,000 held out), drawn with ``numpy.random.RandomState(1)`` class by class, as its original-model training does
(``cifar10_dataloaders``' default seed; its unlearning scripts re-split with ``--seed``, default 2, so their
45,000 are not exactly the original model's). ``train_split="full"`` keeps all 50,000.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from erasure.io import atomic_write_json, read_json

logger = logging.getLogger(__name__)

__all__ = [
    "TensorData",
    "DatasetBundle",
    "DatasetSpec",
    "DATASETS",
    "register_dataset",
    "load_dataset",
    "Split",
    "make_split",
    "as_input",
    "augment_batch",
    "DIGITS_SPLIT_SEED",
]

DIGITS_SPLIT_SEED = 0
"""Seed of the fixed stratified 80/20 train/test partition of the digits (independent of the unlearning seed)."""


@dataclass
class TensorData:
    """Images ``x`` (``N x C x H x W``, float in [0, 1] or uint8 in [0, 255]) and integer labels ``y``."""

    x: torch.Tensor
    y: torch.Tensor

    def __post_init__(self) -> None:
        if self.x.shape[0] != self.y.shape[0]:
            raise ValueError(f"{self.x.shape[0]} images but {self.y.shape[0]} labels")
        if self.x.ndim != 4:
            raise ValueError(f"images must be N x C x H x W, got shape {tuple(self.x.shape)}")

    def __len__(self) -> int:
        return int(self.y.shape[0])

    def subset(self, idx: torch.Tensor | list[int]) -> TensorData:
        idx_t = torch.as_tensor(idx, dtype=torch.long)
        return TensorData(self.x[idx_t], self.y[idx_t])


@dataclass
class DatasetBundle:
    """A loaded data set: train and test tensors plus what a model needs to be built for it."""

    name: str
    train: TensorData
    test: TensorData
    num_classes: int
    in_channels: int
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    augment: bool = False
    info: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class DatasetSpec:
    """How to load one data set, and its default original-training recipe (see ``config.TrainRecipe``)."""

    loader: Callable[[str | None, bool], tuple[TensorData, TensorData, dict[str, Any]]]
    num_classes: int
    in_channels: int
    native_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    augment: bool
    needs_root: bool


DATASETS: dict[str, DatasetSpec] = {}


def register_dataset(name: str, spec: DatasetSpec) -> None:
    """Add a data set to :data:`DATASETS`; duplicate names are rejected."""
    if name in DATASETS:
        raise ValueError(f"dataset {name!r} is already registered")
    DATASETS[name] = spec


def _digits(root: str | None, download: bool) -> tuple[TensorData, TensorData, dict[str, Any]]:
    del root, download  # bundled with scikit-learn
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    x = torch.from_numpy((bunch.images / 16.0).astype(np.float32)).unsqueeze(1)
    y = torch.from_numpy(bunch.target.astype(np.int64))
    idx = np.arange(len(y))
    tr, te = train_test_split(idx, test_size=0.2, random_state=DIGITS_SPLIT_SEED, stratify=bunch.target)
    tr, te = np.sort(tr), np.sort(te)
    info = {"source": "sklearn.datasets.load_digits", "train_test_split": "stratified 80/20",
            "split_seed": DIGITS_SPLIT_SEED, "train_index": tr.tolist(), "test_index": te.tolist()}
    return TensorData(x[tr], y[tr]), TensorData(x[te], y[te]), info


def _torchvision(name: str) -> Callable[[str | None, bool], tuple[TensorData, TensorData, dict[str, Any]]]:
    def load(root: str | None, download: bool) -> tuple[TensorData, TensorData, dict[str, Any]]:
        import torchvision

        if not root:
            raise ValueError(f"dataset {name!r} needs --data-root (a folder holding it, or where to download it)")
        root_p = Path(os.path.expanduser(root))
        if not download and not root_p.is_dir():
            raise FileNotFoundError(f"data root {root_p} does not exist; pass --download to fetch {name} there")
        out = []
        for train in (True, False):
            try:
                if name == "svhn":
                    ds = torchvision.datasets.SVHN(str(root_p), split="train" if train else "test", download=download)
                    x = torch.from_numpy(np.ascontiguousarray(ds.data))  # N x 3 x 32 x 32 uint8
                    y = torch.from_numpy(np.asarray(ds.labels, dtype=np.int64))
                else:
                    cls = torchvision.datasets.CIFAR10 if name == "cifar10" else torchvision.datasets.CIFAR100
                    ds = cls(str(root_p), train=train, download=download)
                    x = torch.from_numpy(np.ascontiguousarray(ds.data)).permute(0, 3, 1, 2).contiguous()
                    y = torch.from_numpy(np.asarray(ds.targets, dtype=np.int64))
            except RuntimeError as err:  # torchvision: "Dataset not found or corrupted"
                raise FileNotFoundError(
                    f"data root {root_p} does not contain {name} ({err}); pass --download to fetch it or "
                    f"point --data-root at the folder that holds it"
                ) from err
            out.append(TensorData(x, y))
        return out[0], out[1], {"source": f"torchvision.datasets ({name})", "root": str(root_p)}

    return load


register_dataset("digits", DatasetSpec(_digits, 10, 1, 8, (0.3053,), (0.3760,), augment=False, needs_root=False))
register_dataset("cifar10", DatasetSpec(_torchvision("cifar10"), 10, 3, 32, (0.4914, 0.4822, 0.4465),
                                        (0.2470, 0.2435, 0.2616), augment=True, needs_root=True))
register_dataset("cifar100", DatasetSpec(_torchvision("cifar100"), 100, 3, 32, (0.5071, 0.4865, 0.4409),
                                         (0.2673, 0.2564, 0.2762), augment=True, needs_root=True))
register_dataset("svhn", DatasetSpec(_torchvision("svhn"), 10, 3, 32, (0.4377, 0.4438, 0.4728),
                                     (0.1980, 0.2010, 0.1970), augment=False, needs_root=True))


OFFICIAL_HOLDOUT_SEED = 1
"""``numpy.random.RandomState`` seed of the official 10%-per-class validation hold-out."""
HOLDOUT_DATASETS = ("cifar10", "cifar100", "svhn")
TRAIN_SPLITS = ("official", "full")


def official_holdout(y: np.ndarray | torch.Tensor, fraction: float = 0.1, seed: int = OFFICIAL_HOLDOUT_SEED) -> np.ndarray:
    """Indices of the official validation hold-out: for each class in order, ``int(fraction * n_class)`` of its
    indices drawn without replacement by one ``RandomState(seed)`` (``Classification/dataset.py``)."""
    y = np.asarray(y)
    rng = np.random.RandomState(seed)
    return np.hstack([rng.choice(np.where(y == c)[0], int(fraction * int((y == c).sum())), replace=False)
                      for c in range(int(y.max()) + 1)])


def load_dataset(
    name: str, data_root: str | None = None, download: bool = False, image_size: int | None = None,
    train_split: str = "official",
) -> DatasetBundle:
    """Load a registered data set into memory.

    Args:
        name (`str`): ``digits``, ``cifar10``, ``cifar100`` or ``svhn``.
        data_root (`str`, *optional*): folder for the torchvision data sets (unused for digits).
        download (`bool`, defaults to `False`): let torchvision download a missing data set.
        image_size (`int`, *optional*): resize images to this side (bilinear), e.g. 32 for upsampled digits.
        train_split (`str`, defaults to `"official"`): for CIFAR-10/100 and SVHN, ``official`` drops the official
            10%-per-class validation hold-out from the training set (CIFAR-10: 45,000 left), ``full`` keeps it.

    Returns:
        `DatasetBundle`
    """
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; known: {sorted(DATASETS)}")
    if train_split not in TRAIN_SPLITS:
        raise ValueError(f"train_split must be one of {TRAIN_SPLITS}, got {train_split!r}")
    spec = DATASETS[name]
    train, test, info = spec.loader(data_root, download)
    if name in HOLDOUT_DATASETS and train_split == "official":
        held = official_holdout(train.y.numpy())
        keep = np.setdiff1d(np.arange(len(train)), held)  # sorted, as the official list(set(...)) of small ints
        train = train.subset(torch.from_numpy(keep))
        info = {**info, "train_split": "official", "held_out": int(len(held)),
                "held_out_rule": f"10% per class, numpy RandomState({OFFICIAL_HOLDOUT_SEED})"}
    elif name in HOLDOUT_DATASETS:
        info = {**info, "train_split": "full"}
    size = spec.native_size
    if image_size is not None and image_size != spec.native_size:
        if image_size < 4:
            raise ValueError(f"image_size must be >= 4, got {image_size}")
        train, test = _resize(train, image_size), _resize(test, image_size)
        size = image_size
    return DatasetBundle(name=name, train=train, test=test, num_classes=spec.num_classes,
                         in_channels=spec.in_channels, image_size=size, mean=spec.mean, std=spec.std,
                         augment=spec.augment, info=info)


def _resize(d: TensorData, size: int) -> TensorData:
    x = F.interpolate(as_input(d.x), size=(size, size), mode="bilinear", align_corners=False).clamp_(0.0, 1.0)
    return TensorData(x.contiguous(), d.y)


def as_input(x: torch.Tensor) -> torch.Tensor:
    """uint8 images -> float in [0, 1]; float images pass through."""
    return x.float().div_(255.0) if x.dtype == torch.uint8 else x


def augment_batch(x: torch.Tensor, generator: torch.Generator, pad: int = 4) -> torch.Tensor:
    """Random crop with zero padding and random horizontal flip (the CIFAR recipe), on a float batch."""
    n, _, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad))
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    rows = (dy.view(n, 1) + torch.arange(h).view(1, h)).view(n, 1, h, 1)
    cols = (dx.view(n, 1) + torch.arange(w).view(1, w)).view(n, 1, 1, w)
    b = torch.arange(n).view(n, 1, 1, 1)
    c = torch.arange(x.shape[1]).view(1, -1, 1, 1)
    out = padded[b, c, rows, cols]
    flip = torch.rand(n, generator=generator) < 0.5
    out[flip] = out[flip].flip(-1)
    return out


@dataclass
class Split:
    """Forget/retain indices into a data set's training part, deterministic from the seed.

    Args:
        dataset (`str`): data set name.
        scenario (`str`): ``"random"`` (a random fraction of the training set) or ``"class"`` (whole classes).
        seed (`int`): seed that drew the random forget set.
        forget_fraction (`float`, *optional*): the forgotten share for ``random``.
        forget_classes (`list[int]`): the forgotten classes for ``class``.
        n_train (`int`): size of the training set the indices refer to.
        forget (`list[int]`), retain (`list[int]`): sorted, disjoint, covering ``range(n_train)``.
    """

    dataset: str
    scenario: str
    seed: int
    forget_fraction: float | None
    forget_classes: list[int]
    n_train: int
    forget: list[int]
    retain: list[int]

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)

    def save(self, path: str | os.PathLike) -> None:
        atomic_write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | os.PathLike) -> Split:
        data = read_json(path)
        try:
            return cls(**data)
        except TypeError as err:
            raise ValueError(f"{path} is not a split file ({err})") from err


def make_split(
    dataset: str,
    train_y: torch.Tensor,
    num_classes: int,
    scenario: str,
    seed: int,
    forget_fraction: float | None = None,
    forget_classes: list[int] | tuple[int, ...] = (),
) -> Split:
    """Build the forget/retain split.

    Random forgetting draws ``round(forget_fraction * n)`` indices with a ``torch.Generator`` seeded by
    ``seed``; class-wise forgetting takes every training sample of ``forget_classes``.

    Returns:
        `Split`
    """
    n = int(train_y.shape[0])
    if scenario == "random":
        if forget_fraction is None or not (0.0 < float(forget_fraction) < 1.0):
            raise ValueError(f"forget fraction must be in (0, 1), got {forget_fraction}")
        if forget_classes:
            raise ValueError("random forgetting takes no forget classes; use scenario 'class'")
        k = int(round(float(forget_fraction) * n))
        if k < 1 or k > n - 1:
            raise ValueError(f"forget fraction {forget_fraction} of {n} samples leaves an empty forget or retain set")
        g = torch.Generator().manual_seed(int(seed))
        perm = torch.randperm(n, generator=g)
        forget = sorted(perm[:k].tolist())
        classes: list[int] = []
    elif scenario == "class":
        classes = sorted({int(c) for c in forget_classes})
        if not classes:
            raise ValueError("class-wise forgetting needs at least one forget class (--forget-class K)")
        bad = [c for c in classes if not 0 <= c < num_classes]
        if bad:
            raise ValueError(f"unknown class(es) {bad}: {dataset} has classes 0..{num_classes - 1}")
        if len(classes) == num_classes:
            raise ValueError("cannot forget every class: nothing would be retained")
        sel = torch.isin(train_y, torch.tensor(classes))
        forget = torch.nonzero(sel).view(-1).tolist()
        if not forget:
            raise ValueError(f"no training samples of class(es) {classes}")
        forget_fraction = None
    else:
        raise ValueError(f"unknown scenario {scenario!r}; choose 'random' or 'class'")
    fset = set(forget)
    retain = [i for i in range(n) if i not in fset]
    return Split(dataset=dataset, scenario=scenario, seed=int(seed), forget_fraction=forget_fraction,
                 forget_classes=classes, n_train=n, forget=forget, retain=retain)
