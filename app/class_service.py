"""The class-forgetting app's service (no gradio here): a class-conditional DDPM folder, a runs folder, a device.

``ClassAppService`` lists the model's classes and the class-forgetting methods (:data:`erasure.ddpm.methods.CLASS_METHODS`),
checks form input (one-line ``ValueError`` messages that name the fix), runs :func:`erasure.ddpm.erase.erase_class`
into ``runs_dir/<run id>`` (one erasure at a time, cancellable), lists the runs and compares the original model with
a run on the same seeds, each image labelled by the shapes judge. Nothing is loaded until an image is asked for.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from erasure.ddpm.erase import ClassEraseCancelled, ClassEraseConfig
from erasure.progress import Progress

__all__ = ["ClassAppService", "ClassEraseStopped", "CLASS_FORM_FIELDS", "RANDOM_ANCHOR", "DISPLAY_SIZE",
           "parse_seeds", "MAX_SEEDS"]

CLASS_FORM_FIELDS = ("forget_class", "anchor_class", "method", "steps", "lr", "mask_ratio", "seed")
"""The :class:`~erasure.ddpm.erase.ClassEraseConfig` fields the Erase form shows (labels, limits, help from the fields)."""

RANDOM_ANCHOR = "random"
_DEFAULTS = {f.name: f.default for f in dataclasses.fields(ClassEraseConfig)}  # the form starts from the config
DISPLAY_SIZE = 64
"""Images are upscaled (bicubic) to the judge's input size for display and judging, as the judge itself does."""
MAX_SEEDS = 16
_RUN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,79}$")


class ClassEraseStopped(RuntimeError):
    """The erasure was cancelled; nothing was saved."""


def parse_seeds(text: str | list | None, max_seeds: int = MAX_SEEDS) -> list[int]:
    """``"0, 1, 2"`` (commas or spaces; ``a-b`` ranges) -> ``[0, 1, 2]``; a bad entry raises a one-line ValueError."""
    if isinstance(text, list):
        text = ",".join(map(str, text))
    seeds: list[int] = []
    for tok in re.split(r"[,\s]+", (text or "").strip()):
        if not tok:
            continue
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", tok)
        if m is None:
            raise ValueError(f"seed {tok!r} is not a whole number >= 0; give seeds like 0, 1, 2, 3 or 0-7")
        a, b = int(m.group(1)), int(m.group(2) if m.group(2) is not None else m.group(1))
        if b < a:
            raise ValueError(f"seed range {tok!r} runs backwards; write it low-high, like 0-7")
        seeds.extend(range(a, b + 1))
        if len(seeds) > max_seeds:
            raise ValueError(f"at most {max_seeds} seeds per comparison; give fewer seeds")
    if not seeds:
        raise ValueError("no seeds given; give seeds like 0, 1, 2, 3")
    return seeds


@dataclass
class _Job:
    run_id: str
    cancel: threading.Event
    started: float


