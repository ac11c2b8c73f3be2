"""Classifiers: ResNet-18 with the CIFAR stem (as in the SalUn paper) and a small CNN for fast runs.

Every model normalises its [0, 1] input itself (so adversarial steps such as Boundary Shrink work in
pixel space), exposes ``features(x)`` (penultimate activations) and a final ``fc`` ``nn.Linear``.
Checkpoints are safetensors files whose metadata names the architecture; loading one into another
architecture raises a clear error.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from erasure.io import atomic_save_safetensors, load_safetensors

logger = logging.getLogger(__name__)

__all__ = ["MODELS", "register_model", "build_model", "save_checkpoint", "load_checkpoint", "SmallCNN",
           "ResNet18", "Classifier"]

CHECKPOINT_FORMAT = "erasure-cls-checkpoint-v1"


class Normalize(nn.Module):
    """Per-channel ``(x - mean) / std`` with constant buffers."""

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class Classifier(nn.Module):
    """Base class: ``forward(x) = fc(features(x))`` with input normalisation inside ``features``."""

    arch: str = ""
    fc: nn.Linear

    def features(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))


class SmallCNN(Classifier):
    """Three 3x3 conv blocks (32, 64, 128 channels, BatchNorm, ReLU, two 2x2 poolings), global pooling, linear."""

    arch = "small_cnn"

    def __init__(self, num_classes: int, in_channels: int, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        super().__init__()
        self.normalize = Normalize(mean, std)

        def block(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())

        self.body = nn.Sequential(block(in_channels, 32), block(32, 64), nn.MaxPool2d(2), block(64, 128),
                                  nn.MaxPool2d(2))
        self.fc = nn.Linear(128, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        h = self.body(self.normalize(x))
        return F.adaptive_avg_pool2d(h, 1).flatten(1)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet18(Classifier):
    """ResNet-18 with the CIFAR stem: a 3x3 stride-1 first convolution and no max-pooling."""

    arch = "resnet18"

    def __init__(self, num_classes: int, in_channels: int, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        super().__init__()
        self.normalize = Normalize(mean, std)
        self.conv1 = nn.Conv2d(in_channels, 64, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        layers, cin = [], 64
        for i, (cout, stride) in enumerate(((64, 1), (128, 2), (256, 2), (512, 2))):
            layers.append(nn.Sequential(BasicBlock(cin, cout, stride), BasicBlock(cout, cout, 1)))
            cin = cout
            setattr(self, f"layer{i + 1}", layers[-1])
        self.fc = nn.Linear(512, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.bn1(self.conv1(self.normalize(x))))
        h = self.layer4(self.layer3(self.layer2(self.layer1(h))))
        return F.adaptive_avg_pool2d(h, 1).flatten(1)


MODELS: dict[str, Callable[..., Classifier]] = {}


def register_model(name: str, ctor: Callable[..., Classifier]) -> None:
    """Add an architecture to :data:`MODELS`; duplicate names are rejected."""
    if name in MODELS:
        raise ValueError(f"model {name!r} is already registered")
    MODELS[name] = ctor


register_model("small_cnn", SmallCNN)
register_model("resnet18", ResNet18)


def build_model(
    arch: str, num_classes: int, in_channels: int, mean: tuple[float, ...], std: tuple[float, ...],
    seed: int | None = None,
) -> Classifier:
    """Build a freshly initialised model (initialised under ``torch.manual_seed(seed)`` scope when given)."""
    if arch not in MODELS:
        raise ValueError(f"unknown model {arch!r}; known: {sorted(MODELS)}")
    if seed is None:
        return MODELS[arch](num_classes, in_channels, mean, std)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        return MODELS[arch](num_classes, in_channels, mean, std)


def save_checkpoint(model: Classifier, path: str | os.PathLike, extra: dict[str, Any] | None = None) -> None:
    """Save ``model.state_dict()`` as safetensors, with the architecture and ``extra`` (JSON) in the metadata."""
    meta = {
        "format": CHECKPOINT_FORMAT,
        "arch": model.arch,
        "num_classes": str(model.fc.out_features),
        "extra": json.dumps(extra or {}),
    }
    atomic_save_safetensors(dict(model.state_dict()), path, metadata=meta)


def load_checkpoint(model: Classifier, path: str | os.PathLike) -> dict[str, Any]:
    """Load a checkpoint saved by :func:`save_checkpoint` into ``model``.

    Raises:
        `ValueError`: the checkpoint is for another architecture or another number of classes/channels.

    Returns:
        `dict`: the ``extra`` metadata stored with the checkpoint.
    """
    tensors, meta = load_safetensors(path)
    arch = meta.get("arch")
    if arch is None:
        raise ValueError(f"{path} has no architecture metadata; it was not written by erasure-cls")
    if arch != model.arch:
        raise ValueError(f"checkpoint {path} is for architecture {arch!r}, but the model is {model.arch!r}")
    own = model.state_dict()
    missing = sorted(set(own) - set(tensors))
    unexpected = sorted(set(tensors) - set(own))
    if missing or unexpected:
        raise ValueError(f"checkpoint {path} does not match {model.arch}: missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]}")
    for k, t in tensors.items():
        if tuple(t.shape) != tuple(own[k].shape):
            raise ValueError(f"checkpoint {path} does not match this {model.arch}: {k} has shape {tuple(t.shape)}, "
                             f"model expects {tuple(own[k].shape)} (other number of classes or channels?)")
    model.load_state_dict(tensors)
    try:
        return json.loads(meta.get("extra", "{}"))
    except json.JSONDecodeError:
        return {}
