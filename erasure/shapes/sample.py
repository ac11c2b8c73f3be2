"""Load the shapes pipeline and generate seeded images (one initial latent per seed, as ``erasure.diffusion``).

Image ``i`` starts from ``torch.randn((1, 4, 16, 16), generator=torch.Generator().manual_seed(seeds[i]))``, so an
image depends only on (prompt, seed, steps, guidance), not on its batch.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

import torch

__all__ = ["load_shapes_pipeline", "sample_images"]


def load_shapes_pipeline(path: str | os.PathLike | None = None, device: str | torch.device = "cpu"):
    """``StableDiffusionPipeline.from_pretrained`` of the shapes model (default ``models/shapes-sd``), fp32, no
    progress bar."""
    from diffusers import StableDiffusionPipeline

    from erasure.shapes import default_model_path

    pipe = StableDiffusionPipeline.from_pretrained(str(path or default_model_path()), dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


@torch.no_grad()
def sample_images(
    pipe,
    prompts: Sequence[str],
    seeds: Sequence[int],
    steps: int = 25,
    guidance: float = 7.5,
    batch_size: int = 16,
    progress: Callable[[int, int], None] | None = None,
) -> list:
    """One PIL image per (prompt, seed) pair, generated in batches of ``batch_size``."""
    if len(prompts) != len(seeds):
        raise ValueError(f"got {len(prompts)} prompts and {len(seeds)} seeds; give one seed per prompt")
    size = int(pipe.unet.config.sample_size)
    ch = int(pipe.unet.config.in_channels)
    out: list = []
    for i in range(0, len(prompts), batch_size):
        ps, ss = list(prompts[i : i + batch_size]), list(seeds[i : i + batch_size])
        lat = torch.cat(
            [torch.randn((1, ch, size, size), generator=torch.Generator().manual_seed(int(s))) for s in ss]
        ).to(pipe.device, pipe.unet.dtype)
        out.extend(pipe(ps, num_inference_steps=steps, guidance_scale=guidance, latents=lat).images)
        if progress is not None:
            progress(len(out), len(prompts))
    return out
