"""Classification unlearning methods, one module per method id, each registered on import."""

from erasure.classification.registry import METHODS, MethodSpec, get_method, register_method

from . import (  # noqa: F401  (registration side effects, in table order)
    boundary_expand,
    boundary_shrink,
    ft,
    ga,
    iu,
    l1_sparse,
    retrain,
    rl,
    salun,
    salun_soft,
)
from .base import IterativeConfig, MethodConfig, UnlearnContext

__all__ = ["METHODS", "MethodSpec", "get_method", "register_method", "MethodConfig", "IterativeConfig",
           "UnlearnContext"]
