"""Forget and retain images of a class-conditional model's classes (float ``[n, 3, s, s]`` in ``[-1, 1]``).

Sources:
    ``render``    the shapes renderer (class = shape; colour and fill random), for models of the shapes world;
    ``dataset``   the torchvision CIFAR-10 / STL-10 training set under ``data_root`` (nothing is downloaded);
    ``generate``  the original model's own samples of the class (any model; the official DDPM code uses real
                  data, this is the fallback when there is none, e.g. tiny test models).
``auto`` picks ``render`` for a shapes model, ``dataset`` when ``data_root`` is given, else ``generate``.
Every draw is a pure function of ``(source, class, n, seed)``.
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["SOURCES", "resolve_source", "class_images"]

SOURCES = ("auto", "render", "dataset", "generate")
RENDER_BASE = 40_000_000  # seed range of erasure data, disjoint from erasure.shapes.data.SEED_BASES


def resolve_source(source: str, model, data_root: str = "") -> str:
    from erasure.shapes.render import SHAPES

    if source not in SOURCES:
        raise ValueError(f"data source must be one of {SOURCES}, got {source!r}")
    if source != "auto":
        if source == "render" and not set(model.class_names) <= set(SHAPES):
            raise ValueError("data source 'render' needs a shapes model (class names among the shapes); use --data generate")
        if source == "dataset" and not data_root:
            raise ValueError("data source 'dataset' needs --data-root (a torchvision CIFAR-10/STL-10 folder)")
        return source
    if model.extra.get("dataset", "shapes") == "shapes" and set(model.class_names) <= set(SHAPES):
        return "render"
    return "dataset" if data_root else "generate"


def _render(shape: str, n: int, seed: int, size: int) -> torch.Tensor:
    from erasure.shapes.render import COLORS, FILLS, SHAPES, ShapeSpec, render_spec

    rng = np.random.default_rng([seed, SHAPES.index(shape), 13])
    base = RENDER_BASE + (seed % 1000) * 10_000 + SHAPES.index(shape) * 1_000_000
    arr = []
    for i in range(n):
        spec = ShapeSpec(shape, COLORS[int(rng.integers(len(COLORS)))], FILLS[int(rng.integers(len(FILLS)))])
        arr.append(np.asarray(render_spec(spec, base + i, size)))
    return torch.from_numpy(np.stack(arr)).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def _dataset(model, class_idx: int, n: int, seed: int, data_root: str) -> torch.Tensor:
    from erasure.ddpm.train_model import DDPMTrainConfig, load_dataset

    name = model.extra.get("dataset", "cifar10")
    cfg = DDPMTrainConfig(dataset=name, data_root=data_root, image_size=model.image_size, work_dir="/tmp")
    imgs, labels, _ = load_dataset(cfg)
    idx = torch.nonzero(labels == class_idx).reshape(-1)
    if len(idx) == 0:
        raise ValueError(f"the dataset under {data_root} has no images of class {model.class_names[class_idx]!r}")
    pick = idx[torch.randperm(len(idx), generator=torch.Generator().manual_seed(seed))[:n]]
    return imgs[pick].float().div(127.5).sub(1.0)


def class_images(model, class_idx: int, n: int, seed: int, source: str = "auto", data_root: str = "") -> torch.Tensor:
    """``n`` images of class ``class_idx`` for ``model`` (a :class:`~erasure.ddpm.model.ClassDDPM`)."""
    src = resolve_source(source, model, data_root)
    if n <= 0:
        return torch.empty(0, 3, model.image_size, model.image_size)
    if src == "render":
        return _render(model.class_names[class_idx], n, seed, model.image_size)
    if src == "dataset":
        return _dataset(model, class_idx, n, seed, data_root)
    seeds = [RENDER_BASE + seed * 100_000 + class_idx * 10_000 + i for i in range(n)]
    return model.sample([class_idx] * n, seeds, output="tensor").mul(2).sub(1)
