"""Helpers shared by the tabs: service errors shown as ``gr.Error``, the per-browser-session owner id, the UI context."""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import gradio as gr

from erasure_app.service import AppError


def ui_errors(fn: Callable | None = None, *, also: tuple[type[BaseException], ...] = (),
              passthrough: tuple[type[BaseException], ...] = ()) -> Callable:
    """Show :class:`AppError` (and ``ValueError`` / ``FileNotFoundError`` from the library, plus ``also``) in the page
    as a one-line ``gr.Error``; ``passthrough`` exceptions propagate unchanged. Use as ``@ui_errors`` or
    ``@ui_errors(also=..., passthrough=...)``."""
    shown = (AppError, ValueError, FileNotFoundError, *also)

    def wrap(f: Callable) -> Callable:
        @functools.wraps(f)
        def wrapper(*args, **kwargs):
            try:
                return f(*args, **kwargs)
            except (gr.Error, *passthrough):
                raise
            except shown as err:
                msg = str(err).splitlines()[0] if str(err) else type(err).__name__
                raise gr.Error(msg, print_exception=False) from err

        return wrapper

    return wrap(fn) if fn is not None else wrap


def session_id(request: gr.Request | None) -> str | None:
    return getattr(request, "session_hash", None) if request is not None else None


@dataclass
class UIContext:
    """What the tabs share: dropdowns listing runs (refreshed together) and events after which runs changed."""

    run_dropdowns: list[tuple[Any, bool, bool]] = field(default_factory=list)  # (dropdown, has "original", follows new)
    runs_changed: list[Any] = field(default_factory=list)
    new_run: list[tuple[Any, Any]] = field(default_factory=list)  # (event, component holding the new run id)
    gen_concurrency: int = 1
    runs_table: Any = None
    list_table: Callable[[], Any] | None = None
    # (inputs, outputs, fn(*input values) -> one update per output): more views refreshed with the run dropdowns
    refreshers: list[tuple[list[Any], list[Any], Callable[..., list[Any]]]] = field(default_factory=list)
    job_buttons: list[Any] = field(default_factory=list)  # buttons that start an erasure: disabled while one trains
    live_loss: Any = None  # the Erase tab's loss chart, drawn live from the running erasure
    banner: Any = None

    def add_run_dropdown(self, dd: Any, with_original: bool = False, follow_new: bool = True) -> Any:
        """Register a dropdown of runs; ``follow_new`` ones switch to a run when an erasure creates it."""
        self.run_dropdowns.append((dd, with_original, follow_new))
        return dd

    def add_refresher(self, fn: Callable[..., list[Any]], inputs: list[Any], outputs: list[Any]) -> None:
        """Refresh ``outputs`` with ``fn(*inputs)`` wherever the runs tables and dropdowns are refreshed."""
        self.refreshers.append((list(inputs), list(outputs), fn))
