"""ESD: Erasing Concepts from Diffusion Models (Gandikota et al., ICCV 2023, https://arxiv.org/abs/2303.07345).

The UNet is fine-tuned so its prediction for the concept equals the frozen model's prediction with negative
guidance away from it, at x_t drawn from the current model's own sampling trajectory (DDIM for UNet families,
flow-matching Euler steps for SD3/FLUX). ``esd-x`` trains the
cross-attention weights only, ``esd-u`` everything else.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from erasure.diffusion.losses import esd_loss
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

    def needs_frozen_unet(self) -> bool:
        return True


def esd(ctx, b) -> dict:
    args: ESDConfig = ctx.args
    x, t = ctx.backbone.partial_sample(
        ctx.unet, ctx.scheduler_config, b.forget_cond, b.uncond, tuple(b.forget_x.shape), args.sample_steps,
        ctx.generator,
    )
    loss = esd_loss(ctx.unet, ctx.frozen_unet, x, t, b.forget_cond, b.uncond, args.negative_guidance,
                    predict=ctx.predict)
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
