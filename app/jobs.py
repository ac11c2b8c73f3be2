"""Long jobs as the service tracks them (no gradio here): stage, step n/N, overall percentage and an ETA from
measured step times, the live loss, and the cancel flag.

A job's stages are weighted by an estimate of their work (:func:`erase_plan`): Df/Dr generation costs one UNet
pass per image and sampling step, the mask one forward and backward pass per forget image, fine-tuning one per
training image and step. The overall percentage is the finished work over the planned work; the ETA is the
remaining work times the seconds per unit of work measured in the stage that is running.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any

from erasure.progress import ProgressEvent

__all__ = ["Job", "erase_plan", "job_work"]

GENERATION = "generating Df/Dr"
MAX_LOSS_POINTS = 3000


def job_work(cfg: Any) -> tuple[int, int]:
    """``(images, work)`` of an erasure: the Df/Dr images it generates and its work units (UNet passes: images x
    sampling steps, plus training images x steps)."""
    images = 0
    for c in cfg.concepts:
        images += len(c.forget_prompts) * cfg.forget_images_per_prompt + len(c.retain_prompts) * cfg.retain_images_per_prompt
    return images, images * cfg.data_steps + cfg.steps * cfg.batch_size


def erase_plan(cfg: Any) -> dict[str, float]:
    """Estimated work per stage of an erasure (stages the engine reports; others count as no work)."""
    images, _ = job_work(cfg)
    forget = sum(len(c.forget_prompts) for c in cfg.concepts) * cfg.forget_images_per_prompt
    return {GENERATION: float(images * cfg.data_steps), "mask": 2.0 * forget,
            "fine-tuning": 2.0 * cfg.steps * cfg.batch_size}


@dataclass
class Job:
    """One long job (an erasure, a resumed erasure or an evaluation) as the banner shows it."""

    run_id: str
    owner: str | None
    concept: str = ""
    method: str = ""
    kind: str = "erase"
    plan: dict[str, float] = field(default_factory=dict)
    stage: str = "waiting"
    done: int = 0
    total: int = 0
    info: dict = field(default_factory=dict)
    started: float = field(default_factory=time.time)
    stage_started: float = field(default_factory=time.monotonic)
    cancel: threading.Event = field(default_factory=threading.Event)
    losses: list[dict[str, Any]] = field(default_factory=list)
    finished_stages: list[str] = field(default_factory=list)
    planned_images: int = 0  # the Df/Dr images the plan counts
    _rate: float | None = None  # seconds per unit of work, measured

    def update(self, event: ProgressEvent) -> None:
        """Take one progress event from the engine."""
        now = time.monotonic()
        if event.stage != self.stage:
            if self.stage not in ("waiting", event.stage) and self.stage not in self.finished_stages:
                self.finished_stages.append(self.stage)
            self.stage, self.stage_started = event.stage, now
        if event.stage == GENERATION and event.total and self.plan.get(GENERATION) and self.planned_images:
            # the engine knows how many images it really generates (cached ones are not generated again)
            self.plan[GENERATION] *= event.total / self.planned_images
            self.planned_images = event.total
        self.done, self.total = event.done, event.total
        if event.info:
            self.info = dict(event.info)
            step = event.info.get("step", event.done)
            for k in ("loss", "forget_loss", "retain_loss"):
                v = event.info.get(k)
                if isinstance(v, (int, float)):
                    self.losses.append({"step": int(step), "series": k, "value": float(v)})
            if len(self.losses) > MAX_LOSS_POINTS:  # a long run: keep every other point
                self.losses = self.losses[::2]
        unit = self._unit()
        if unit and event.done > 0:
            self._rate = (now - self.stage_started) / (event.done * unit)

    def _unit(self) -> float:
        """Work of one unit (``done`` step) of the running stage."""
        w = self.plan.get(self.stage, 0.0)
        return w / self.total if w and self.total else 0.0

    @property
    def percent(self) -> float | None:
        total = sum(self.plan.values())
        if not total:
            return None
        done = sum(self.plan.get(s, 0.0) for s in self.finished_stages)
        if self.stage in self.plan and self.total:
            done += self.plan[self.stage] * min(1.0, self.done / self.total)
        return round(100.0 * min(1.0, done / total), 1)

    @property
    def eta_s(self) -> float | None:
        """Seconds left, from the measured seconds per unit of work (None before the first measured step)."""
        if self._rate is None:
            return None
        left = sum(w for s, w in self.plan.items() if s != self.stage and s not in self.finished_stages)
        if self.stage in self.plan and self.total:
            left += self.plan[self.stage] * max(0.0, 1.0 - self.done / self.total)
        return round(left * self._rate, 1)

    @property
    def cancelling(self) -> bool:
        return self.cancel.is_set()

    def status(self) -> dict[str, Any]:
        return {"kind": self.kind, "run": self.run_id, "concept": self.concept, "method": self.method,
                "stage": self.stage, "step": self.done, "total": self.total, "percent": self.percent,
                "eta_s": self.eta_s, "loss": self.info.get("loss"), "elapsed_s": round(time.time() - self.started, 1),
                "cancelling": self.cancelling}

    def describe(self) -> str:
        s = f"run '{self.run_id}' ({self.concept}, {self.method}): {self.stage}"
        if self.total:
            s += f" {self.done}/{self.total}"
        if "loss" in self.info:
            s += f", loss {self.info['loss']:.4g}"
        return s + f", {time.time() - self.started:.0f} s"
