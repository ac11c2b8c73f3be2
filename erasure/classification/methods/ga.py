"""GA: gradient ascent on the forget set (Thudi et al. 2022, https://arxiv.org/abs/2109.13398).

As run in SalUn (https://arxiv.org/abs/2310.12508): 5 epochs, learning rate 1e-4.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn as nn
import torch.nn.functional as F

from erasure.classification.methods.base import IterativeConfig, UnlearnContext, data_batches, field, run_optim
from erasure.classification.registry import register_method


@dataclass
class GAConfig(IterativeConfig):
    """Gradient ascent: minimise ``-CE`` on the forget set."""

    epochs: int = field(5, help="epochs over the forget set")
    lr: float = field(1e-4, help="learning rate")


def ga(model: nn.Module, ctx: UnlearnContext, cfg: GAConfig) -> nn.Module:
    run_optim(model, cfg, ctx, data_batches(ctx.forget, cfg.batch_size, ctx.generator(1)),
              lambda m, x, y: -F.cross_entropy(m(x), y))
    return model


register_method("ga", GAConfig, ga, paper="https://arxiv.org/abs/2109.13398")
