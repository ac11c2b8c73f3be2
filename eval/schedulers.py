"""Sampler choice for evaluation generation (``GenerateConfig.scheduler``): a name -> a diffusers scheduler class.

UNet models load with DDIM (``erasure.diffusion.pipeline``); :func:`use_scheduler` swaps in another sampler built
from the same scheduler config for the duration of a block and puts the original back afterwards. SD3 and FLUX keep
their flow-matching scheduler (``ddim``, the default, means "the sampler the model loads with" there).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

__all__ = ["SCHEDULER_CLASSES", "check_scheduler", "use_scheduler"]

SCHEDULER_CLASSES = {
    "ddim": "DDIMScheduler",
    "lms": "LMSDiscreteScheduler",
    "euler": "EulerDiscreteScheduler",
    "euler_a": "EulerAncestralDiscreteScheduler",
    "pndm": "PNDMScheduler",
    "dpm": "DPMSolverMultistepScheduler",
}


FLOW_MATCHING_ERROR = ("scheduler {name!r} is a sampler for UNet models (SD, SDXL); SD3 and FLUX sample with their "
                       "flow-matching scheduler: drop --scheduler")


def check_scheduler(model: Any, name: str) -> None:
    """Raise ``ValueError`` (one line) when sampler ``name`` cannot drive ``model`` (a folder or hub id)."""
    if name not in SCHEDULER_CLASSES:
        raise ValueError(f"unknown scheduler {name!r}; choose one of {', '.join(SCHEDULER_CLASSES)}")
    from erasure.backbones import detect_family

    try:
        family = detect_family(model)
    except (OSError, ValueError):
        return  # not a readable folder (a hub id): checked when the pipeline is loaded
    if family in ("sd3", "flux") and name != "ddim":
        raise ValueError(FLOW_MATCHING_ERROR.format(name=name))


@contextlib.contextmanager
def use_scheduler(pipe: Any, name: str) -> Iterator[Any]:
    """Run the block with ``pipe.scheduler`` replaced by sampler ``name`` (built from the pipe's scheduler config)."""
    if name not in SCHEDULER_CLASSES:
        raise ValueError(f"unknown scheduler {name!r}; choose one of {', '.join(SCHEDULER_CLASSES)}")
    import diffusers

    old = pipe.scheduler
    if type(old).__name__.startswith("FlowMatch"):  # SD3 / FLUX: the pipeline's own flow-matching sampler
        if name != "ddim":  # "ddim" is the default, i.e. the sampler the model loads with
            raise ValueError(FLOW_MATCHING_ERROR.format(name=name))
        name = ""
    if name and type(old).__name__ != SCHEDULER_CLASSES[name]:
        pipe.scheduler = getattr(diffusers, SCHEDULER_CLASSES[name]).from_config(old.config)
    try:
        yield pipe
    finally:
        pipe.scheduler = old
