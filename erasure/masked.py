"""Exact masked updates: weights outside a saliency mask never move, whatever the optimizer.

Zeroing gradients is not enough: weight decay moves every weight, and momentum carries old updates.
:class:`MaskedUpdate` therefore (1) zeroes gradients outside the mask with ``torch.where`` (so a NaN
there cannot leak), (2) applies weight decay itself, only inside the mask, while the optimizer is built
with ``weight_decay=0``, and (3) optionally restores the frozen values after each step, for optimizers
whose state could still move a weight with zero gradient (e.g. quantised 8-bit Adam). With SGD
(momentum, Nesterov), Adam and AdamW the frozen weights are bit-identical by construction: their
gradient and optimizer state stay exactly zero.

Typical loop::

    opt, decoupled = make_optimizer("adamw", params.values(), lr=1e-5, weight_decay=1e-2)
    upd = MaskedUpdate(params, mask, weight_decay=1e-2, decoupled_weight_decay=decoupled)
    loss.backward(); upd.before_step(lr); opt.step(); upd.after_step(); opt.zero_grad()
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping

import torch

logger = logging.getLogger(__name__)

__all__ = ["MaskedUpdate", "make_optimizer", "OPTIMIZERS", "prepare_masked_params"]

OPTIMIZERS = ("sgd", "adam", "adamw", "adam8bit")


def make_optimizer(
    name: str,
    params: Iterable[torch.nn.Parameter],
    lr: float,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    nesterov: bool = False,
) -> tuple[torch.optim.Optimizer, bool]:
    """Build an optimizer with weight decay removed (``MaskedUpdate`` applies it inside the mask).

    Returns:
        `(optimizer, decoupled)`: ``decoupled`` is True for AdamW-style decay (``p -= lr * wd * p``) and
        False for L2-style decay added to the gradient (SGD, Adam).
    """
    del weight_decay  # applied by MaskedUpdate, never by the optimizer
    params = [p for p in params if p.requires_grad]
    if not params:
        raise ValueError("no trainable parameters: the mask or the trainable-parameter filter selects nothing")
    if lr <= 0:
        raise ValueError(f"learning rate must be > 0, got {lr}")
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, nesterov=nesterov and momentum > 0), False
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, betas=betas, eps=eps), False
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, betas=betas, eps=eps, weight_decay=0.0), True
    if name == "adam8bit":
        try:
            import bitsandbytes as bnb
        except ImportError as err:
            raise ImportError("optimizer 'adam8bit' needs bitsandbytes: pip install bitsandbytes (CUDA only)") from err
        return bnb.optim.AdamW8bit(params, lr=lr, betas=betas, eps=eps, weight_decay=0.0), True
    raise ValueError(f"unknown optimizer {name!r}; choose one of {OPTIMIZERS}")


def prepare_masked_params(
    named_params: Mapping[str, torch.nn.Parameter], mask: Mapping[str, torch.Tensor] | None
) -> dict[str, torch.nn.Parameter]:
    """Freeze parameters with no salient weight (``requires_grad=False``) and return the trainable ones."""
    out = {}
    for name, p in named_params.items():
        if mask is not None:
            m = mask.get(name)
            if m is None or not bool(m.any()):
                p.requires_grad_(False)
                continue
            if tuple(m.shape) != tuple(p.shape):
                raise ValueError(f"mask for {name} has shape {tuple(m.shape)}, parameter has {tuple(p.shape)}")
        p.requires_grad_(True)
        out[name] = p
    return out


class MaskedUpdate:
    """Keep weights outside ``mask`` bit-identical across optimizer steps.

    Args:
        named_params (`Mapping[str, Parameter]`): the parameters handed to the optimizer.
        mask (`Mapping[str, BoolTensor]`, *optional*): True = may change. ``None`` trains everything.
        weight_decay (`float`, defaults to 0): applied here, only inside the mask.
        decoupled_weight_decay (`bool`, defaults to False): AdamW-style (True) or L2 added to the gradient.
        restore_frozen (`bool`, defaults to False): keep a copy of the frozen values and write them back after
            every step. Needed only for optimizers that can move zero-gradient weights (8-bit Adam).
    """

    def __init__(
        self,
        named_params: Mapping[str, torch.nn.Parameter],
        mask: Mapping[str, torch.Tensor] | None,
        weight_decay: float = 0.0,
        decoupled_weight_decay: bool = False,
        restore_frozen: bool = False,
    ) -> None:
        if weight_decay < 0:
            raise ValueError(f"weight decay must be >= 0, got {weight_decay}")
        self.params = dict(named_params)
        self.weight_decay = float(weight_decay)
        self.decoupled = bool(decoupled_weight_decay)
        self.masks: dict[str, torch.Tensor | None] = {}
        self.frozen: dict[str, torch.Tensor] = {}
        for name, p in self.params.items():
            m = None if mask is None else mask.get(name)
            if m is not None:
                if tuple(m.shape) != tuple(p.shape):
                    raise ValueError(f"mask for {name} has shape {tuple(m.shape)}, parameter has {tuple(p.shape)}")
                m = m.to(device=p.device, dtype=torch.bool)
                if bool(m.all()):
                    m = None
            elif mask is not None:
                raise ValueError(f"parameter {name} is trainable but has no mask entry; use prepare_masked_params")
            self.masks[name] = m
            if restore_frozen and m is not None:
                self.frozen[name] = p.detach()[~m].clone()

    @torch.no_grad()
    def mask_gradients(self) -> None:
        """Set gradients outside the mask to exactly zero (NaN/inf there cannot leak)."""
        for name, p in self.params.items():
            m = self.masks[name]
            if m is not None and p.grad is not None:
                p.grad.copy_(torch.where(m, p.grad, torch.zeros((), dtype=p.grad.dtype, device=p.grad.device)))

    @torch.no_grad()
    def apply_weight_decay(self, lr: float) -> None:
        """Weight decay inside the mask only (skips parameters without a gradient, as torch optimizers do)."""
        if self.weight_decay == 0.0:
            return
        for name, p in self.params.items():
            if p.grad is None:
                continue
            m = self.masks[name]
            decay = p.detach() if m is None else torch.where(m, p.detach(), torch.zeros((), dtype=p.dtype, device=p.device))
            if self.decoupled:
                p.sub_(decay, alpha=lr * self.weight_decay)
            else:
                p.grad.add_(decay, alpha=self.weight_decay)

    def before_step(self, lr: float) -> None:
        """Call after ``backward()`` (and gradient clipping), right before ``optimizer.step()``."""
        self.mask_gradients()
        self.apply_weight_decay(lr)

    @torch.no_grad()
    def after_step(self) -> None:
        """Call right after ``optimizer.step()``; restores frozen values when ``restore_frozen`` is on."""
        for name, vals in self.frozen.items():
            p, m = self.params[name], self.masks[name]
            p[~m] = vals

    @torch.no_grad()
    def frozen_values_equal(self, reference: Mapping[str, torch.Tensor]) -> bool:
        """True when every weight outside the mask equals ``reference`` bit for bit."""
        for name, p in self.params.items():
            m = self.masks[name]
            if m is None:
                continue
            ref = reference[name].to(p.device)
            if not torch.equal(p.detach()[~m].view(torch.uint8), ref[~m].contiguous().view(torch.uint8)):
                return False
        return True
