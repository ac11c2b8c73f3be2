"""ESD: Erasing Concepts from Diffusion Models (Gandikota et al., ICCV 2023, https://arxiv.org/abs/2303.07345).

The UNet is fine-tuned so its prediction for the concept equals the frozen model's prediction with negative
guidance away from it, at x_t drawn from a partial sampling trajectory (guidance ``start_guidance``; DDIM for UNet
families, flow-matching Euler steps for SD3/FLUX) of the current model (the CompVis ``train-esd.py``) or, with
``xt_model="frozen"``, of the frozen original (the diffusers ``esd_sd.py``). ``esd-x`` trains the
cross-attention weights only, ``esd-u`` everything else.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import ClassVar, Literal

from erasure.diffusion.losses import ddim_partial_sample, esd_loss, unet_eps
from erasure.jsonconfig import field
from erasure.methods import MethodConfig, MethodSpec, register_method


@dataclass
class ESDConfig(MethodConfig):
    """ESD's knobs (flags ``--esd-negative-guidance``, ``--esd-sample-steps``)."""

    cli_prefix: ClassVar[str] = "esd"

    negative_guidance: float = field(1.0, help="ESD: negative guidance eta in the target eps_u - eta (eps_c - eps_u).",
                                     label="Negative guidance (eta)", min=0.0, max=100.0)
    sample_steps: int = field(50, help="ESD: DDIM steps of the trajectory x_t is drawn from.", label="Trajectory steps",
                              min=1, max=1000)
    start_guidance: float = field(3.0, help="ESD: CFG scale of the trajectory x_t is drawn from (both official scripts: 3).",
                                  label="Trajectory guidance", min=0.0, max=100.0)
    xt_model: Literal["current", "frozen"] = field(
        "current", help="ESD: model that samples x_t: the model being trained (the CompVis script) or the frozen "
        "original (the diffusers rewrite esd_sd.py).", label="x_t sampled by")

    def needs_frozen_unet(self) -> bool:
        return True


def esd(ctx, b) -> dict:
    args: ESDConfig = ctx.args
    backbone = getattr(ctx, "backbone", None)  # None: a bare SD context (tests, older callers)
    predict = backbone.predict if backbone is not None else unet_eps
    sampler = (backbone.partial_sample if backbone is not None and backbone.denoiser_attr != "unet"
               else functools.partial(ddim_partial_sample, predict=predict))  # flow matching / DDIM
    x, t = sampler(
        ctx.frozen_unet if args.xt_model == "frozen" else ctx.unet, ctx.scheduler_config, b.forget_cond, b.uncond,
        tuple(b.forget_x.shape), args.sample_steps, ctx.generator, guidance=args.start_guidance,
    )
    loss = esd_loss(ctx.unet, ctx.frozen_unet, x, t, b.forget_cond, b.uncond, args.negative_guidance, predict)
    return {"loss": loss, "forget_loss": loss.detach()}


for _name, _trainable, _label in (("esd-x", "xattn", "ESD-x (cross-attention)"), ("esd-u", "noxattn", "ESD-u (all but cross-attention)")):
    register_method(
        MethodSpec(
            name=_name,
            config_cls=ESDConfig,
            loss=esd,
            description=f"ESD negative-guidance fine-tuning, {_trainable} parameters.",
            label=_label,
            paper="https://arxiv.org/abs/2303.07345",
            trainable=_trainable,
        )
    )
