"""SalUn for diffusion models (Fan et al., ICLR 2024, https://arxiv.org/abs/2310.12508).

Fine-tune only the salient UNet weights with the concept-remapping loss on Df plus ``alpha`` times the
retain loss on Dr (the paper's denoising loss, or distillation from the frozen original UNet).
"""

from __future__ import annotations

from erasure.diffusion.losses import denoise_loss, distill_loss, remap_loss
from erasure.methods import MethodSpec, register_method


def remap_with_retain(ctx, b) -> dict:
    """Shared by SalUn and RL: remap loss on Df + alpha * retain loss on Dr (denoising, or distillation from the
    frozen original UNet when ``config.retain_loss == "distill"``)."""
    forget = remap_loss(ctx.unet, b)
    out = {"forget_loss": forget}
    loss = forget
    if b.retain_x is not None and ctx.config.alpha > 0:
        if ctx.config.retain_loss == "distill":
            retain = distill_loss(ctx.unet, ctx.frozen_unet, b.retain_x, b.retain_t, b.retain_cond, b.uncond)
        else:
            retain = denoise_loss(ctx.unet, b.retain_x, b.retain_t, b.retain_noise, b.retain_cond)
        out["retain_loss"] = retain
        loss = loss + ctx.config.alpha * retain
    out["loss"] = loss
    return out


register_method(
    MethodSpec(
        name="salun",
        loss=remap_with_retain,
        description="Saliency-masked concept remapping + retain denoising loss (SalUn).",
        paper="https://arxiv.org/abs/2310.12508",
        needs_mask=True,
    )
)
