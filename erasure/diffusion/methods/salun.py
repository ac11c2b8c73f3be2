"""SalUn for diffusion models (Fan et al., ICLR 2024, https://arxiv.org/abs/2310.12508).

Fine-tune only the salient UNet weights with the concept-remapping loss on Df plus ``alpha`` times the
retain loss on Dr (the paper's denoising loss, or distillation from the frozen original UNet).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from erasure.diffusion.losses import denoise_loss, distill_loss, remap_loss
from erasure.jsonconfig import field
from erasure.methods import MethodConfig, MethodSpec, register_method


@dataclass
class SalUnConfig(MethodConfig):
    """Knobs of the remap-plus-retain objective (SalUn, and RL without the mask)."""

    alpha: float = field(0.5, help="Weight of the retain loss on Dr (reference: 0.5 objects, 0.1 nudity; 0 = no Dr).",
                         label="Retain weight (alpha)", min=0.0, max=100.0)
    retain_loss: Literal["denoise", "distill"] = field(
        "denoise",
        help="Retain term on Dr: denoise (the paper's MSE to the added noise) or distill (MSE to the frozen "
        "original UNet's conditional and unconditional predictions on Dr; lower-variance, keeps a second UNet "
        "in memory).",
        label="Retain loss",
    )
    retain_on_forget: bool = field(
        False,
        help="With distill: also keep the retain prompts' predictions on the noisy Df images, where the remap acts "
        "(partly holds a concept next to the erased one, such as orange when red is erased; one more UNet pass "
        "per step).",
        label="Retain on forget images",
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.retain_on_forget and self.retain_loss != "distill":
            raise ValueError("retain_on_forget needs retain_loss='distill' (it keeps the frozen model's predictions)")

    def uses_retain(self) -> bool:
        return self.alpha > 0

    def needs_frozen_unet(self) -> bool:
        return self.uses_retain() and self.retain_loss == "distill"


def remap_with_retain(ctx, b) -> dict:
    """Shared by SalUn and RL: remap loss on Df + alpha * retain loss on Dr (denoising, or distillation from the
    frozen original UNet when ``retain_loss == "distill"``)."""
    args: SalUnConfig = ctx.args
    forget = remap_loss(ctx.unet, b, predict=ctx.predict)
    out = {"forget_loss": forget}
    loss = forget
    if b.retain_x is not None and args.alpha > 0:
        if args.retain_loss == "distill":
            retain = distill_loss(ctx.unet, ctx.frozen_unet, b.retain_x, b.retain_t, b.retain_cond, b.uncond,
                                  predict=ctx.predict, weight=b.retain_weight)
        else:
            retain = denoise_loss(ctx.unet, b.retain_x, b.retain_t, b.retain_noise, b.retain_cond, predict=ctx.predict,
                                  weight=b.retain_weight)
        if args.retain_on_forget and args.retain_loss == "distill":
            # the retain prompts' predictions on the forget images themselves (x_t of Df, the same t)
            retain = retain + distill_loss(ctx.unet, ctx.frozen_unet, b.forget_x, b.forget_t, b.retain_cond, None,
                                           predict=ctx.predict, weight=b.retain_weight)
        out["retain_loss"] = retain
        loss = loss + args.alpha * retain
    out["loss"] = loss
    return out


register_method(
    MethodSpec(
        name="salun",
        config_cls=SalUnConfig,
        loss=remap_with_retain,
        description="Saliency-masked concept remapping + retain loss (SalUn).",
        label="SalUn (saliency-masked forgetting)",
        paper="https://arxiv.org/abs/2310.12508",
        needs_mask=True,
    )
)
