"""Registry of erasure methods. Adding a method is one module that calls :func:`register_method`.

A method is mostly a loss: ``loss(ctx, batch) -> dict[str, Tensor]`` with a ``"loss"`` entry, plus a few
flags the trainer reads (does it need a saliency mask, a frozen copy of the UNet, retain data, and which
UNet parameters it may train).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

__all__ = ["MethodSpec", "METHODS", "register_method", "get_method"]


@dataclass(frozen=True)
class MethodSpec:
    """How the trainer runs one erasure method."""

    name: str
    loss: Callable[[Any, Any], dict[str, Any]]
    description: str
    paper: str = ""
    needs_mask: bool = False
    needs_frozen_unet: bool = False
    uses_retain: bool = True
    trainable: str | None = None  # forced parameter filter (full/xattn/noxattn); None = the config's choice


METHODS: dict[str, MethodSpec] = {}
_NAME = re.compile(r"^[a-z][a-z0-9_-]*$")


def register_method(spec: MethodSpec) -> MethodSpec:
    """Add a method to :data:`METHODS`; names are lowercase and unique."""
    if not _NAME.match(spec.name):
        raise ValueError(f"method names are lowercase (letters, digits, '-', '_'), got {spec.name!r}")
    if spec.name in METHODS:
        raise ValueError(f"method {spec.name!r} is already registered")
    METHODS[spec.name] = spec
    return spec


def get_method(name: str) -> MethodSpec:
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; choose one of {sorted(METHODS)}") from None


# built-in methods register themselves on import
from erasure.diffusion import methods as _builtin  # noqa: E402,F401
