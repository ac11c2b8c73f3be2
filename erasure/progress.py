"""One progress-event type for every long job, and its adapters (tqdm for the CLI; the app wraps ``gr.Progress``).

A job reports ``ProgressEvent(stage, done, total, info)`` to a ``progress`` callable it was given; ``info``
carries step metrics (losses) where a stage has them. Library code never prints.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = ["ProgressEvent", "Progress", "emit", "stage_callback", "TqdmProgress"]


@dataclass(frozen=True)
class ProgressEvent:
    """``done`` of ``total`` units of ``stage`` are finished; ``info`` holds that unit's metrics (e.g. losses)."""

    stage: str
    done: int
    total: int
    info: Mapping[str, Any] = field(default_factory=dict)

    @property
    def fraction(self) -> float:
        return min(1.0, self.done / self.total) if self.total > 0 else 0.0


Progress = Callable[[ProgressEvent], None]


def emit(progress: Progress | None, stage: str, done: int, total: int, **info: Any) -> None:
    """Send one event if there is a listener."""
    if progress is not None:
        progress(ProgressEvent(stage, int(done), int(total), info))


def stage_callback(progress: Progress | None, stage: str) -> Callable[[int, int], None] | None:
    """``(done, total) -> None`` for loops that know nothing of stages (e.g. gradient accumulation)."""
    if progress is None:
        return None
    return lambda done, total: emit(progress, stage, done, total)


class TqdmProgress:
    """A tqdm bar per stage, fed by progress events (the CLI's listener)."""

    def __init__(self, **tqdm_kwargs: Any) -> None:
        self.bar = None
        self.stage: str | None = None
        self.kwargs = {"leave": True, "dynamic_ncols": True, **tqdm_kwargs}

    def __call__(self, event: ProgressEvent) -> None:
        from tqdm.auto import tqdm

        if event.stage != self.stage:
            self.close()
            self.stage = event.stage
            self.bar = tqdm(total=event.total, desc=event.stage, **self.kwargs)
        if self.bar.total != event.total:
            self.bar.total = event.total
        self.bar.n = event.done
        if event.info:
            self.bar.set_postfix({k: v for k, v in event.info.items() if k != "step"}, refresh=False)
        self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
