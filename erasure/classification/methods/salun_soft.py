"""Soft-thresholding SalUn (SalUn, https://arxiv.org/abs/2310.12508, appendix; the reference's ``RL_proximal``).

Random Labeling where, after every step, the change ``d = theta - theta_0`` goes through a proximal
soft-threshold: the ``k_t`` smallest ``|d|`` are reset to ``theta_0`` and the others shrink by the
threshold, with ``k_t = mask_ratio * (1 - t / T) * P`` decaying to 0 over the ``T`` steps. It needs no
saliency map: sparsity of the update comes from the l1 proximal operator.

Two settings choose between this toolkit's default and the official code (``Classification/unlearn/RL_pro.py``):

* ``anchor``: ``"run"`` (default) keeps ``theta_0`` = the original model for the whole run, so the total change is
  sparse; ``"epoch"`` re-takes ``theta_0`` from the current weights at the start of every epoch (the official code
  reads its ``init_params`` each time its per-epoch function is called), so only each epoch's change is sparse.
* ``k_decay``: ``"step"`` (default) lowers ``k_t`` after every step; ``"epoch"`` holds it for a whole epoch at
  ``mask_ratio * (T - (e * L + 1)) / T * P`` (epoch ``e``, ``L`` steps per epoch), the official CIFAR formula.

``anchor="epoch", k_decay="epoch", order="mixed"`` is the official CIFAR-10/100 behaviour.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

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
    anchor: Literal["run", "epoch"] = field(
        "run", help="theta_0 of the soft threshold: the original model for the whole run, or the weights at the start "
        "of each epoch (the official code)")
    k_decay: Literal["step", "epoch"] = field(
        "step", help="lower the number of reset weights every step, or once per epoch (the official code)")

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 <= self.mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in [0, 1), got {self.mask_ratio}")
        if self.order not in ORDERS:
            raise ValueError(f"order must be one of {ORDERS}, got {self.order!r}")
        if self.anchor not in ("run", "epoch") or self.k_decay not in ("step", "epoch"):
            raise ValueError(f"anchor must be run or epoch and k_decay step or epoch, got {self.anchor!r}, "
                             f"{self.k_decay!r}")


class SoftThreshold:
    """The proximal step after each optimizer step (``post_step``), with its anchor ``theta0`` and schedule."""

    def __init__(self, params: list[nn.Parameter], cfg: SalUnSoftConfig) -> None:
        self.params, self.cfg = params, cfg
        self.n_params = sum(p.numel() for p in params)
        self.theta0 = [p.detach().clone() for p in params]
        self.epoch, self.per_epoch = 0, 1

    def start_epoch(self, epoch: int, n_batches: int) -> None:
        self.epoch, self.per_epoch = epoch, max(1, n_batches)
        if self.cfg.anchor == "epoch":
            self.theta0 = [p.detach().clone() for p in self.params]

    def k(self, step: int, total: int) -> int:
        """Weights reset after step ``step`` (1-based) of ``total``."""
        done = self.epoch * self.per_epoch + 1 if self.cfg.k_decay == "epoch" else step
        return int(self.cfg.mask_ratio * (total - done) / total * self.n_params)

    @torch.no_grad()
    def __call__(self, step: int, total: int) -> None:
        k = self.k(step, total)
        if k < 1:
            return
        diffs = [p.detach() - t for p, t in zip(self.params, self.theta0)]
        thr = torch.cat([d.reshape(-1) for d in diffs]).abs().kthvalue(k).values
        for p, t, d in zip(self.params, self.theta0, diffs):
            shrunk = d - thr * d.sign()
            p.copy_(torch.where(d.abs() > thr, t + shrunk, t))


def salun_soft(model: nn.Module, ctx: UnlearnContext, cfg: SalUnSoftConfig) -> nn.Module:
    prox = SoftThreshold([p for p in model.parameters() if p.requires_grad], cfg)
    inner = relabel_batches(ctx, cfg.batch_size, cfg.order, cfg.exclude_true_label)

    def epoch_batches(epoch: int) -> list:
        batches = inner(epoch)  # the engine asks for an epoch's batches just before running them
        prox.start_epoch(epoch, len(batches))
        return batches

    run_optim(model, cfg, ctx, epoch_batches, lambda m, x, y: F.cross_entropy(m(x), y), post_step=prox)
    return model


register_method("salun_soft", SalUnSoftConfig, salun_soft, paper="https://arxiv.org/abs/2310.12508")
