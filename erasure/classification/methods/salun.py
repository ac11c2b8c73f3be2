"""SalUn: weight saliency + Random Labeling (Fan et al., ICLR 2024, https://arxiv.org/abs/2310.12508).

1. Saliency mask: the forget loss's gradient at the original model, accumulated over the forget set
   (``|sum_b grad_b|``), keeps the top ``mask_ratio`` of all weights by one global threshold
   (:func:`erasure.saliency.compute_mask`, shared with the diffusion engine).
2. Random Labeling restricted to the salient weights, through :class:`erasure.masked.MaskedUpdate`:
   every weight outside the mask stays bit-identical, even with momentum and weight decay.
Paper recipe on CIFAR-10: 10 epochs, learning rate 0.013, mask ratio 0.5.

Bit-identical means every *parameter* outside the mask. BatchNorm running statistics are buffers, not
weights: as in the reference, the model trains in ``train()`` mode and they follow the RL batches.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from erasure.classification.data import as_input
from erasure.classification.methods.base import IterativeConfig, UnlearnContext, field, relabel_batches, run_optim
from erasure.classification.methods.rl import ORDERS
from erasure.classification.registry import register_method
from erasure.saliency import compute_mask, load_mask, mask_stats, save_mask

logger = logging.getLogger(__name__)


@dataclass
class SalUnConfig(IterativeConfig):
    """SalUn.

    Args:
        mask_ratio (`float`, defaults to `0.5`): share of all weights that may change.
        mask_mode (`str`, defaults to `"abs_of_sum"`): saliency score (``abs_of_sum`` as the reference).
        mask_path (`str`, *optional*): load a precomputed mask instead of computing it.
        order (`str`), exclude_true_label (`bool`): Random Labeling settings, as in ``rl``.
    """

    epochs: int = field(10, help="epochs")
    lr: float = field(0.013, help="learning rate")
    mask_ratio: float = field(0.5, help="share of all weights that may change")
    mask_mode: str = field("abs_of_sum", help="saliency score", choices=["abs_of_sum", "sum_of_abs"])
    mask_path: str | None = field(None, help="precomputed mask (.safetensors) to use instead")
    order: str = field("forget_then_retain", help="forget_then_retain or mixed", choices=list(ORDERS))
    exclude_true_label: bool = field(False, help="never draw a sample's own label as its random label")

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 < self.mask_ratio <= 1.0:
            raise ValueError(f"mask_ratio must be in (0, 1], got {self.mask_ratio}")
        if self.order not in ORDERS:
            raise ValueError(f"order must be one of {ORDERS}, got {self.order!r}")
        if self.mask_mode not in ("abs_of_sum", "sum_of_abs"):
            raise ValueError(f"unknown mask_mode {self.mask_mode!r}")


def saliency_mask(model: nn.Module, ctx: UnlearnContext, ratio: float, batch_size: int,
                  mode: str = "abs_of_sum") -> dict[str, torch.Tensor]:
    """SalUn's mask from the forget loss (eval mode, so BatchNorm statistics are untouched)."""
    was = model.training
    model.eval()
    f = ctx.forget
    batches = [(as_input(f.x[i : i + batch_size]), f.y[i : i + batch_size]) for i in range(0, len(f), batch_size)]
    params = dict(model.named_parameters())
    mask = compute_mask(params, batches, lambda b: -F.cross_entropy(model(b[0]), b[1]), ratio, mode=mode)
    model.train(was)
    return mask


def salun(model: nn.Module, ctx: UnlearnContext, cfg: SalUnConfig) -> nn.Module:
    if cfg.mask_path:
        mask = load_mask(cfg.mask_path)
        names = set(dict(model.named_parameters()))
        if set(mask) != names:
            raise ValueError(f"mask {cfg.mask_path} does not match the model's parameters")
    else:
        mask = saliency_mask(model, ctx, cfg.mask_ratio, cfg.batch_size, cfg.mask_mode)
    stats = mask_stats(mask)
    logger.info("SalUn mask keeps %d of %d weights (%.3f)", stats["kept"], stats["total"], stats["ratio"])
    if ctx.artifacts_dir is not None:
        save_mask(mask, ctx.artifacts_dir / "mask.safetensors", metadata={"ratio": cfg.mask_ratio})
    run_optim(model, cfg, ctx, relabel_batches(ctx, cfg.batch_size, cfg.order, cfg.exclude_true_label),
              lambda m, x, y: F.cross_entropy(m(x), y), mask=mask)
    return model


register_method("salun", SalUnConfig, salun, paper="https://arxiv.org/abs/2310.12508")
