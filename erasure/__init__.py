"""SalUn concept erasure for Stable Diffusion (and unlearning for classifiers).

Public API::

    from erasure import ConceptSpec, EraseConfig, compute_mask, erase, load_erased_pipeline, generate, load_mask

Names are imported on first use, so ``import erasure`` (and every console script) starts without importing
torch; the entry points choose the threading settings first (see :mod:`erasure.threads`).
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "ConceptSpec": "erasure.config",
    "EraseConfig": "erasure.config",
    "MaskConfig": "erasure.config",
    "compute_mask": "erasure.diffusion.train",
    "erase": "erasure.diffusion.train",
    "EraseCancelled": "erasure.diffusion.train",
    "NonFiniteLossError": "erasure.diffusion.train",
    "RunExistsError": "erasure.diffusion.train",
    "generate": "erasure.diffusion.pipeline",
    "load_pipeline": "erasure.diffusion.pipeline",
    "METHODS": "erasure.methods",
    "register_method": "erasure.methods",
    "RunDirError": "erasure.runs",
    "load_erased_pipeline": "erasure.runs",
    "read_run": "erasure.runs",
    "load_mask": "erasure.saliency",
    "save_mask": "erasure.saliency",
    "mask_stats": "erasure.saliency",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'erasure' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
