"""Retrain: exact unlearning, training from scratch on the retain set only.

The gold standard every approximate method is compared with (SalUn, https://arxiv.org/abs/2310.12508, Sec. 3).
By default it repeats the original model's recipe; every knob can be overridden.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn as nn
import torch.nn.functional as F

from erasure.classification.config import _check_optim
from erasure.classification.engine import train_loop
from erasure.classification.methods.base import MethodConfig, UnlearnContext, data_batches, field
from erasure.classification.registry import register_method


@dataclass
class RetrainConfig(MethodConfig):
    """Retrain from scratch; ``None`` fields take the original model's recipe.

    Args:
        epochs (`int`, *optional*), lr (`float`, *optional*), batch_size (`int`, *optional*),
        momentum (`float`, *optional*), weight_decay (`float`, *optional*), schedule (`str`, *optional*):
            overrides of the original recipe.
    """

    epochs: int | None = field(None, help="epochs (default: the original recipe's)")
    lr: float | None = field(None, help="learning rate (default: the original recipe's)")
    batch_size: int | None = field(None, help="batch size (default: the original recipe's)")
    momentum: float | None = field(None, help="SGD momentum (default: the original recipe's)")
    weight_decay: float | None = field(None, help="weight decay (default: the original recipe's)")
    schedule: str | None = field(None, help="lr schedule (default: the original recipe's)")

    def __post_init__(self) -> None:
        _check_optim("RetrainConfig", self.epochs, self.lr, self.batch_size, self.momentum, self.weight_decay,
                     self.schedule)
        if self.epochs is not None and self.epochs < 1:
            raise ValueError("RetrainConfig: epochs must be >= 1")


def retrain(model: nn.Module, ctx: UnlearnContext, cfg: RetrainConfig) -> nn.Module:
    """Train a fresh model on ``ctx.retain`` (the forget set is never touched)."""
    del model
    r = ctx.train_recipe
    fresh = ctx.make_model()

    def pick(v, d):
        return d if v is None else v

    train_loop(
        fresh, data_batches(ctx.retain, pick(cfg.batch_size, r.batch_size), ctx.generator(1)),
        lambda m, x, y: F.cross_entropy(m(x), y),
        epochs=pick(cfg.epochs, r.epochs), lr=pick(cfg.lr, r.lr), momentum=pick(cfg.momentum, r.momentum),
        weight_decay=pick(cfg.weight_decay, r.weight_decay), schedule=pick(cfg.schedule, r.schedule),
        augment=ctx.generator(99) if ctx.augment else None, progress=ctx.progress,
    )
    return fresh


register_method("retrain", RetrainConfig, retrain, paper="https://arxiv.org/abs/2310.12508", exact=True)
