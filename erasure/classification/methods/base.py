"""What every classification unlearning method gets: a context, a config base, and shared helpers."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from erasure.classification.config import OptimConfig, TrainRecipe
from erasure.classification.data import TensorData
from erasure.classification.engine import Progress, seed_generator, train_loop
from erasure.jsonconfig import JsonConfig, field

logger = logging.getLogger(__name__)

__all__ = ["MethodConfig", "IterativeConfig", "UnlearnContext", "run_optim", "relabel_batches", "field"]


@dataclass
class MethodConfig(JsonConfig):
    """Base of every method config (a marker: a method's knobs are its subclass's fields)."""


@dataclass
class IterativeConfig(OptimConfig, MethodConfig):
    """Base of the iterative methods' configs: the generic knobs of :class:`OptimConfig`."""


@dataclass
class UnlearnContext:
    """Everything a method may use besides the model to unlearn.

    Args:
        forget (`TensorData`), retain (`TensorData`): the two parts of the training set.
        num_classes (`int`): number of classes of the model's head.
        seed (`int`): run seed; methods draw their randomness from :meth:`generator`.
        make_model (`Callable[[], nn.Module]`): a freshly initialised model of the same architecture (Retrain).
        train_recipe (`TrainRecipe`): the original model's recipe (Retrain's default).
        augment (`bool`): use the data set's augmentation in training loops.
        progress (`Callable[[int, int], None]`, *optional*): per-step progress callback.
        artifacts_dir (`Path`, *optional*): where a method may write artifacts (e.g. SalUn's mask).
    """

    forget: TensorData
    retain: TensorData
    num_classes: int
    seed: int
    make_model: Callable[[], nn.Module]
    train_recipe: TrainRecipe
    augment: bool = False
    progress: Progress | None = None
    artifacts_dir: Path | None = None

    def generator(self, stream: int) -> torch.Generator:
        """An independent generator for one purpose (shuffling, random labels, ...) of this run."""
        return seed_generator(self.seed, 100 + stream)


def run_optim(
    model: nn.Module,
    cfg: OptimConfig,
    ctx: UnlearnContext,
    epoch_batches: Callable[[int], list[tuple[torch.Tensor, torch.Tensor]]],
    loss_fn: Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor],
    mask: dict[str, torch.Tensor] | None = None,
    post_step: Callable[[int, int], None] | None = None,
    augment: bool | None = None,
    params: dict[str, nn.Parameter] | None = None,
) -> dict[str, Any]:
    """:func:`~erasure.classification.engine.train_loop` with the generic knobs of ``cfg``."""
    use_aug = ctx.augment if augment is None else augment
    return train_loop(model, epoch_batches, loss_fn, epochs=cfg.epochs, lr=cfg.lr, momentum=cfg.momentum,
                      weight_decay=cfg.weight_decay, optimizer=cfg.optimizer, schedule=cfg.schedule, mask=mask,
                      params=params, post_step=post_step, augment=ctx.generator(99) if use_aug else None,
                      progress=ctx.progress)


def random_other_labels(y: torch.Tensor, num_classes: int, generator: torch.Generator, exclude_true: bool) -> torch.Tensor:
    """Uniform random labels; with ``exclude_true`` never the sample's own label."""
    if not exclude_true:
        return torch.randint(0, num_classes, y.shape, generator=generator)
    shift = torch.randint(1, num_classes, y.shape, generator=generator)
    return (y + shift) % num_classes


def relabel_batches(
    ctx: UnlearnContext, batch_size: int, order: str, exclude_true_label: bool
) -> Callable[[int], list[tuple[torch.Tensor, torch.Tensor]]]:
    """Epoch batches of Random Labeling: forget samples with fresh random labels, plus the retain set.

    ``order="forget_then_retain"`` is the reference's CIFAR-10/SVHN loop (a pass over the relabelled
    forget set, then a pass over the retain set); ``"mixed"`` shuffles both together (its CIFAR-100 loop).
    """
    if order not in ("forget_then_retain", "mixed"):
        raise ValueError(f"order must be 'forget_then_retain' or 'mixed', got {order!r}")
    g_shuffle, g_label = ctx.generator(1), ctx.generator(2)
    f, r = ctx.forget, ctx.retain

    def fn(epoch: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        del epoch
        fy = random_other_labels(f.y, ctx.num_classes, g_label, exclude_true_label)
        if order == "mixed":
            x = torch.cat([f.x, r.x])
            y = torch.cat([fy, r.y])
            perm = torch.randperm(len(y), generator=g_shuffle)
            return [(x[perm[i : i + batch_size]], y[perm[i : i + batch_size]]) for i in range(0, len(y), batch_size)]
        pf = torch.randperm(len(f), generator=g_shuffle)
        pr = torch.randperm(len(r), generator=g_shuffle)
        out = [(f.x[pf[i : i + batch_size]], fy[pf[i : i + batch_size]]) for i in range(0, len(f), batch_size)]
        out += [(r.x[pr[i : i + batch_size]], r.y[pr[i : i + batch_size]]) for i in range(0, len(r), batch_size)]
        return out

    return fn


def data_batches(data: TensorData, batch_size: int, generator: torch.Generator
                 ) -> Callable[[int], list[tuple[torch.Tensor, torch.Tensor]]]:
    """Epoch batches of one data set, reshuffled every epoch."""

    def fn(epoch: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        del epoch
        p = torch.randperm(len(data), generator=generator)
        return [(data.x[p[i : i + batch_size]], data.y[p[i : i + batch_size]]) for i in range(0, len(data), batch_size)]

    return fn
