"""A tiny random class-conditional DDPM built in code, for tests and examples (a few thousand weights, 8 px)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

__all__ = ["tiny_class_ddpm"]


def tiny_class_ddpm(path: str | os.PathLike, class_names: list[str] | None = None, image_size: int = 8, seed: int = 0) -> Path:
    """Write a random class-conditional DDPM folder (the shapes as classes by default) and return its path."""
    from erasure.ddpm.model import ClassDDPM, build_scheduler, build_unet
    from erasure.shapes.render import SHAPES

    names = list(class_names or SHAPES)
    torch.manual_seed(seed)
    unet = build_unet(len(names), image_size, (8, 16), (False, True), layers_per_block=1, norm_num_groups=4)
    sched = build_scheduler("ddim")
    sched.register_to_config(timestep_spacing="trailing")
    ClassDDPM(unet, sched, names, guidance_scale=2.0, num_inference_steps=4).save(
        path, extra={"image_size": image_size, "dataset": "shapes"})
    # the recipe `retrain` reuses (a few steps on a few rendered images)
    recipe = {"dataset": "shapes", "n_images": 48, "image_size": image_size, "channels": [8, 16], "attention": [0, 1],
              "norm_groups": 4, "steps": 2, "batch_size": 4, "warmup_steps": 1, "checkpoint_every": 1, "log_every": 1,
              "bf16": False, "seed": seed}
    (Path(path) / "training_info.json").write_text(json.dumps({"config": recipe}, indent=2) + "\n")
    return Path(path)
