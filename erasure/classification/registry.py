"""Registry of classification unlearning methods: ``register_method`` fills ``METHODS`` (an
:class:`erasure.registry.Registry`), lookup is a dict access."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from erasure.registry import Registry

if TYPE_CHECKING:
    import torch

    from erasure.classification.methods.base import MethodConfig, UnlearnContext

__all__ = ["MethodSpec", "METHODS", "PAPER_ORDER", "ordered", "register_method", "get_method", "UnlearnFn"]



class UnlearnFn(Protocol):
    def __call__(self, model: torch.nn.Module, ctx: UnlearnContext, cfg: MethodConfig) -> torch.nn.Module: ...


@dataclass(frozen=True)
class MethodSpec:
    """One registered method.

    Args:
        name (`str`): lowercase snake-case id (``salun``, ``l1_sparse``).
        config_cls (`type[MethodConfig]`): the method's own config dataclass.
        fn (`UnlearnFn`): ``fn(model, ctx, cfg) -> model``; it may modify ``model`` in place or return a new one.
        paper (`str`): the method's paper link.
        exact (`bool`): True for exact unlearning (Retrain); False for the approximate methods.
    """

    name: str
    config_cls: type
    fn: Callable
    paper: str = ""
    exact: bool = False


METHODS: Registry[MethodSpec] = Registry("classification method")

PAPER_ORDER = ("retrain", "ft", "rl", "ga", "iu", "l1_sparse", "boundary_shrink", "boundary_expand", "salun",
               "salun_soft")
"""Row order of the paper's tables; methods registered later follow in registration order."""


def ordered(names) -> list[str]:
    """``names`` in :data:`PAPER_ORDER`, then the others in registration order."""
    names = list(dict.fromkeys(names))
    rank = {m: i for i, m in enumerate(PAPER_ORDER)}
    reg = {m: i for i, m in enumerate(METHODS)}
    return sorted(names, key=lambda m: (rank.get(m, len(rank)), reg.get(m, len(reg)), m))


def register_method(
    name: str, config_cls: type, fn: Callable, paper: str = "", exact: bool = False
) -> MethodSpec:
    """Register a method; rejects duplicates and names outside :data:`erasure.registry.NAME_RULE`.

    Returns:
        `MethodSpec`: the registered entry.
    """
    return METHODS.register(name, MethodSpec(name=name, config_cls=config_cls, fn=fn, paper=paper, exact=exact))


def get_method(name: str) -> MethodSpec:
    """Look a method up by id; unknown ids raise ``ValueError`` listing the known ones."""
    return METHODS.lookup(name)
