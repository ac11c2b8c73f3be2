"""One registry class for everything that is registered by name: erasure methods, classification methods,
metrics, judges and attacks. Registration is one call that checks the name; lookup is a dict access.
"""

from __future__ import annotations

import re
from typing import Generic, TypeVar

__all__ = ["Registry", "NAME_RULE"]

T = TypeVar("T")

NAME_RULE = re.compile(r"^[a-z][a-z0-9]*(?:[_-][a-z0-9]+)*$")
"""Names are lowercase letters and digits, words joined by '_' or '-' (``salun``, ``l1_sparse``, ``esd-x``)."""


class Registry(dict, Generic[T]):
    """A ``dict`` of name -> entry that only grows through :meth:`register`.

    Args:
        kind (`str`): what is registered ("method", "metric", ...), used in error messages.
        error (`type[Exception]`, defaults to `ValueError`): raised by :meth:`lookup` for unknown names.
    """

    def __init__(self, kind: str, error: type[Exception] = ValueError) -> None:
        super().__init__()
        self.kind = kind
        self.error = error

    def register(self, name: str, entry: T) -> T:
        """Add ``entry`` under ``name``; rejects names outside :data:`NAME_RULE` and duplicates."""
        if not isinstance(name, str) or not NAME_RULE.match(name):
            raise ValueError(f"{self.kind} names are lowercase letters and digits joined by '_' or '-', got {name!r}")
        if name in self:
            raise ValueError(f"{self.kind} {name!r} is already registered")
        self[name] = entry
        return entry

    def lookup(self, name: str) -> T:
        """The entry registered as ``name``; unknown names raise ``error`` listing the known ones."""
        try:
            return self[name]
        except (KeyError, TypeError):
            raise self.error(f"unknown {self.kind} {name!r}; choose one of {', '.join(sorted(self))}") from None
