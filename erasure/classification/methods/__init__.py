"""Classification unlearning methods, one module per method id, each registered on import."""

from erasure.classification.registry import METHODS, MethodSpec, get_method, register_method

from . import (  # noqa: F401  (registration side effects, in table order)
    retrain,
    ft,
    rl,
    ga,
    iu,
    l1_sparse,
    boundary_shrink,
    boundary_expand,
    salun,
    salun_soft,
)
from .base import IterativeConfig, MethodConfig, UnlearnContext

__all__ = ["METHODS", "MethodSpec", "get_method", "register_method", "MethodConfig", "IterativeConfig",
           "UnlearnContext"]
