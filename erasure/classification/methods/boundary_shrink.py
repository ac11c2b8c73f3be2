"""BS: Boundary Shrink (Chen et al., CVPR 2023, "Boundary Unlearning", https://arxiv.org/abs/2303.11570).

Each forget sample is relabelled with its nearest wrong class, found by an FGSM step (size ``bound`` in
[0, 1] pixel space) against a frozen copy of the original model; the model is then fine-tuned on the
forget set with those labels. SalUn's runs: 10 epochs, learning rate 1e-5, bound 0.1.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from erasure.classification.methods.base import IterativeConfig, UnlearnContext, data_batches, field, run_optim
from erasure.classification.registry import register_method


@dataclass
class BoundaryShrinkConfig(IterativeConfig):
    """Boundary Shrink.

    Args:
        bound (`float`, defaults to `0.1`): FGSM step in pixel units ([0, 1] images).
        discretize (`bool`, defaults to `True`): round adversarial images to the 8-bit grid (as the reference).
    """

    epochs: int = field(10, help="epochs over the forget set")
    lr: float = field(1e-5, help="learning rate")
    bound: float = field(0.1, help="FGSM step size in [0, 1] pixel units")
    discretize: bool = field(True, help="round adversarial images to multiples of 1/255")

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.bound > 0:
            raise ValueError(f"bound must be > 0, got {self.bound}")


def fgsm(model: nn.Module, x: torch.Tensor, y: torch.Tensor, bound: float, discretize: bool) -> torch.Tensor:
    """One untargeted FGSM step of size ``bound``, clamped to [0, 1]."""
    x_adv = x.detach().clone().requires_grad_(True)
    loss = F.cross_entropy(model(x_adv), y)
    (grad,) = torch.autograd.grad(loss, x_adv)
    out = (x_adv.detach() + bound * grad.sign()).clamp_(0.0, 1.0)
    return torch.round(out * 255) / 255 if discretize else out


def boundary_shrink(model: nn.Module, ctx: UnlearnContext, cfg: BoundaryShrinkConfig) -> nn.Module:
    probe = copy.deepcopy(model).eval()
    for p in probe.parameters():
        p.requires_grad_(False)

    def loss_fn(m: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        x_adv = fgsm(probe, x, y, cfg.bound, cfg.discretize)
        with torch.no_grad():
            nearest = probe(x_adv).argmax(1)
        return F.cross_entropy(m(x), nearest)

    run_optim(model, cfg, ctx, data_batches(ctx.forget, cfg.batch_size, ctx.generator(1)), loss_fn, augment=False)
    return model


register_method("boundary_shrink", BoundaryShrinkConfig, boundary_shrink, paper="https://arxiv.org/abs/2303.11570")
