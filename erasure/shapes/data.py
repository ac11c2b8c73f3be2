"""Rendered datasets of the shapes world, cached as uint8 safetensors.

Image ``i`` of a dataset with base seed ``B`` is ``render_spec(spec_i, seed=B + i)`` where ``spec_i`` is drawn
from ``numpy.random.default_rng([B + i, 7])``. Disjoint seed ranges give disjoint datasets; the ranges used
by this package are listed in :data:`SEED_BASES` so train and test never overlap.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch

from erasure.shapes.render import COLORS, FILLS, SHAPES, render_spec, sample_spec

logger = logging.getLogger(__name__)

__all__ = ["SEED_BASES", "spec_for", "render_dataset", "load_or_render_dataset", "to_tensor", "to_pil"]

# disjoint seed ranges (each holds up to 10 million images)
SEED_BASES: dict[str, int] = {
    "train": 0,  # judge, VAE and text-to-image training
    "judge_val": 10_000_000,  # judge evaluation after training
    "test": 20_000_000,  # tests/test_shapes.py
    "bench": 30_000_000,  # bench/ scripts
}


def spec_for(index: int, base: int):
    """The (shape, color, fill) of image ``index`` in the dataset with base seed ``base``."""
    return sample_spec(np.random.default_rng([base + index, 7]))


def _render_chunk(args: tuple[int, int, int, int]) -> tuple[np.ndarray, np.ndarray]:
    base, start, stop, size = args
    imgs = np.empty((stop - start, size, size, 3), dtype=np.uint8)
    labels = np.empty((stop - start, 3), dtype=np.int64)
    for j, i in enumerate(range(start, stop)):
        spec = spec_for(i, base)
        imgs[j] = np.asarray(render_spec(spec, base + i, size))
        labels[j] = (SHAPES.index(spec.shape), COLORS.index(spec.color), FILLS.index(spec.fill))
    return imgs, labels


def render_dataset(
    n: int, base: int, size: int = 64, workers: int = 1, progress: Callable[[int, int], None] | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Render ``n`` images: ``(uint8 [n, 3, size, size], int64 labels [n, 3] = shape, color, fill indices)``."""
    chunk = 1000
    jobs = [(base, s, min(n, s + chunk), size) for s in range(0, n, chunk)]
    parts = []
    if workers > 1:
        with ProcessPoolExecutor(workers) as ex:
            for k, part in enumerate(ex.map(_render_chunk, jobs)):
                parts.append(part)
                if progress:
                    progress(k + 1, len(jobs))
    else:
        for k, job in enumerate(jobs):
            parts.append(_render_chunk(job))
            if progress:
                progress(k + 1, len(jobs))
    imgs = torch.from_numpy(np.concatenate([p[0] for p in parts])).permute(0, 3, 1, 2).contiguous()
    labels = torch.from_numpy(np.concatenate([p[1] for p in parts]))
    return imgs, labels


def load_or_render_dataset(
    path: str | os.PathLike, n: int, base: int, size: int = 64, workers: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """Load a cached dataset from ``path`` if it matches ``(n, base, size)``, else render and cache it."""
    from erasure.io import atomic_save_safetensors, load_safetensors

    p = Path(path)
    meta_want = {"n": str(n), "base": str(base), "size": str(size), "version": "2"}
    if p.is_file():
        tensors, meta = load_safetensors(p)
        if all(meta.get(k) == v for k, v in meta_want.items()):
            return tensors["images"], tensors["labels"]
        logger.info("cached dataset %s does not match %s; re-rendering", p, meta_want)
    logger.info("rendering %d images (base seed %d, %d px) to %s", n, base, size, p)
    imgs, labels = render_dataset(n, base, size, workers)
    atomic_save_safetensors({"images": imgs, "labels": labels}, p, metadata=meta_want)
    return imgs, labels


def to_tensor(images, size: int | None = None) -> torch.Tensor:
    """PIL images -> float tensor ``[n, 3, H, W]`` in ``[0, 1]`` (resized to ``size`` if given and different)."""
    from PIL import Image

    arrs = []
    for im in images:
        if not isinstance(im, Image.Image):
            raise TypeError(f"expected PIL images, got {type(im).__name__}")
        im = im.convert("RGB")
        if size is not None and im.size != (size, size):
            im = im.resize((size, size), Image.BICUBIC)
        arrs.append(np.asarray(im, dtype=np.uint8))
    return torch.from_numpy(np.stack(arrs)).permute(0, 3, 1, 2).float() / 255.0


def to_pil(batch: torch.Tensor) -> list:
    """Float tensor ``[n, 3, H, W]`` in ``[0, 1]`` -> PIL images."""
    from PIL import Image

    arr = (batch.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a, "RGB") for a in arr]
