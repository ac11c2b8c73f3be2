"""Losses of the diffusion erasure methods, written against a small :class:`StepBatch`."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = ["StepBatch", "add_noise", "unet_eps", "mask_loss", "remap_loss", "denoise_loss", "distill_loss", "weighted_mse", "esd_loss"]


@dataclass
class StepBatch:
    """Everything one training (micro-)step needs, already on the device.

    ``forget_*``: Df latents, their noisy version at ``forget_t`` and the prompt embeddings of each image's
    forget prompt and its anchor; ``retain_*``: the same for Dr (may be ``None``); ``uncond``: the "" embedding.
    """

    forget_x: torch.Tensor
    forget_t: torch.Tensor
    forget_noise: torch.Tensor
    forget_cond: torch.Tensor
    anchor_cond: torch.Tensor
    uncond: torch.Tensor
    retain_x: torch.Tensor | None = None
    retain_t: torch.Tensor | None = None
    retain_noise: torch.Tensor | None = None
    retain_cond: torch.Tensor | None = None
    retain_weight: torch.Tensor | None = None  # [B] per-image weight of the retain loss (None: all 1)


def add_noise(scheduler, latents: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Forward diffusion at uniform random timesteps: returns (x_t, t, noise). Randomness comes from ``generator`` (CPU)."""
    n = latents.shape[0]
    t = torch.randint(0, scheduler.config.num_train_timesteps, (n,), generator=generator).to(latents.device)
    noise = torch.randn(latents.shape, generator=generator, dtype=torch.float32).to(latents.device, latents.dtype)
    return scheduler.add_noise(latents, noise, t), t, noise


def unet_eps(unet, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
    return unet(x, t, encoder_hidden_states=cond).sample


def mask_loss(unet, b: StepBatch, guidance: float) -> torch.Tensor:
    """SalUn saliency loss: -MSE(noise, eps_cfg) with eps_cfg = (1+w) eps(x_t, c) - w eps(x_t, "")."""
    n = b.forget_x.shape[0]
    eps = unet_eps(
        unet, torch.cat([b.forget_x, b.forget_x]), torch.cat([b.forget_t, b.forget_t]),
        torch.cat([b.forget_cond, b.uncond.expand(n, -1, -1)]),
    )
    eps_c, eps_u = eps.chunk(2)
    eps_cfg = (1 + guidance) * eps_c - guidance * eps_u
    return -F.mse_loss(eps_cfg.float(), b.forget_noise.float())


def remap_loss(unet, b: StepBatch) -> torch.Tensor:
    """Concept remapping: MSE(eps(x_t, c_forget), stopgrad eps(x_t, c_anchor)) on Df."""
    with torch.no_grad():
        target = unet_eps(unet, b.forget_x, b.forget_t, b.anchor_cond)
    pred = unet_eps(unet, b.forget_x, b.forget_t, b.forget_cond)
    return F.mse_loss(pred.float(), target.float())


def weighted_mse(pred: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """MSE; with ``weight`` [B] (repeated over any leading copies of the batch) the mean of per-image MSEs x weight."""
    if weight is None:
        return F.mse_loss(pred.float(), target.float())
    per = (pred.float() - target.float()).pow(2).flatten(1).mean(1)
    w = weight.to(per).repeat(per.shape[0] // weight.shape[0])
    return (per * w).mean()


def denoise_loss(unet, x: torch.Tensor, t: torch.Tensor, noise: torch.Tensor, cond: torch.Tensor,
                 weight: torch.Tensor | None = None) -> torch.Tensor:
    """Standard epsilon-prediction denoising MSE (per-image ``weight`` optional)."""
    return weighted_mse(unet_eps(unet, x, t, cond), noise, weight)


def distill_loss(
    unet, frozen_unet, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor, uncond: torch.Tensor | None = None,
    weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """Retain distillation: MSE(eps_theta(x_t, c), stopgrad eps*(x_t, c)) with the frozen original eps*.

    With ``uncond`` the "" prediction on the same x_t is distilled too (one batched call): classifier-free
    guidance multiplies any drift of eps(x_t, "") by the guidance scale in every generation, not only the
    retain prompts'. Zero at the start of training; unlike :func:`denoise_loss` the target carries no sampling
    noise, so small retain batches at a high learning rate do not random-walk the weights away.
    """
    if uncond is not None:
        n = x.shape[0]
        x, t, cond = torch.cat([x, x]), torch.cat([t, t]), torch.cat([cond, uncond.expand(n, -1, -1)])
    with torch.no_grad():
        target = unet_eps(frozen_unet, x, t, cond)
    return weighted_mse(unet_eps(unet, x, t, cond), target, weight)


def esd_loss(unet, frozen_unet, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor, uncond: torch.Tensor, eta: float) -> torch.Tensor:
    """ESD: MSE(eps_theta(x_t, c), eps*(x_t, "") - eta (eps*(x_t, c) - eps*(x_t, ""))) with the frozen original eps*."""
    n = x.shape[0]
    with torch.no_grad():
        e = unet_eps(frozen_unet, torch.cat([x, x]), torch.cat([t, t]), torch.cat([cond, uncond.expand(n, -1, -1)]))
        e_c, e_u = e.chunk(2)
        target = e_u - eta * (e_c - e_u)
    pred = unet_eps(unet, x, t, cond)
    return F.mse_loss(pred.float(), target.float())


@torch.no_grad()
def ddim_partial_sample(
    unet, scheduler_config, cond: torch.Tensor, uncond: torch.Tensor, shape: tuple[int, ...], num_steps: int,
    generator: torch.Generator, guidance: float = 3.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """ESD's x_t: run DDIM from noise with the current model for a random number of steps.

    Returns (x_t, t) where ``t`` is the training timestep that x_t corresponds to (one per batch item).
    """
    from diffusers import DDIMScheduler

    sched = DDIMScheduler.from_config(scheduler_config)
    sched.set_timesteps(num_steps)
    stop = int(torch.randint(0, num_steps, (1,), generator=generator))
    x = torch.randn(shape, generator=generator, dtype=torch.float32).to(cond.device, cond.dtype)
    n = shape[0]
    for i, ts in enumerate(sched.timesteps):
        if i == stop:
            break
        t = ts.expand(n).to(x.device)
        e = unet_eps(unet, torch.cat([x, x]), torch.cat([t, t]), torch.cat([cond, uncond.expand(n, -1, -1)]))
        e_c, e_u = e.chunk(2)
        x = sched.step(e_u + guidance * (e_c - e_u), ts, x).prev_sample
    t_final = sched.timesteps[stop].expand(n).to(x.device)
    return x, t_final
