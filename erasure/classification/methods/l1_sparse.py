"""l1-sparse: fine-tuning on the retain set with an l1 penalty on the weights (Jia et al. 2023,
"Model Sparsity Can Simplify Machine Unlearning", https://arxiv.org/abs/2304.04934).

The penalty ``gamma_t * ||theta||_1`` decays linearly to 0 over the first ``epochs - no_l1_epochs`` epochs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from erasure.classification.methods.base import IterativeConfig, UnlearnContext, data_batches, field, run_optim
from erasure.classification.registry import register_method


@dataclass
class L1SparseConfig(IterativeConfig):
    """Fine-tuning with a decaying l1 penalty.

    Args:
        gamma (`float`, defaults to `5e-5`): initial l1 coefficient.
        no_l1_epochs (`int`, defaults to `0`): final epochs without the penalty.
    """

    epochs: int = field(10, help="epochs over the retain set")
    lr: float = field(0.01, help="learning rate")
    gamma: float = field(5e-5, help="initial l1 coefficient (decays linearly to 0)")
    no_l1_epochs: int = field(0, help="last epochs without the penalty")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.gamma < 0:
            raise ValueError(f"gamma must be >= 0, got {self.gamma}")
        if not 0 <= self.no_l1_epochs <= self.epochs:
            raise ValueError("no_l1_epochs must be in [0, epochs]")


def l1_sparse(model: nn.Module, ctx: UnlearnContext, cfg: L1SparseConfig) -> nn.Module:
    l1_epochs = cfg.epochs - cfg.no_l1_epochs
    steps_per_epoch = (len(ctx.retain) + cfg.batch_size - 1) // cfg.batch_size
    step = {"n": 0}  # loss_fn runs once per optimisation step

    def loss_fn(m: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        epoch = step["n"] // steps_per_epoch
        step["n"] += 1
        coef = cfg.gamma * (1.0 - epoch / l1_epochs) if epoch < l1_epochs else 0.0
        loss = F.cross_entropy(m(x), y)
        if coef > 0:
            loss = loss + coef * torch.cat([p.reshape(-1) for p in m.parameters()]).abs().sum()
        return loss

    run_optim(model, cfg, ctx, data_batches(ctx.retain, cfg.batch_size, ctx.generator(1)), loss_fn)
    return model


register_method("l1_sparse", L1SparseConfig, l1_sparse, paper="https://arxiv.org/abs/2304.04934")
