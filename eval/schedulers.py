"""Sampler choice for evaluation generation (``GenerateConfig.scheduler``): a name -> a diffusers scheduler class.

The models load with DDIM (``erasure.diffusion.pipeline``); :func:`use_scheduler` swaps in another sampler built
from the same scheduler config for the duration of a block and puts the original back afterwards.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

__all__ = ["SCHEDULER_CLASSES", "use_scheduler"]

SCHEDULER_CLASSES = {
    "ddim": "DDIMScheduler",
    "lms": "LMSDiscreteScheduler",
    "euler": "EulerDiscreteScheduler",
    "euler_a": "EulerAncestralDiscreteScheduler",
    "pndm": "PNDMScheduler",
    "dpm": "DPMSolverMultistepScheduler",
}


@contextlib.contextmanager
def use_scheduler(pipe: Any, name: str) -> Iterator[Any]:
    """Run the block with ``pipe.scheduler`` replaced by sampler ``name`` (built from the pipe's scheduler config)."""
    if name not in SCHEDULER_CLASSES:
        raise ValueError(f"unknown scheduler {name!r}; choose one of {', '.join(SCHEDULER_CLASSES)}")
    import diffusers

    old = pipe.scheduler
    if type(old).__name__ != SCHEDULER_CLASSES[name]:
        pipe.scheduler = getattr(diffusers, SCHEDULER_CLASSES[name]).from_config(old.config)
    try:
        yield pipe
    finally:
        pipe.scheduler = old
