"""Class-wise forgetting methods for class-conditional DDPMs, one registry (:data:`CLASS_METHODS`).

A method is a :class:`ClassMethodSpec`: its config dataclass and either ``loss(ctx, batch) -> dict`` (the engine
in :mod:`erasure.ddpm.erase` owns the masked loop) or ``run(ctx) -> state_dict`` (the method trains itself).

* ``salun``  SalUn (Fan et al., ICLR 2024): inside the saliency mask of the guided forget-class loss, the
  prediction for the forget class is pulled to the prediction for an anchor class on the same noisy forget
  image (``||eps(x_t, c_f) - sg[eps(x_t, c_a)]||^2``, the official DDPM code's ``rl`` objective), plus
  ``alpha`` times the denoising loss on the retain classes.
* ``rl``     the same objective on every weight (no mask): the paper's RL baseline.
* ``esd-class``  ESD-style negative guidance on the class condition: ``eps(x_t, c_f)`` is trained towards the
  frozen model's ``eps_u - eta (eps_c - eps_u)`` (x_t: noised forget-class images), plus optional retain loss.
* ``ft``     fine-tuning on the retain classes only (the denoising loss; forgetting comes from drift alone).
* ``retrain``  training from scratch without the forget class (the exact-unlearning reference; small models).
* ``relabel``  a sanity baseline, not an unlearning method: the forget class's embedding row is overwritten with
  the anchor class's, nothing else changes. It scores perfectly on UA and leaves the other classes bit-identical
  (FD ratio 1.00), yet the model still draws the class from the null class: what those metrics cannot see
  (``bench/ddpm_forget.py`` reports the unconditional share for this reason).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F

from erasure.jsonconfig import field
from erasure.methods import MethodConfig
from erasure.registry import Registry

__all__ = ["ClassMethodConfig", "ClassMethodSpec", "CLASS_METHODS", "register_class_method", "get_class_method",
           "SalUnClassConfig", "ESDClassConfig", "FTClassConfig", "RetrainClassConfig", "RelabelClassConfig"]


@dataclass
class ClassMethodConfig(MethodConfig):
    """Base of a class-forgetting method's own knobs (the text-to-image methods' base, for the class engine)."""


@dataclass(frozen=True)
class ClassMethodSpec:
    name: str
    config_cls: type[ClassMethodConfig]
    description: str
    loss: Callable[[Any, Any], dict[str, torch.Tensor]] | None = None
    run: Callable[[Any], dict[str, torch.Tensor]] | None = None
    needs_mask: bool = False
    paper: str = ""

    def __post_init__(self) -> None:
        if (self.loss is None) == (self.run is None):
            raise ValueError(f"class method {self.name!r}: give exactly one of loss= or run=")


CLASS_METHODS: Registry[ClassMethodSpec] = Registry("class-forgetting method")


def register_class_method(spec: ClassMethodSpec) -> ClassMethodSpec:
    return CLASS_METHODS.register(spec.name, spec)


def get_class_method(name: str) -> ClassMethodSpec:
    return CLASS_METHODS.lookup(name)


# ------------------------------------------------------------------------------------------------ losses


def _eps(unet, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, bf16: bool) -> torch.Tensor:
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16):
        return unet(x, t, class_labels=y).sample.float()


def retain_loss(ctx, b) -> torch.Tensor:
    """The retain term on noised retain-class images (labels with class dropout to the null class): the DDPM
    denoising loss (MSE to the added noise), or with ``retain_loss="distill"`` the MSE to the frozen original
    model's prediction for the same input and label, which keeps the model's own function on the other classes
    rather than refitting it to the retain images."""
    out = _eps(ctx.unet, b.retain_xt, b.retain_t, b.retain_y, ctx.bf16)
    if getattr(ctx.args, "retain_loss", "denoise") == "distill":
        with torch.no_grad():
            target = _eps(ctx.frozen_unet, b.retain_xt, b.retain_t, b.retain_y, ctx.bf16)
        return F.mse_loss(out, target)
    return F.mse_loss(out, b.retain_noise)


RetainLoss = Literal["denoise", "distill"]
_RETAIN_HELP = ("retain term: denoise (MSE to the added noise, the paper's) or distill (MSE to the frozen original "
                "model's prediction on the same noisy retain image; keeps a second UNet in memory)")


def guided_forget_loss(ctx, b) -> torch.Tensor:
    """Saliency loss: the denoising loss of the classifier-free-guided prediction for the forget class."""
    x, t, y = b.forget_xt, b.forget_t, b.forget_y
    e = _eps(ctx.unet, torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, torch.full_like(y, ctx.null)]), False)
    ec, eu = e.chunk(2)
    return F.mse_loss(eu + ctx.guidance_scale * (ec - eu), b.forget_noise)


@dataclass
class SalUnClassConfig(ClassMethodConfig):
    """SalUn / RL: remap the forget class to the anchor class, plus the retain loss."""

    alpha: float = field(3.0, help="weight of the retain loss on the other classes (0 = none; 3 with distill: "
                         "bench/README.md)", label="Retain weight (alpha)", min=0.0, max=100.0)
    retain_loss: RetainLoss = field("distill", help=_RETAIN_HELP, label="Retain loss")
    anchor_target: Literal["current", "frozen"] = field(
        "current", help="whose prediction for the anchor class the forget class is pulled to: the model being "
        "trained (detached, as the official DDPM code) or the frozen original", label="Anchor target")

    def uses_retain(self) -> bool:
        return self.alpha > 0

    def needs_frozen_unet(self) -> bool:
        return (self.uses_retain() and self.retain_loss == "distill") or self.anchor_target == "frozen"


def _with_retain(ctx, b, forget: torch.Tensor) -> dict[str, torch.Tensor]:
    """The forget loss plus ``alpha`` x the retain classes' denoising loss (when ``alpha`` > 0)."""
    res = {"forget_loss": forget, "loss": forget}
    if ctx.args.alpha > 0:
        r = retain_loss(ctx, b)
        res["retain_loss"] = r
        res["loss"] = forget + ctx.args.alpha * r
    return res


