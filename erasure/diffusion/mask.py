"""The saliency-mask phase of a diffusion erasure: score the denoiser's weights on Df, keep the top ratio.

The mask is computed over the parameters the run may train (``trainable``: the method's or the config's
filter) and is always intersected with that filter before it is saved, so a saved mask shows exactly the
weights that could change.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import torch

from erasure.backbones import Backbone, get_backbone
from erasure.config import EraseConfig, MaskConfig
from erasure.diffusion.data import ForgetRetainData
from erasure.diffusion.losses import StepBatch, mask_loss
from erasure.progress import Progress, stage_callback
from erasure.saliency import accumulate_gradients, load_mask, mask_stats, save_mask, threshold_mask

__all__ = ["trainable_filter", "step_generator", "compute_mask_from_data", "mask_settings", "resolve_mask",
           "save_run_mask"]


def trainable_filter(name: str, mode: str, backbone: Backbone | None = None) -> bool:
    """Which denoiser parameters may train: ``full``, ``xattn`` (cross-attention: UNet ``attn2``; MMDiT text-stream
    projections), ``noxattn`` (the rest but embedding/output layers, as ESD-u). ``backbone`` defaults to SD v1/v2."""
    return (backbone or get_backbone("sd")).trainable(name, mode)


def step_generator(seed: int, step: int, rank: int = 0, salt: int = 0) -> torch.Generator:
    """The CPU generator of training step ``step`` (so a resumed run draws what an uninterrupted one would)."""
    return torch.Generator("cpu").manual_seed((seed * 1_000_003 + step * 7919 + rank * 104_729 + salt) % (2**63))


def compute_mask_from_data(
    unet, scheduler, data: ForgetRetainData, cfg: MaskConfig, seed: int, batch_size: int, trainable: str = "full",
    progress: Progress | None = None, backbone: Backbone | None = None,
) -> dict[str, torch.Tensor]:
    """Saliency mask over the denoiser parameters selected by ``trainable``; the others get all-False masks."""
    backbone = backbone or get_backbone("sd")
    named = dict(unet.named_parameters())
    scored = {n: p for n, p in named.items() if trainable_filter(n, trainable, backbone)}
    req = {n: p.requires_grad for n, p in named.items()}
    for n, p in named.items():
        p.requires_grad_(n in scored)
    nf = data.forget_latents.shape[0]
    n_batches = cfg.mask_batches or math.ceil(nf / batch_size)
    device = next(unet.parameters()).device

    def batches():
        for i in range(n_batches):
            g = step_generator(seed, i, salt=17)
            idx = torch.arange(i * batch_size, (i + 1) * batch_size) % nf
            x_t, t, noise = backbone.noise(scheduler, data.latents("forget", idx, g).to(device), g)
            yield StepBatch(
                forget_x=x_t, forget_t=t, forget_noise=noise,
                forget_cond=data.embeddings[data.forget_prompt[idx]].to(device),
                anchor_cond=data.embeddings[data.anchor_prompt[idx]].to(device),
                uncond=data.uncond.to(device),
            )

    try:
        scores = accumulate_gradients(
            scored, batches(), lambda b: mask_loss(unet, b, cfg.mask_guidance, predict=backbone.predict),
            mode=cfg.mask_score, total=n_batches,
            progress=stage_callback(progress, "mask"), score_dtype=cfg.mask_score_dtype,
        )
    finally:
        for n, p in named.items():
            p.requires_grad_(req[n])
            p.grad = None
    mask = threshold_mask(scores, cfg.mask_ratio, consume=True)  # frees each score once its mask exists
    del scores
    for n, p in named.items():
        if n not in mask:
            mask[n] = torch.zeros(p.shape, dtype=torch.bool, device=p.device)
    return {n: mask[n] for n in named}


def mask_settings(cfg: EraseConfig, trainable: str) -> dict[str, Any]:
    """What a computed mask depends on; a mask saved in a partial run folder is reused only if these match."""
    return {"mask_config": MaskConfig(mask_ratio=cfg.mask_ratio, mask_guidance=cfg.mask_guidance,
                                      mask_batches=cfg.mask_batches, mask_score=cfg.mask_score,
                                      mask_score_dtype=cfg.mask_score_dtype).to_dict(),
            "concepts": [c.to_dict() for c in cfg.concepts], "trainable": trainable, "seed": cfg.seed,
            "batch_size": cfg.batch_size, "model": cfg.model, "forget_images_per_prompt": cfg.forget_images_per_prompt,
            "data_steps": cfg.data_steps, "data_guidance": cfg.data_guidance, "resolution": cfg.resolution,
            "mask_path": cfg.mask_path, **({"image_latents": cfg.image_latents} if cfg.image_latents != "mean" else {}),
            **({"drop_t5": True} if cfg.drop_t5 else {})}


def _saved_settings(path: Path) -> dict[str, Any] | None:
    import json

    from erasure.io import CorruptFileError, load_safetensors

    try:
        _, meta = load_safetensors(path)
        return json.loads(meta.get("settings", "null"))
    except (CorruptFileError, ValueError):
        return None


def resolve_mask(
    cfg: EraseConfig, unet, scheduler, data: ForgetRetainData | None, trainable: str, partial: Path,
    given: dict[str, torch.Tensor] | None = None, progress: Progress | None = None, backbone: Backbone | None = None,
) -> tuple[dict[str, torch.Tensor], bool]:
    """The run's mask, intersected with ``trainable``: ``given``, else ``cfg.mask_path``, else the one an interrupted
    run saved with the same settings, else computed. Returns ``(mask, computed)``."""
    named = dict(unet.named_parameters())
    computed = False
    mask = given
    if mask is None and cfg.mask_path:
        mask = load_mask(cfg.mask_path)
    saved = partial / "mask.safetensors"
    if mask is None and saved.is_file() and _saved_settings(saved) == mask_settings(cfg, trainable):
        mask = load_mask(saved)
    if mask is None:
        if data is None:
            raise ValueError("a saliency mask needs the forget set Df")
        mask = compute_mask_from_data(unet, scheduler, data, cfg, cfg.seed, cfg.batch_size, trainable, progress,
                                      backbone)
        computed = True
    missing = sorted(set(named) - set(mask))
    if missing:
        raise ValueError(f"the mask does not match this model (no entry for {missing[0]}); recompute it for this model")
    for n, m in mask.items():
        if n in named and tuple(m.shape) != tuple(named[n].shape):
            raise ValueError(f"the mask does not match this UNet ({n} is {tuple(m.shape)} in the mask, "
                             f"{tuple(named[n].shape)} in the UNet); recompute it for this model")
    return {n: m.to(named[n].device).bool() & trainable_filter(n, trainable, backbone) for n, m in mask.items()
            if n in named}, computed


def save_run_mask(mask: dict[str, torch.Tensor], path: str | os.PathLike, cfg: EraseConfig, trainable: str,
                  base_model: str) -> None:
    """Save the (already intersected) mask of a run with the settings it came from."""
    stats = mask_stats(mask)
    save_mask(mask, path, metadata={"base_model": base_model, "mask_ratio": cfg.mask_ratio, "trainable": trainable,
                                    "settings": mask_settings(cfg, trainable), "kept": stats["kept"],
                                    "total": stats["total"]})
