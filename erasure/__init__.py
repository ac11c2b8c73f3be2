"""SalUn concept erasure for Stable Diffusion (and unlearning for classifiers).

Public API::

    from erasure import ConceptSpec, EraseConfig, compute_mask, erase, load_erased_pipeline, generate, load_mask
"""

from __future__ import annotations

from erasure.config import ConceptSpec, EraseConfig, MaskConfig
from erasure.diffusion.pipeline import generate, load_pipeline
from erasure.diffusion.train import EraseCancelled, NonFiniteLossError, RunExistsError, compute_mask, erase
from erasure.methods import METHODS, register_method
from erasure.runs import RunDirError, load_erased_pipeline, read_run
from erasure.saliency import load_mask, mask_stats, save_mask

__version__ = "0.1.0"

__all__ = [
    "ConceptSpec",
    "EraseConfig",
    "MaskConfig",
    "compute_mask",
    "erase",
    "generate",
    "load_pipeline",
    "load_erased_pipeline",
    "read_run",
    "load_mask",
    "save_mask",
    "mask_stats",
    "METHODS",
    "register_method",
    "RunDirError",
    "RunExistsError",
    "NonFiniteLossError",
    "EraseCancelled",
]
