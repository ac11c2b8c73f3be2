"""FT: fine-tune the original model on the retain set (catastrophic forgetting of the forget set).

Warnock et al. 2021 / Golatkar et al. 2020 (https://arxiv.org/abs/1911.04933), as run in SalUn
(https://arxiv.org/abs/2310.12508): 10 epochs, learning rate 0.01.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn as nn
import torch.nn.functional as F

from erasure.classification.methods.base import IterativeConfig, UnlearnContext, data_batches, field, run_optim
from erasure.classification.registry import register_method


@dataclass
class FTConfig(IterativeConfig):
    """Fine-tuning on the retain set (generic knobs only)."""

    epochs: int = field(10, help="epochs over the retain set")
    lr: float = field(0.01, help="learning rate")


def ft(model: nn.Module, ctx: UnlearnContext, cfg: FTConfig) -> nn.Module:
    run_optim(model, cfg, ctx, data_batches(ctx.retain, cfg.batch_size, ctx.generator(1)),
              lambda m, x, y: F.cross_entropy(m(x), y))
    return model


register_method("ft", FTConfig, ft, paper="https://arxiv.org/abs/1911.04933")
