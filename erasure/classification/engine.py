"""Training and evaluation loops shared by the original model, Retrain and every unlearning method.

All loops run on in-memory tensors: batches are index permutations drawn from an explicit
``torch.Generator``, so a run is reproducible from its seed. Optimisation always goes through
:func:`erasure.masked.make_optimizer` and :class:`erasure.masked.MaskedUpdate`; without a mask that is
plain SGD with L2 weight decay, with a mask the weights outside it stay bit-identical.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from erasure.classification.data import TensorData, as_input, augment_batch
from erasure.masked import MaskedUpdate, make_optimizer, prepare_masked_params

logger = logging.getLogger(__name__)

__all__ = ["iterate_batches", "lr_at", "train_loop", "predict", "accuracy", "per_sample_loss", "Progress",
           "seed_generator"]

Progress = Callable[[int, int], None]
LossFn = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]


def seed_generator(seed: int, stream: int = 0) -> torch.Generator:
    """A CPU generator for one purpose (``stream``) of one seed, independent of the global RNG."""
    return torch.Generator().manual_seed(int(seed) * 1_000_003 + int(stream))


def iterate_batches(
    n: int, batch_size: int, generator: torch.Generator | None = None, shuffle: bool = True
) -> Iterator[torch.Tensor]:
    """Yield index batches over ``range(n)`` (shuffled with ``generator`` when ``shuffle``)."""
    order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
    for i in range(0, n, batch_size):
        yield order[i : i + batch_size]


def lr_at(base_lr: float, schedule: str, step: int, total_steps: int, epoch: int, epochs: int) -> float:
    """Learning rate for a step under ``constant``, ``cosine`` (per step, to 0) or ``multistep`` (x0.1 at 50%/75%)."""
    if schedule == "constant":
        return base_lr
    if schedule == "cosine":
        return 0.5 * base_lr * (1.0 + math.cos(math.pi * step / max(1, total_steps)))
    if schedule == "multistep":
        return base_lr * (0.1 ** sum(epoch >= m for m in (int(0.5 * epochs), int(0.75 * epochs))))
    raise ValueError(f"unknown schedule {schedule!r}")


def train_loop(
    model: nn.Module,
    epoch_batches: Callable[[int], list[tuple[torch.Tensor, torch.Tensor]]],
    loss_fn: LossFn,
    *,
    epochs: int,
    lr: float,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    optimizer: str = "sgd",
    schedule: str = "constant",
    mask: dict[str, torch.Tensor] | None = None,
    params: dict[str, nn.Parameter] | None = None,
    post_step: Callable[[int, int], None] | None = None,
    augment: torch.Generator | None = None,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Generic minibatch loop: ``loss_fn(model, x, y)`` -> backward -> masked step.

    Args:
        model (`nn.Module`): trained in place (``train()`` mode).
        epoch_batches (`Callable[[int], list[(x, y)]]`): the batches of one epoch, called once per epoch in order
            (the schedule assumes the same number of batches every epoch).
        loss_fn (`Callable`): ``loss_fn(model, x, y) -> scalar``.
        epochs (`int`), lr (`float`), momentum (`float`), weight_decay (`float`), optimizer (`str`),
        schedule (`str`): optimisation settings.
        mask (`dict[str, BoolTensor]`, *optional*): only these weights may change (bit-exact).
        params (`dict[str, Parameter]`, *optional*): parameters to train (default: all named parameters).
        post_step (`Callable[[int, int], None]`, *optional*): called after each step with (step, total_steps).
        augment (`torch.Generator`, *optional*): when given, random crop + flip each batch with it.
        progress (`Callable[[int, int], None]`, *optional*): called per step with (step, total_steps).

    Returns:
        `dict`: ``steps`` and the mean loss of the last epoch.
    """
    named = dict(params) if params is not None else dict(model.named_parameters())
    all_named = dict(named)
    if mask is not None:
        named = prepare_masked_params(named, mask)
        mask = {k: mask[k] for k in named}
    opt, decoupled = make_optimizer(optimizer, named.values(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    upd = MaskedUpdate(named, mask, weight_decay=weight_decay, decoupled_weight_decay=decoupled)
    first = epoch_batches(0) if epochs else []  # epochs are built lazily (CIFAR: 150 MB each)
    total = len(first) * epochs
    step, last = 0, float("nan")
    model.train()
    for epoch in range(epochs):
        batches = first if epoch == 0 else epoch_batches(epoch)
        losses = []
        for x, y in batches:
            cur = lr_at(lr, schedule, step, total, epoch, epochs)
            for g in opt.param_groups:
                g["lr"] = cur
            x = as_input(x)
            if augment is not None:
                x = augment_batch(x, augment)
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(model, x, y)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"loss is {loss.item()} at step {step}; lower the learning rate")
            loss.backward()
            upd.before_step(cur)
            opt.step()
            upd.after_step()
            losses.append(float(loss.detach()))
            step += 1
            if post_step is not None:
                post_step(step, total)
            if progress is not None:
                progress(step, total)
        last = sum(losses) / max(1, len(losses))
        logger.debug("epoch %d/%d loss %.4f", epoch + 1, epochs, last)
    opt.zero_grad(set_to_none=True)
    for p in all_named.values():  # prepare_masked_params froze parameters without salient weights
        p.requires_grad_(True)
    return {"steps": step, "last_epoch_loss": last}


def shuffled_batches(
    data: TensorData, batch_size: int, generator: torch.Generator
) -> Callable[[int], list[tuple[torch.Tensor, torch.Tensor]]]:
    """``epoch_batches`` for :func:`train_loop`: a fresh shuffle of ``data`` every epoch."""

    def fn(epoch: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        del epoch
        return [(data.x[i], data.y[i]) for i in iterate_batches(len(data), batch_size, generator)]

    return fn


def cross_entropy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(model(x), y)


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
    """Logits of ``model`` (eval mode) for all of ``x``."""
    was_training = model.training
    model.eval()
    out = [model(as_input(x[i : i + batch_size])) for i in range(0, x.shape[0], batch_size)]
    model.train(was_training)
    if not out:
        return torch.zeros(0, 0)
    return torch.cat(out)


def accuracy(model: nn.Module, data: TensorData, batch_size: int = 1024) -> float:
    """Top-1 accuracy in percent (NaN for an empty set)."""
    if len(data) == 0:
        return float("nan")
    logits = predict(model, data.x, batch_size)
    return 100.0 * float((logits.argmax(1) == data.y).float().mean())


def per_sample_loss(model: nn.Module, data: TensorData, batch_size: int = 1024) -> torch.Tensor:
    """Cross-entropy of each sample (eval mode)."""
    logits = predict(model, data.x, batch_size)
    return F.cross_entropy(logits, data.y, reduction="none")
