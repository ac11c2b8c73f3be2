"""Losses of the diffusion erasure methods, written against a small :class:`StepBatch`.

Every loss calls the denoiser through ``predict(denoiser, x_t, t, cond)`` (a backbone's
:meth:`~erasure.backbones.Backbone.predict`; default :func:`unet_eps`, the SD v1/v2 UNet) and compares in the
space of the family's training target (epsilon, v or flow velocity), so the same loss serves every family.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from erasure.backbones import cat_cond, expand_cond
from erasure.backbones.sd import unet_predict

__all__ = ["StepBatch", "add_noise", "unet_eps", "mask_loss", "remap_loss", "denoise_loss", "distill_loss", "weighted_mse", "esd_loss"]

Predict = Callable[[Any, torch.Tensor, torch.Tensor, Any], torch.Tensor]


@dataclass
class StepBatch:
    """Everything one training (micro-)step needs, already on the device.

    ``forget_*``: Df latents, their noisy version at ``forget_t``, the training target (``forget_noise``: the
    noise for epsilon prediction; v or ``noise - x0`` for other families) and the conditions of each image's
    forget prompt and its anchor; ``retain_*``: the same for Dr (may be ``None``); ``uncond``: the "" condition.
    Conditions are :class:`erasure.backbones.Cond` (or plain embedding tensors for SD v1/v2).
    """

    forget_x: torch.Tensor
    forget_t: torch.Tensor
    forget_noise: torch.Tensor
    forget_cond: Any
    anchor_cond: Any
    uncond: Any
    retain_x: torch.Tensor | None = None
    retain_t: torch.Tensor | None = None
    retain_noise: torch.Tensor | None = None
    retain_cond: Any = None
    retain_weight: torch.Tensor | None = None  # [B] per-image weight of the retain loss (None: all 1)


def add_noise(scheduler, latents: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Forward diffusion at uniform random timesteps: returns (x_t, t, noise). Randomness comes from ``generator`` (CPU)."""
    n = latents.shape[0]
    t = torch.randint(0, scheduler.config.num_train_timesteps, (n,), generator=generator).to(latents.device)
    noise = torch.randn(latents.shape, generator=generator, dtype=torch.float32).to(latents.device, latents.dtype)
    return scheduler.add_noise(latents, noise, t), t, noise


def unet_eps(unet, x: torch.Tensor, t: torch.Tensor, cond) -> torch.Tensor:
    return unet_predict(unet, x, t, cond)


def _with_uncond(x, t, cond, uncond):
    n = x.shape[0]
    return torch.cat([x, x]), torch.cat([t, t]), cat_cond(cond, expand_cond(uncond, n))


def mask_loss(unet, b: StepBatch, guidance: float, predict: Predict = unet_eps) -> torch.Tensor:
    """SalUn saliency loss: -MSE(target, pred_cfg) with pred_cfg = (1+w) pred(x_t, c) - w pred(x_t, "")."""
    eps = predict(unet, *_with_uncond(b.forget_x, b.forget_t, b.forget_cond, b.uncond))
    eps_c, eps_u = eps.chunk(2)
    eps_cfg = (1 + guidance) * eps_c - guidance * eps_u
    return -F.mse_loss(eps_cfg.float(), b.forget_noise.float())


def remap_loss(unet, b: StepBatch, predict: Predict = unet_eps) -> torch.Tensor:
    """Concept remapping: MSE(pred(x_t, c_forget), stopgrad pred(x_t, c_anchor)) on Df."""
    with torch.no_grad():
        target = predict(unet, b.forget_x, b.forget_t, b.anchor_cond)
    pred = predict(unet, b.forget_x, b.forget_t, b.forget_cond)
    return F.mse_loss(pred.float(), target.float())


def weighted_mse(pred: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """MSE; with ``weight`` [B] (repeated over any leading copies of the batch) the mean of per-image MSEs x weight."""
    if weight is None:
        return F.mse_loss(pred.float(), target.float())
    per = (pred.float() - target.float()).pow(2).flatten(1).mean(1)
    w = weight.to(per).repeat(per.shape[0] // weight.shape[0])
    return (per * w).mean()


def denoise_loss(unet, x: torch.Tensor, t: torch.Tensor, noise: torch.Tensor, cond, predict: Predict = unet_eps,
                 weight: torch.Tensor | None = None) -> torch.Tensor:
    """Standard denoising MSE to the training target (``noise``: epsilon, v or flow velocity); per-image
    ``weight`` optional."""
    return weighted_mse(predict(unet, x, t, cond), noise, weight)


def distill_loss(
    unet, frozen_unet, x: torch.Tensor, t: torch.Tensor, cond, uncond=None, predict: Predict = unet_eps,
    weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """Retain distillation: MSE(pred_theta(x_t, c), stopgrad pred*(x_t, c)) with the frozen original pred*.

    With ``uncond`` the "" prediction on the same x_t is distilled too (one batched call): classifier-free
    guidance multiplies any drift of pred(x_t, "") by the guidance scale in every generation, not only the
    retain prompts'. Zero at the start of training; unlike :func:`denoise_loss` the target carries no sampling
    noise, so small retain batches at a high learning rate do not random-walk the weights away.
    """
    if uncond is not None:
        x, t, cond = _with_uncond(x, t, cond, uncond)
    with torch.no_grad():
        target = predict(frozen_unet, x, t, cond)
    return weighted_mse(predict(unet, x, t, cond), target, weight)


def esd_loss(unet, frozen_unet, x: torch.Tensor, t: torch.Tensor, cond, uncond, eta: float,
             predict: Predict = unet_eps) -> torch.Tensor:
    """ESD: MSE(pred_theta(x_t, c), pred*(x_t, "") - eta (pred*(x_t, c) - pred*(x_t, ""))) with the frozen original."""
    with torch.no_grad():
        e = predict(frozen_unet, *_with_uncond(x, t, cond, uncond))
        e_c, e_u = e.chunk(2)
        target = e_u - eta * (e_c - e_u)
    pred = predict(unet, x, t, cond)
    return F.mse_loss(pred.float(), target.float())


@torch.no_grad()
def ddim_partial_sample(
    unet, scheduler_config, cond, uncond, shape: tuple[int, ...], num_steps: int,
    generator: torch.Generator, guidance: float = 3.0, predict: Predict = unet_eps,
) -> tuple[torch.Tensor, torch.Tensor]:
    """ESD's x_t for UNet families: DDIM from noise with the current model for a random number of steps.

    Returns (x_t, t) where ``t`` is the training timestep that x_t corresponds to (one per batch item). Other
    families sample with their backbone's :meth:`~erasure.backbones.Backbone.partial_sample`.
    """
    from erasure.backbones.sd import ddim_partial_sample as _sample

    return _sample(predict, unet, scheduler_config, cond, uncond, shape, num_steps, generator, guidance)