class ClassAppService:
    """Erase a class from a class-conditional DDPM and compare the original with the runs.

    Args:
        model_dir: a class-conditional DDPM folder (``is_class_ddpm_folder``).
        runs_dir: where runs are written (``runs_dir/<run id>``, created on the first erasure).
        device: torch device of the erasures and the sampling.
        judge_path: shapes judge weights (default: the shipped judge).
        cache_size: loaded run models kept in memory (besides the original).
    """

    def __init__(self, model_dir: str | Path, runs_dir: str | Path, device: str = "cpu", judge_path: str | None = None,
                 cache_size: int = 2) -> None:
        from erasure.ddpm.model import is_class_ddpm_folder

        self.model_dir = Path(model_dir).resolve()
        if not is_class_ddpm_folder(self.model_dir):
            raise ValueError(f"{model_dir} is not a class-conditional DDPM folder; pass e.g. --model models/shapes-ddpm")
        self.runs_dir = Path(runs_dir)
        self.device = device
        self.judge_path = judge_path
        self.cache_size = max(1, int(cache_size))
        self._index = json.loads((self.model_dir / "model_index.json").read_text())
        self._erase_lock = threading.Lock()  # one erasure at a time
        self._load_lock = threading.Lock()
        self._job: _Job | None = None
        self._original = None
        self._runs: OrderedDict[str, Any] = OrderedDict()
        self._judge = None

    # ------------------------------------------------------------------------------------------ what there is

    @property
    def classes(self) -> list[str]:
        return list(self._index["class_names"])

    def anchor_choices(self) -> list[str]:
        return [RANDOM_ANCHOR] + self.classes

    @staticmethod
    def methods() -> list[tuple[str, str]]:
        """``(name, description)`` of every class-forgetting method, the config's default first."""
        from erasure.ddpm.methods import CLASS_METHODS

        default = ClassEraseConfig.__dataclass_fields__["method"].default
        return [(n, CLASS_METHODS[n].description) for n in sorted(CLASS_METHODS, key=lambda m: m != default)]

    def describe_model(self) -> str:
        return f"class-conditional DDPM {self.model_dir.name} ({len(self.classes)} classes: {', '.join(self.classes)})"

    @property
    def busy(self) -> bool:
        return self._job is not None

    # ------------------------------------------------------------------------------------------ erasing

    def _check_class(self, name: str, what: str) -> str:
        if name not in self.classes:
            raise ValueError(f"unknown {what} {name!r}; choose one of {', '.join(self.classes)}")
        return name

    def default_run_id(self, forget_class: str, method: str) -> str:
        base = f"{forget_class}-{method}-{time.strftime('%Y%m%d-%H%M%S')}"
        rid, n = base, 1
        while self._taken(rid):
            n += 1
            rid = f"{base}-{n}"
        return rid

    def _taken(self, rid: str) -> bool:
        from erasure.runs import partial_dir

        p = self.runs_dir / rid
        return p.exists() or partial_dir(p).exists()

    def make_config(self, forget_class: str, anchor_class: str = RANDOM_ANCHOR, method: str = "salun", steps: int = _DEFAULTS["steps"],
                    lr: float = _DEFAULTS["lr"], mask_ratio: float = 0.5, seed: int = 0, **extra: Any) -> ClassEraseConfig:
        """The erasure's config from form values; one-line ``ValueError`` for bad input."""
        from erasure.ddpm.methods import CLASS_METHODS

        self._check_class(forget_class, "forget class")
        if anchor_class in (None, ""):
            anchor_class = RANDOM_ANCHOR
        if anchor_class != RANDOM_ANCHOR:
            self._check_class(anchor_class, "anchor class")
            if anchor_class == forget_class:
                raise ValueError(f"the anchor class must differ from the forget class {forget_class!r}; "
                                 f"choose another class or '{RANDOM_ANCHOR}'")
        if method not in CLASS_METHODS:
            raise ValueError(f"unknown method {method!r}; choose one of {', '.join(n for n, _ in self.methods())}")
        values = {"steps": steps, "lr": lr, "mask_ratio": mask_ratio, "seed": seed}
        for k, v in values.items():
            if v is None or (isinstance(v, str) and not v.strip()):
                raise ValueError(f"{k.replace('_', ' ')} is missing; enter a number")
        for k in ("steps", "seed"):
            v = values[k]
            if isinstance(v, float) and v.is_integer():
                values[k] = int(v)
            elif not isinstance(values[k], int) or isinstance(values[k], bool):
                raise ValueError(f"{k} must be a whole number, got {v!r}")
        # ranges are the config fields' own (ClassEraseConfig.check_fields names the field and its range)
        return ClassEraseConfig(model=str(self.model_dir), forget_class=forget_class, anchor_class=anchor_class,
                                method=method, lr=float(values["lr"]), mask_ratio=float(values["mask_ratio"]),
                                steps=values["steps"], seed=values["seed"], device=str(self.device), **extra)

    def check_run_name(self, run_name: str | None) -> str | None:
        """A free, valid run name (None when empty: a name is made up); one-line ValueError otherwise."""
        name = (run_name or "").strip()
        if not name:
            return None
        if not _RUN_NAME.fullmatch(name) or name.endswith(".partial"):
            raise ValueError(f"run name {name!r} may hold only letters, digits, '.', '_' and '-' (up to 80, "
                             "starting with a letter or digit); choose another name")
        if self._taken(name):
            raise ValueError(f"a run named {name!r} exists; choose another run name")
        return name

    def erase(self, forget_class: str, anchor_class: str = RANDOM_ANCHOR, method: str = "salun", steps: int = _DEFAULTS["steps"],
              lr: float = _DEFAULTS["lr"], mask_ratio: float = 0.5, seed: int = 0, run_name: str | None = None,
              progress: Progress | None = None, **extra: Any) -> str:
        """Run one erasure into ``runs_dir/<run id>``; returns the run id.

        ``extra`` are further :class:`ClassEraseConfig` fields (``batch_size``, ``n_forget``, ``method_args`` ...).
        Raises ``ValueError`` for bad input (before anything is written), ``RuntimeError`` while another erasure
        runs, :class:`ClassEraseStopped` when :meth:`cancel` stopped it (its partial folder is removed).
        """
        from erasure.ddpm.erase import erase_class
        from erasure.runs import partial_dir

        cfg = self.make_config(forget_class, anchor_class, method, steps, lr, mask_ratio, seed, **extra)
        if not self._erase_lock.acquire(blocking=False):
            raise RuntimeError("an erasure is already running; wait for it or cancel it")
        try:
            rid = self.check_run_name(run_name) or self.default_run_id(forget_class, method)
            self._job = _Job(rid, threading.Event(), time.time())
            out = self.runs_dir / rid
            self.runs_dir.mkdir(parents=True, exist_ok=True)
            try:
                erase_class(cfg, out, progress=progress, cancel=self._job.cancel)
            except ClassEraseCancelled as err:
                shutil.rmtree(partial_dir(out), ignore_errors=True)
                step = str(err).split(";")[0]
                raise ClassEraseStopped(f"erasure {rid} {step}; nothing was saved") from None
            except BaseException:
                shutil.rmtree(partial_dir(out), ignore_errors=True)
                raise
            return rid
        finally:
            self._job = None
            self._erase_lock.release()

    def cancel(self) -> bool:
        """Ask the running erasure to stop after its current step; False when none runs."""
        job = self._job
        if job is None:
            return False
        job.cancel.set()
        return True

    # ------------------------------------------------------------------------------------------ runs

    def list_runs(self) -> list[dict[str, Any]]:
        """The finished class-forgetting runs of this model, newest first (``run.json`` plus ``id``)."""
        from erasure.runs import DDPM_RUN_FORMAT, list_runs

        out = []
        for info in list_runs(self.runs_dir, kind=DDPM_RUN_FORMAT):
            if Path(info.get("base_model", "")).resolve() != self.model_dir:
                continue
            out.append(dict(info, id=Path(info["run_dir"]).name))
        return out

    def run_ids(self) -> list[str]:
        return [r["id"] for r in self.list_runs()]

    def run_info(self, run_id: str) -> dict[str, Any]:
        for r in self.list_runs():
            if r["id"] == run_id:
                return r
        raise ValueError(f"no run {run_id!r} in {self.runs_dir}; erase a class first or pick a run from the list")

    @staticmethod
    def summary(info: dict[str, Any]) -> dict[str, Any]:
        """The run's headline figures: forget/anchor class, method, steps, seconds, weights the run may change
        (``mask_kept``: the saliency mask's weights; ``changed_params``: the saved tensors' sizes, whole tensors)."""
        cfg = info.get("config", {})
        return {"id": info.get("id", Path(info.get("run_dir", "")).name), "forget_class": info.get("forget_class"),
                "anchor_class": info.get("anchor_class"), "method": info.get("method"), "steps": info.get("steps"),
                "lr": cfg.get("lr"), "mask_ratio": cfg.get("mask_ratio") if info.get("needs_mask") else None,
                "time_s": (info.get("timing_s") or {}).get("total"), "changed_params": info.get("changed_params"),
                "mask_kept": (info.get("mask") or {}).get("kept"), "mask_ratio_kept": (info.get("mask") or {}).get("ratio"),
                "created": info.get("created")}

    # ------------------------------------------------------------------------------------------ comparing

    def _original_model(self):
        from erasure.ddpm.model import load_class_ddpm

        with self._load_lock:
            if self._original is None:
                self._original = load_class_ddpm(self.model_dir, self.device)
            return self._original

    def _run_model(self, run_id: str):
        from erasure.ddpm.erase import load_class_run

        info = self.run_info(run_id)
        with self._load_lock:
            key = f"{run_id}@{info.get('created', '')}"
            if key not in self._runs:
                self._runs[key] = load_class_run(info["run_dir"], self.device, base_model=str(self.model_dir))
                while len(self._runs) > self.cache_size:
                    self._runs.popitem(last=False)
            self._runs.move_to_end(key)
            return self._runs[key]

    def judge(self):
        from erasure.shapes import load_judge

        with self._load_lock:
            if self._judge is None:
                self._judge = load_judge(self.judge_path, self.device)
            return self._judge

    def sample(self, model: str, class_name: str, seeds: list[int], num_inference_steps: int | None = None) -> list:
        """Images of ``class_name`` for ``seeds`` from the original (``model`` = "original") or a run, upscaled to 64 px."""
        from PIL import Image

        m = self._original_model() if model == "original" else self._run_model(model)
        imgs = m.sample([class_name] * len(seeds), list(seeds), num_inference_steps=num_inference_steps)
        return [im if im.size == (DISPLAY_SIZE, DISPLAY_SIZE) else im.resize((DISPLAY_SIZE, DISPLAY_SIZE), Image.BICUBIC)
                for im in imgs]

    def compare(self, run_id: str, class_name: str, seeds: str | list[int] = "0, 1, 2, 3",
                num_inference_steps: int | None = None) -> dict[str, Any]:
        """Images of ``class_name`` from the original model and from run ``run_id`` on the same seeds, judged.

        Returns ``{"original": [(image, label)], "erased": [(image, label)], "seeds", "class", "run", "forget_class",
        "forget_seen" (erased images the judge labels as the run's forget class), "n"}``.
        """
        from erasure.ddpm.evaluate import judge_labels

        self._check_class(class_name, "class")
        if not run_id:
            raise ValueError("no run chosen; erase a class first or pick a run from the list")
        info = self.run_info(run_id)
        seeds = parse_seeds(seeds)
        a = self.sample("original", class_name, seeds, num_inference_steps)
        b = self.sample(run_id, class_name, seeds, num_inference_steps)
        judge = self.judge()
        la, lb = judge_labels(judge, a), judge_labels(judge, b)
        forget = info.get("forget_class")
        return {"original": list(zip(a, la)), "erased": list(zip(b, lb)), "seeds": seeds, "class": class_name,
                "run": run_id, "forget_class": forget, "forget_seen": sum(lab == forget for lab in lb), "n": len(lb)}