def remap_loss(ctx, b) -> dict[str, torch.Tensor]:
    out = _eps(ctx.unet, b.forget_xt, b.forget_t, b.forget_y, ctx.bf16)
    teacher = ctx.frozen_unet if ctx.args.anchor_target == "frozen" else ctx.unet
    with torch.no_grad():
        target = _eps(teacher, b.forget_xt, b.forget_t, b.anchor_y, ctx.bf16)
    return _with_retain(ctx, b, F.mse_loss(out, target))


@dataclass
class ESDClassConfig(ClassMethodConfig):
    """ESD on the class condition."""

    negative_guidance: float = field(1.0, help="eta in the target eps_u - eta (eps_c - eps_u)", label="Negative guidance (eta)",
                                     min=0.0, max=100.0)
    alpha: float = field(0.0, help="weight of a retain loss (ESD itself has none)", label="Retain weight (alpha)",
                         min=0.0, max=100.0)
    retain_loss: RetainLoss = field("denoise", help=_RETAIN_HELP, label="Retain loss")

    def uses_retain(self) -> bool:
        return self.alpha > 0

    def needs_frozen_unet(self) -> bool:
        return True


def esd_class_loss(ctx, b) -> dict[str, torch.Tensor]:
    x, t, y = b.forget_xt, b.forget_t, b.forget_y
    with torch.no_grad():
        e = _eps(ctx.frozen_unet, torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, torch.full_like(y, ctx.null)]), ctx.bf16)
        ec, eu = e.chunk(2)
        target = eu - ctx.args.negative_guidance * (ec - eu)
    return _with_retain(ctx, b, F.mse_loss(_eps(ctx.unet, x, t, y, ctx.bf16), target))


@dataclass
class FTClassConfig(ClassMethodConfig):
    """Fine-tuning on the retain classes (no knobs beyond the generic ones)."""

    def uses_retain(self) -> bool:
        return True


