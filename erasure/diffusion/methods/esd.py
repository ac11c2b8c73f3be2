"""ESD: Erasing Concepts from Diffusion Models (Gandikota et al., ICCV 2023, https://arxiv.org/abs/2303.07345).

The UNet is fine-tuned so its prediction for the concept equals the frozen model's prediction with negative
guidance away from it, at x_t drawn from the current model's own DDIM trajectory. ``esd-x`` trains the
cross-attention weights only, ``esd-u`` everything else.
"""

from __future__ import annotations

from erasure.diffusion.losses import ddim_partial_sample, esd_loss
from erasure.methods import MethodSpec, register_method


def esd(ctx, b) -> dict:
    x, t = ddim_partial_sample(
        ctx.unet, ctx.scheduler_config, b.forget_cond, b.uncond, tuple(b.forget_x.shape),
        ctx.config.esd_sample_steps, ctx.generator,
    )
    loss = esd_loss(ctx.unet, ctx.frozen_unet, x, t, b.forget_cond, b.uncond, ctx.config.esd_negative_guidance)
    return {"loss": loss, "forget_loss": loss.detach()}


for _name, _trainable in (("esd-x", "xattn"), ("esd-u", "noxattn")):
    register_method(
        MethodSpec(
            name=_name,
            loss=esd,
            description=f"ESD negative-guidance fine-tuning, {_trainable} parameters.",
            paper="https://arxiv.org/abs/2303.07345",
            needs_frozen_unet=True,
            uses_retain=False,
            trainable=_trainable,
        )
    )

