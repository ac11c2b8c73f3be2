"""RL: Random Labeling, fine-tuning on the forget set with random labels together with the retain set.

Golatkar et al. 2020 (https://arxiv.org/abs/1911.04933), as run in SalUn (https://arxiv.org/abs/2310.12508);
SalUn is this method restricted to the salient weights.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn as nn
import torch.nn.functional as F

from erasure.classification.methods.base import IterativeConfig, UnlearnContext, field, relabel_batches, run_optim
from erasure.classification.registry import register_method

ORDERS = ("forget_then_retain", "mixed")


@dataclass
class RLConfig(IterativeConfig):
    """Random Labeling.

    Args:
        epochs (`int`, defaults to `10`), lr (`float`, defaults to `0.013`): as SalUn's recipe.
        order (`str`, defaults to `"forget_then_retain"`): per epoch, a pass over the relabelled forget set and
            then one over the retain set (the reference's CIFAR-10 loop), or ``"mixed"`` (shuffled together).
        exclude_true_label (`bool`, defaults to `False`): draw random labels among the other classes only
            (the reference draws among all classes).
    """

    epochs: int = field(10, help="epochs")
    lr: float = field(0.013, help="learning rate")
    order: str = field("forget_then_retain", help="forget_then_retain or mixed", choices=list(ORDERS))
    exclude_true_label: bool = field(False, help="never draw a sample's own label as its random label")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.order not in ORDERS:
            raise ValueError(f"order must be one of {ORDERS}, got {self.order!r}")


def rl(model: nn.Module, ctx: UnlearnContext, cfg: RLConfig) -> nn.Module:
    run_optim(model, cfg, ctx, relabel_batches(ctx, cfg.batch_size, cfg.order, cfg.exclude_true_label),
              lambda m, x, y: F.cross_entropy(m(x), y))
    return model


register_method("rl", RLConfig, rl, paper="https://arxiv.org/abs/1911.04933")