def ft_loss(ctx, b) -> dict[str, torch.Tensor]:
    r = retain_loss(ctx, b)
    return {"loss": r, "retain_loss": r}


@dataclass
class RetrainClassConfig(ClassMethodConfig):
    """Retrain from scratch without the forget class, with the model's own training recipe."""

    train_steps: int = field(0, help="training steps (0 = the original model's, from its training_info.json)", min=0)


def retrain_run(ctx) -> dict[str, torch.Tensor]:
    """Train a fresh model on every class but the forget class; returns its full state dict."""
    from erasure.ddpm.train_model import DDPMTrainConfig, train
    from erasure.io import read_json

    info_path = ctx.model_dir / "training_info.json"
    if not info_path.is_file():
        raise ValueError(f"{ctx.model_dir} has no training_info.json, so its recipe is unknown; retrain needs it")
    recipe = dict(read_json(info_path)["config"])
    recipe.update(out_dir=str(ctx.work_dir / "model"), work_dir=str(ctx.work_dir / "train"), seed=ctx.cfg.seed,
                  exclude_classes=[ctx.model.class_names[ctx.forget_idx]], device=ctx.cfg.device)
    if ctx.cfg.data_root:
        recipe["data_root"] = ctx.cfg.data_root
    if ctx.args.train_steps:
        recipe["steps"] = ctx.args.train_steps
        recipe["warmup_steps"] = min(recipe.get("warmup_steps", 0), max(0, ctx.args.train_steps - 1))
    cfg = DDPMTrainConfig.from_dict(recipe)

    def prog(done, total, rec):
        ctx.report("retrain", done, total, **rec)

    model = train(cfg, progress=prog)
    return {k: v.detach().clone() for k, v in model.unet.state_dict().items()}


@dataclass
class RelabelClassConfig(ClassMethodConfig):
    """No knobs: the forget class's embedding row becomes the anchor class's (a random other class with
    ``--anchor-class random``, drawn from the run's seed)."""


def relabel_run(ctx) -> dict[str, torch.Tensor]:
    emb = getattr(ctx.unet, "class_embedding", None)
    if not isinstance(emb, torch.nn.Embedding):
        raise ValueError("relabel needs a UNet with a class embedding table (num_class_embeds)")
    anchor = ctx.anchor_idx
    if anchor is None:
        others = [i for i in range(ctx.null) if i != ctx.forget_idx]
        anchor = others[int(torch.randint(len(others), (1,), generator=torch.Generator().manual_seed(ctx.cfg.seed)))]
    new = emb.weight.detach().clone()
    new[ctx.forget_idx] = new[anchor]
    ctx.report("relabel", 1, 1, anchor=anchor)
    return {"class_embedding.weight": new}


register_class_method(ClassMethodSpec(
    "salun", SalUnClassConfig, "Saliency-masked remapping of the forget class to an anchor class + retain loss (SalUn).",
    loss=remap_loss, needs_mask=True, paper="https://arxiv.org/abs/2310.12508"))
register_class_method(ClassMethodSpec(
    "rl", SalUnClassConfig, "Remapping of the forget class to an anchor class + retain loss, every weight (RL).",
    loss=remap_loss, paper="https://arxiv.org/abs/2310.12508"))
register_class_method(ClassMethodSpec(
    "esd-class", ESDClassConfig, "ESD negative guidance away from the forget class, every weight.",
    loss=esd_class_loss, paper="https://arxiv.org/abs/2303.07345"))
register_class_method(ClassMethodSpec(
    "ft", FTClassConfig, "Fine-tuning on the retain classes only (FT).", loss=ft_loss))
register_class_method(ClassMethodSpec(
    "retrain", RetrainClassConfig, "Training from scratch without the forget class (exact-unlearning reference).",
    run=retrain_run))
register_class_method(ClassMethodSpec(
    "relabel", RelabelClassConfig, "Sanity baseline: the forget class's embedding row := the anchor's (removes "
    "nothing; the null class still draws it).", run=relabel_run))
