"""Soft-thresholding SalUn (SalUn, https://arxiv.org/abs/2310.12508, appendix; the reference's ``RL_proximal``).

Random Labeling where, after every step, the change ``d = theta - theta_0`` goes through a proximal
soft-threshold: the ``k_t`` smallest ``|d|`` are reset to ``theta_0`` and the others shrink by the
threshold, with ``k_t = mask_ratio * (1 - t / T) * P`` decaying to 0 over the ``T`` steps. It needs no
saliency map: sparsity of the update comes from the l1 proximal operator.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from erasure.classification.methods.base import IterativeConfig, UnlearnContext, field, relabel_batches, run_optim
from erasure.classification.methods.rl import ORDERS
from erasure.classification.registry import register_method


@dataclass
class SalUnSoftConfig(IterativeConfig):
    """Soft-thresholding SalUn.

    Args:
        mask_ratio (`float`, defaults to `0.5`): initial share of weights reset to the original each step.
        order (`str`), exclude_true_label (`bool`): Random Labeling settings, as in ``rl``.
    """

    epochs: int = field(10, help="epochs")
    lr: float = field(0.013, help="learning rate")
    mask_ratio: float = field(0.5, help="initial share of weights reset each step (decays to 0)")
    order: str = field("forget_then_retain", help="forget_then_retain or mixed", choices=list(ORDERS))
    exclude_true_label: bool = field(False, help="never draw a sample's own label as its random label")

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 <= self.mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in [0, 1), got {self.mask_ratio}")
        if self.order not in ORDERS:
            raise ValueError(f"order must be one of {ORDERS}, got {self.order!r}")


def salun_soft(model: nn.Module, ctx: UnlearnContext, cfg: SalUnSoftConfig) -> nn.Module:
    params = [p for p in model.parameters() if p.requires_grad]
    theta0 = [p.detach().clone() for p in params]
    n_params = sum(p.numel() for p in params)

    @torch.no_grad()
    def prox(step: int, total: int) -> None:
        k = int(cfg.mask_ratio * (total - step) / total * n_params)
        if k < 1:
            return
        diffs = [p.detach() - t for p, t in zip(params, theta0)]
        thr = torch.cat([d.reshape(-1) for d in diffs]).abs().kthvalue(k).values
        for p, t, d in zip(params, theta0, diffs):
            shrunk = d - thr * d.sign()
            p.copy_(torch.where(d.abs() > thr, t + shrunk, t))

    run_optim(model, cfg, ctx, relabel_batches(ctx, cfg.batch_size, cfg.order, cfg.exclude_true_label),
              lambda m, x, y: F.cross_entropy(m(x), y), post_step=prox)
    return model


register_method("salun_soft", SalUnSoftConfig, salun_soft, paper="https://arxiv.org/abs/2310.12508")
