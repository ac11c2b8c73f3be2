"""The app's service object: everything the web UI does goes through :class:`AppService` (no gradio here).

It owns the base model id, the runs folder, a bounded LRU cache of loaded pipelines, the single erasure
slot (one erasure trains at a time; a second waits on the lock), the cancel event of the running erasure
and the judges (the shapes judge for the embedded model, NudeNet for Stable Diffusion models). A cancelled
erasure stays on disk as an interrupted run (``RUN.partial``): :meth:`AppService.list_interrupted` lists them,
:meth:`AppService.resume_run` continues one from its checkpoint and :meth:`AppService.delete_run` removes one.

Every user-facing failure is an :class:`AppError` (a ``ValueError``) with a readable message; the UI shows
it with ``gr.Error``.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import logging
import math
import os
import re
import shutil
import threading
import time
import zipfile
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

from erasure.progress import ProgressEvent
from erasure.resources import prompt_file
from erasure_app.jobs import Job, erase_plan, job_work

logger = logging.getLogger(__name__)

__all__ = ["AppError", "BusyError", "AppService", "EraseJob", "PipelineCache", "ORIGINAL", "RUN_ID_RE", "parse_seeds",
           "parse_prompts", "method_settings"]

ORIGINAL = "original"
"""The model choice that means the base model without any run applied."""

RUN_ID_RE = re.compile(r"^[A-Za-z0-9_.-]+$")
LIMITS = {
    "gen_steps": (1, 150),
    "guidance": (0.0, 30.0),
    "seeds": (1, 8),
    "seed": (0, 2**32 - 1),
    "prompt_chars": 1000,
    "eval_prompts": 500,
    "prompts": 256,
    "concept_chars": 100,
    "job_images": 4096,
    "job_work": 1_000_000,
    "queue": 4,
}
"""Limits of the app's own inputs: generation, evaluation, and the size of one erasure job (prompts per list,
concept-name length, Df/Dr images and work units: images x sampling steps + steps x batch size); each erasure
setting is also checked by its config."""

LIMITS_TEXT = (f"Limits per erasure: {LIMITS['prompts']} prompts per list, {LIMITS['job_images']:,} generated images, "
               f"{LIMITS['job_work']:,} work units (images x sampling steps + steps x batch size).")

FIRST_PRESETS = ("shape_circle", "nudity")
"""Presets listed first (the README's quick start erases shape_circle from the shapes model)."""

RESERVED_SUFFIXES = (".partial", ".tmp")
"""Run names may not end with these (the run store's own folders)."""


_JOB_WORDS = {"evaluate": "evaluation", "erase": "erasure", "resume": "resumed erasure", "attack": "attack"}


class AppError(ValueError):
    """A problem with the user's input or request, worded for the page."""


class JobCancelled(AppError):
    """A job was cancelled (through :meth:`AppService.cancel`)."""


class BusyError(AppError):
    """Another erasure is training."""


def _num(name: str, v: Any, lo: float, hi: float, integer: bool = False) -> float | int:
    if v is None or isinstance(v, bool) or (isinstance(v, str) and not v.strip()):
        raise AppError(f"{name} is missing")
    try:
        x = float(v)
    except (TypeError, ValueError):
        raise AppError(f"{name} must be a number, got {v!r}") from None
    if not math.isfinite(x):
        raise AppError(f"{name} must be a finite number, got {v!r}")
    if integer:
        if x != int(x):
            raise AppError(f"{name} must be a whole number, got {v!r}")
        x = int(x)
    if not lo <= x <= hi:
        raise AppError(f"{name} must be between {lo:g} and {hi:g}, got {v!r}")
    return x


def parse_prompts(text: str | Sequence[str] | None, what: str, allow_empty: bool = False) -> list[str]:
    """One prompt per line (blank lines ignored)."""
    if text is None:
        lines: list[str] = []
    elif isinstance(text, str):
        lines = [ln.strip() for ln in text.splitlines()]
    else:
        lines = [str(t).strip() for t in text]
    lines = [ln for ln in lines if ln]
    if not lines and not allow_empty:
        raise AppError(f"{what} are empty: give at least one prompt (one per line)")
    if len(lines) > LIMITS["prompts"]:
        raise AppError(f"{what}: {len(lines)} given; the limit is {LIMITS['prompts']} per list")
    for ln in lines:
        if len(ln) > LIMITS["prompt_chars"]:
            raise AppError(f"a {what[:-1]} is {len(ln)} characters long; the limit is {LIMITS['prompt_chars']}")
    return lines


def parse_seeds(text: str | int | Sequence[int] | None) -> list[int]:
    """``"0"``, ``"0, 1, 2"``, ``"0-3"`` or a list -> a list of seeds (at most ``LIMITS['seeds'][1]``)."""
    if isinstance(text, bool):
        raise AppError("seeds must be whole numbers")
    if isinstance(text, (int, float)):
        items: list[Any] = [text]
    elif isinstance(text, str):
        items = []
        for tok in re.split(r"[,\s]+", text.strip()):
            if not tok:
                continue
            m = re.fullmatch(r"(\d+)-(\d+)", tok)
            if m:
                a, b = int(m.group(1)), int(m.group(2))
                if b < a or b - a >= LIMITS["seeds"][1]:
                    raise AppError(f"seed range {tok} must be increasing and hold at most {LIMITS['seeds'][1]} seeds")
                items.extend(range(a, b + 1))
            else:
                items.append(tok)
    elif text is None:
        items = []
    else:
        items = list(text)
    lo, hi = LIMITS["seeds"]
    if not lo <= len(items) <= hi:
        raise AppError(f"give between {lo} and {hi} seeds (comma separated), got {len(items)}")
    return [int(_num("seed", s, *LIMITS["seed"], integer=True)) for s in items]


_FLAG_WORDS = {"forget-prompt": "forget prompts", "anchor-prompt": "anchor prompts", "retain-prompt": "retain prompts",
               "alpha": "retain weight (alpha)", "concept-file": "a concept file", "overwrite": "a new run name"}


def page_words(msg: str) -> str:
    """An engine message in the page's words: command-line flags (``--retain-prompt``) become the form's names."""
    from erasure_app.forms import erase_form_fields

    labels = {ff.name.replace("_", "-"): ff.label for ff in erase_form_fields().values()}

    def word(m: re.Match) -> str:
        flag = m.group(1)
        return _FLAG_WORDS.get(flag) or labels.get(flag) or flag.replace("-", " ")

    msg = re.sub(r"add --retain-prompt,? or set --alpha 0", "add retain prompts, or set the retain weight (alpha) to 0",
                 msg)
    return re.sub(r"--([a-z][a-z0-9-]*)", word, msg)


def check_job_size(cfg: Any) -> None:
    """Refuse an erasure over the job limits (:data:`LIMITS`), naming the limit."""
    images, work = job_work(cfg)
    if images > LIMITS["job_images"]:
        raise AppError(f"this erasure would generate {images:,} Df/Dr images; the limit is {LIMITS['job_images']:,} "
                       "(fewer prompts or fewer images per prompt)")
    if work > LIMITS["job_work"]:
        raise AppError(f"this erasure is {work:,} work units (images x sampling steps + steps x batch size); the limit "
                       f"is {LIMITS['job_work']:,} (fewer steps, a smaller batch or fewer images)")


def method_settings(cfg: dict[str, Any]) -> str:
    """A saved config's method settings for the runs table (``alpha=0.5, retain_loss=denoise``); "" if unreadable.

    Configs written before ``method_args`` existed are read through :meth:`erasure.EraseConfig.from_dict`.
    """
    from erasure.config import EraseConfig

    try:
        args = EraseConfig.from_dict(cfg).method_args.to_dict()
    except (ValueError, TypeError, KeyError):
        return ""
    return ", ".join(f"{k}={v}" for k, v in args.items())


def _slug(text: str, limit: int = 40) -> str:
    s = re.sub(r"[^A-Za-z0-9_.-]+", "-", text.strip()).strip("-.")
    return (s[:limit] or "run").strip("-.") or "run"


EraseJob = Job
"""The erasure that holds the training slot (an alias of :class:`erasure_app.jobs.Job`)."""


class PipelineCache:
    """A bounded LRU of loaded pipelines; each entry has its own lock (a pipeline is not thread-safe).

    ``loader(key)`` builds a pipeline; ``use(key, stamp)`` yields it while holding its lock. ``stamp``
    identifies the version on disk (a changed stamp reloads).
    """

    def __init__(self, loader: Callable[[str], Any], capacity: int = 2):
        if capacity < 1:
            raise ValueError("the pipeline cache holds at least 1 model")
        self.loader = loader
        self.capacity = capacity
        self._entries: OrderedDict[str, tuple[Any, Any, threading.Lock]] = OrderedDict()
        self._lock = threading.Lock()
        self._loading: dict[str, threading.Lock] = {}
        self.loads = 0

    def keys(self) -> list[str]:
        with self._lock:
            return list(self._entries)

    def invalidate(self, key: str) -> None:
        with self._lock:
            self._entries.pop(key, None)

    @contextmanager
    def use(self, key: str, stamp: Any = None) -> Iterator[Any]:
        with self._lock:
            load_lock = self._loading.setdefault(key, threading.Lock())
        with load_lock:  # one load per key at a time; others wait for it
            with self._lock:
                ent = self._entries.get(key)
                if ent is not None and ent[1] == stamp:
                    self._entries.move_to_end(key)
            if ent is None or ent[1] != stamp:
                pipe = self.loader(key)
                self.loads += 1
                ent = (pipe, stamp, threading.Lock())
                with self._lock:
                    self._entries[key] = ent
                    self._entries.move_to_end(key)
                    while len(self._entries) > self.capacity:
                        self._entries.popitem(last=False)
        with ent[2]:
            yield ent[0]


class AppService:
    """What the web app can do, without any UI.

    Args:
        model (`str`, defaults to `"default"`): base model: a local diffusers folder, a hub id, or ``default``
            (the embedded shapes model).
        runs_dir (`str`, defaults to `"runs"`): where runs are saved (one folder per run).
        device (`str`, defaults to `"auto"`): device for generation and training.
        cache_size (`int`, defaults to 2): loaded pipelines kept in memory (the original model counts as one).
        data_cache_dir (`str`, *optional*): cache of generated Df/Dr images (``EraseConfig.cache_dir``).
        judge (`str`, defaults to `"auto"`): ``shapes``, ``nudenet``, ``none`` or ``auto`` (shapes for the
            embedded model, NudeNet otherwise).
        gen_batch_size (`int`, defaults to 4): images per pipeline call.
    """

    def __init__(
        self,
        model: str = "default",
        runs_dir: str | os.PathLike = "runs",
        device: str = "auto",
        cache_size: int = 2,
        data_cache_dir: str | None = None,
        judge: str = "auto",
        gen_batch_size: int = 4,
    ):
        from erasure.diffusion.pipeline import resolve_model

        try:
            self.model = resolve_model(model)
        except ValueError as err:
            raise AppError(str(err)) from err
        self.model_arg = model
        self.runs_dir = Path(runs_dir).resolve()
        self.device = device
        self.data_cache_dir = data_cache_dir
        self.gen_batch_size = gen_batch_size
        if judge not in ("auto", "shapes", "nudenet", "none"):
            raise AppError(f"judge must be auto, shapes, nudenet or none, got {judge!r}")
        self.model_kind = "shapes" if judge == "shapes" or self._is_shapes_model() else "sd"
        self.judge_kind = ("shapes" if self.model_kind == "shapes" else "nudenet") if judge == "auto" else judge
        self.cache = PipelineCache(self._load_pipeline, capacity=cache_size)
        self._erase_lock = threading.Lock()
        self._state_lock = threading.Lock()
        self._job: Job | None = None
        self._waiting: list[Job] = []
        self._other_jobs: list[Job] = []  # evaluations (they do not take the erasure slot)
        self._last = ""
        self._judge_obj: Any = None
        self._judge_lock = threading.Lock()
        self._export_lock = threading.Lock()

    # ------------------------------------------------------------------ model and presets
    def _is_shapes_model(self) -> bool:
        try:
            from erasure.shapes import default_model_path
        except ImportError:
            return False
        try:
            return Path(self.model).resolve() == Path(default_model_path()).resolve()
        except OSError:
            return False

    def describe_model(self) -> str:
        kind = "embedded shapes model" if self.model_kind == "shapes" else "Stable Diffusion model"
        return f"{self.model} ({kind}; judge: {self.judge_kind})"

    def presets(self) -> list[tuple[str, str]]:
        """``(label, name)`` of the presets made for this kind of model (all of them if none match)."""
        from erasure.presets import list_presets, load_preset

        out, other = [], []
        for name in list_presets():
            try:
                p = load_preset(name)
            except (ValueError, KeyError) as err:
                logger.warning("skipping preset %s: %s", name, err)
                continue
            label = f"{p.concept.name} ({p.kind or 'concept'})" if p.kind else p.concept.name
            (out if p.model == self.model_kind else other).append((label, name))
        out = out or other
        # the README's examples first: the default preset is the one the quick start erases
        out.sort(key=lambda lab_name: lab_name[1] not in FIRST_PRESETS)
        return out

    def _preset(self, name: str):
        """``(preset, its EraseConfig)``; a preset's older top-level method keys are read into ``method_args``."""
        from erasure.config import EraseConfig
        from erasure.presets import load_preset

        try:
            p = load_preset(name)
            return p, EraseConfig.from_dict({**p.config, "concepts": [c.to_dict() for c in p.concepts]})
        except (ValueError, TypeError) as err:
            raise AppError(str(err)) from err

    def preset_form(self, name: str) -> dict[str, Any]:
        """The form values of a preset: prompts one per line, its method, ``method_args`` (a dict of the method's
        settings) and the :data:`~erasure_app.forms.FORM_FIELDS` settings (the config defaults where it sets none)."""
        from erasure_app.forms import FORM_FIELDS

        p, cfg = self._preset(name)
        c = cfg.concepts[0]
        data = self._defaults_data(p.config, p.name)  # the model's defaults under the preset's settings
        d: dict[str, Any] = {f: data[f] for f in FORM_FIELDS}
        d.update(method=data["method"], method_args={**cfg.method_args.to_dict(), **data["method_args"]}, name=c.name, forget="\n".join(c.forget_prompts),
                 anchor="\n".join(c.anchor_prompts), retain="\n".join(c.retain_prompts), description=p.description,
                 preset=p.name, model_method_args=self.model_method_args())
        return d

    def model_method_args(self) -> dict[str, Any]:
        """The model's default settings of every method (where the controls of a method other than the form's start)."""
        from erasure.auto.defaults import model_method_args

        try:
            return model_method_args(self.model)
        except ValueError as err:
            raise AppError(str(err)) from err

    def custom_form(self) -> dict[str, Any]:
        """The form values of "custom": no prompts and every setting at this model's defaults (its
        ``erasure_defaults.json``, the paper's for SD v1/v2, else the config's built-in defaults; never the
        previously chosen preset's)."""
        from erasure.methods import METHODS
        from erasure_app.forms import FORM_FIELDS

        cfg = self._defaults_data()
        method = cfg["method"]
        args = {**METHODS[method].config_cls().to_dict(), **cfg["method_args"]}
        return dict({f: cfg[f] for f in FORM_FIELDS}, method=method, method_args=args, name="", forget="",
                    anchor="", retain="", preset="custom", model_method_args=self.model_method_args(),
                    description="Custom: type your own forget and anchor prompts (open **Prompts**); retain prompts are "
                                "optional (with fewer than 8, an automatic retain set and the nearest concepts are "
                                "added). Every setting starts from this model's defaults.")

    def _defaults_data(self, preset_config: dict[str, Any] | None = None, preset: str = "") -> dict[str, Any]:
        """Built-in defaults < this model's defaults < the preset's config, as one EraseConfig dict (no concepts)."""
        from erasure.auto.defaults import model_defaults, resolve_settings
        from erasure.config import EraseConfig

        try:
            mdef, msrc = model_defaults(self.model)
        except ValueError as err:
            raise AppError(str(err)) from err
        layers = ([(msrc, mdef)] if msrc else []) + ([(f"preset:{preset}", preset_config)] if preset_config else [])
        data, _ = resolve_settings(layers)
        out = {f: EraseConfig.__dataclass_fields__[f].default for f in EraseConfig.__dataclass_fields__
               if f not in ("concepts", "method_args", "auto")}
        out.update(data)
        return out

    def auto_preview(self, concept: str, forget: str | Sequence[str], anchor: str | Sequence[str],
                     retain: str | Sequence[str] = "") -> str:
        """What the erasure will add before training: the anchor when none is typed, the neighbour concepts (nearest
        by the text encoder, extra retain weight) and, with fewer retain prompts than the threshold, the automatic
        retain set (markdown)."""
        from erasure.auto.anchor import with_anchor
        from erasure.auto.neighbours import find_neighbours
        from erasure.auto.prepare import auto_active

        cfg = self.make_config(concept, forget, anchor, retain)
        if not auto_active(cfg):
            return "Automatic retain and neighbour sets are off for this model."
        a, c = cfg.auto, cfg.concepts[0]
        lines = []
        with self.cache.use(ORIGINAL) as pipe:
            c, chosen = with_anchor(pipe, c, a.anchor_rule, a.vocabulary, self.model)
            if chosen is not None:
                how = (f"{chosen['term']} is the {chosen['vocabulary'].split(' (')[0]} term nearest {chosen['replaces']} "
                       f"(similarity {chosen['similarity']:.2f})" if "term" in chosen else "the empty prompt")
                lines.append(f"**Anchor** (none typed): {c.anchor_prompts[0]!r}: {how}")
            if a.neighbours:
                try:
                    nbrs, label = find_neighbours(pipe, c, a.neighbours, a.vocabulary, self.model)
                    lines.append(f"**Neighbours** (kept with weight {a.neighbour_weight:g}; from {label}): "
                                 + ", ".join(f"{n['term']} ({n['similarity']:.2f})" for n in nbrs))
                except (FileNotFoundError, ValueError) as err:
                    lines.append(f"Neighbours: none ({err})")
        if a.min_retain and len(c.retain_prompts) < a.min_retain:
            lines.append(f"**Automatic retain set**: {a.retain_size} diverse captions without the concept "
                         f"({a.retain_pool} pool) are added to your {len(c.retain_prompts)} retain prompt(s).")
        return "\n\n".join(lines) or "Nothing is added: enough retain prompts are given."

    def make_config(
        self,
        concept: str,
        forget: str | Sequence[str],
        anchor: str | Sequence[str],
        retain: str | Sequence[str],
        method: str | None = None,
        preset: str | None = None,
        method_args: dict[str, Any] | str | None = None,
        **settings: Any,
    ):
        """Validate the form and build an :class:`~erasure.EraseConfig` (a preset's other settings are kept).

        Args:
            method (`str`, *optional*): the erasure method; by default the preset's, else the model's default one
                (its ``erasure_defaults.json``), else SalUn.
            method_args (`dict` or JSON `str`, *optional*): the method's own settings; those it leaves out are the
                preset's (when the preset uses this method) or the defaults.
            settings: :data:`~erasure_app.forms.FORM_FIELDS` values as the form gives them (``steps=100``); a
                setting left out is the preset's (or the default), one given as None or "" is missing.

        The config checks every value and names the field in its error (raised as :class:`AppError`).
        """
        from erasure import ConceptSpec, EraseConfig
        from erasure.methods import METHODS
        from erasure_app.forms import erase_form_fields, from_form, parse_method_args

        fields = erase_form_fields()
        unknown = sorted(set(settings) - set(fields))
        if unknown:
            raise TypeError(f"make_config() got unknown settings {unknown}; the form shows {sorted(fields)}")
        if preset:
            from erasure.presets import load_preset

            try:
                pr = load_preset(preset)
            except ValueError as err:
                raise AppError(str(err)) from err
            base: dict[str, Any] = self._defaults_data(pr.config, pr.name)
        else:
            base = self._defaults_data()
        forget_l = parse_prompts(forget, "forget prompts")
        anchor_l = parse_prompts(anchor, "anchor prompts", allow_empty=True)  # none: the model's anchor rule
        retain_l = parse_prompts(retain, "retain prompts", allow_empty=True)
        concept = (concept or "").strip() or forget_l[0][:LIMITS["concept_chars"]]
        method = method or base.get("method") or "salun"
        if len(concept) > LIMITS["concept_chars"]:
            raise AppError(f"concept name is {len(concept)} characters long; the limit is {LIMITS['concept_chars']}")
        if method not in METHODS:
            raise AppError(f"unknown method {method!r}; choose one of {', '.join(sorted(METHODS))}")
        try:
            if base.get("method", method) == method:
                args = dict(base.get("method_args") or {})
            else:  # another method than the preset's or the model's: the model's defaults for it
                own = {f.name for f in dataclasses.fields(METHODS[method].config_cls)}
                args = {k: v for k, v in self.model_method_args().items() if k in own}
            args.update(parse_method_args(method_args))
            for key, value in settings.items():
                base[key] = from_form(fields[key], value)
        except ValueError as err:
            raise AppError(str(err)) from err
        base.update(method=method, method_args=args, model=self.model, device=self.device)
        if self.data_cache_dir:
            base["cache_dir"] = self.data_cache_dir
        if not anchor_l and (base.get("auto") or {}).get("anchor_rule", "none") == "none":  # not a form control
            raise AppError("anchor prompts are empty and this model's defaults do not choose an anchor: type the "
                           "prompt the concept should become")
        try:
            spec = ConceptSpec(name=concept, forget_prompts=forget_l, anchor_prompts=anchor_l, retain_prompts=retain_l)
            cfg = EraseConfig.from_dict({**base, "concepts": [spec.to_dict()]})
        except (ValueError, TypeError) as err:
            raise AppError(page_words(str(err))) from err
        check_job_size(cfg)
        return cfg

    # ------------------------------------------------------------------ runs
    def check_run_id(self, run_id: str | None, what: str = "run id") -> str:
        if not isinstance(run_id, str) or not run_id.strip():
            raise AppError(f"{what} is empty")
        run_id = run_id.strip()
        if len(run_id) > 100:
            raise AppError(f"{what} is longer than 100 characters")
        if "/" in run_id or "\\" in run_id or ".." in run_id or not RUN_ID_RE.match(run_id) or run_id.startswith("."):
            raise AppError(
                f"invalid {what} {run_id!r}: use letters, digits, '_', '-' and '.', with no path separators or '..'"
            )
        if run_id == ORIGINAL:
            raise AppError(f"'{ORIGINAL}' is reserved for the base model; choose another name")
        if run_id.lower().endswith(RESERVED_SUFFIXES):
            raise AppError(f"{what} {run_id!r} may not end in {' or '.join(RESERVED_SUFFIXES)} (the run store uses "
                           "those endings for its own folders)")
        return run_id

    def run_dir(self, run_id: str, must_exist: bool = True) -> Path:
        run_id = self.check_run_id(run_id)
        d = self.runs_dir / run_id
        if d.resolve().parent != self.runs_dir:
            raise AppError(f"invalid run id {run_id!r}")
        if must_exist:
            from erasure import RunDirError, read_run

            try:
                read_run(d)
            except RunDirError as err:
                if not d.exists():
                    raise AppError(f"no saved run named {run_id!r}: press Refresh runs to update the list "
                                   "(it may have been renamed or deleted in another window)") from None
                raise AppError(str(err)) from err
        return d

    def list_runs(self) -> list[dict[str, Any]]:
        from erasure.runs import list_runs

        out = []
        for info in list_runs(self.runs_dir):
            d = Path(info["run_dir"])
            cfg = info.get("config", {})
            if not isinstance(cfg, dict):  # damaged: listed by list_damaged
                continue
            kept = trained_mask(info.get("mask") or {})[0]
            out.append({
                "run": d.name,
                "concepts": ", ".join(info.get("concepts", [])),
                "method": info.get("method", ""),
                "steps": None if _own_loop(info.get("method", "")) else cfg.get("steps"),
                "method settings": method_settings(cfg),
                "mask kept": None if kept is None else round(kept, 4),
                "final loss": (info.get("final") or {}).get("loss"),
                "created": info.get("created", ""),
                "base model": Path(str(info.get("base_model", ""))).name,
            })
        return out

    def list_damaged(self) -> list[dict[str, str]]:
        """Run folders whose ``run.json`` cannot be read (``{"run", "problem"}``); they can only be deleted."""
        from erasure.runs import PARTIAL_SUFFIX, RunDirError, read_run

        out = []
        if not self.runs_dir.is_dir():
            return out
        for d in sorted(self.runs_dir.iterdir()):
            if (not d.is_dir() or d.name.startswith(".") or d.name.endswith(PARTIAL_SUFFIX)
                    or not (d / "run.json").is_file() or not RUN_ID_RE.match(d.name)):
                continue
            try:
                info = read_run(d)
                if not isinstance(info.get("config", {}), dict):
                    raise RunDirError(f"run.json's config is not an object: {info.get('config')!r:.60}")
            except (RunDirError, ValueError, TypeError, AttributeError, OSError) as err:
                out.append({"run": d.name, "problem": str(err)[:300]})
        return out

    def run_ids(self) -> list[str]:
        return [r["run"] for r in self.list_runs()]

    def read_run(self, run_id: str) -> dict[str, Any]:
        from erasure import read_run

        return read_run(self.run_dir(run_id))

    def _busy_locked(self, run_id: str) -> bool:
        """Whether an erasure writing ``run_id`` is training or waiting (the caller holds ``_state_lock``)."""
        return any(j.run_id == run_id for j in ([self._job] if self._job else []) + self._waiting)

    def _busy_with(self, run_id: str) -> bool:
        with self._state_lock:
            return self._busy_locked(run_id)

    def rename_run(self, run_id: str, new_id: str) -> str:
        src = self.run_dir(run_id)
        new_id = self.check_run_id(new_id, "new name")
        dst = self.runs_dir / new_id
        if dst.exists() or self.partial_dir(new_id).exists():
            raise AppError(f"a run named {new_id!r} already exists")
        if self._busy_with(run_id) or self._busy_with(new_id):
            raise AppError("that run is being written by an erasure; wait for it to finish")
        os.replace(src, dst)
        self.cache.invalidate(run_id)
        (self.runs_dir / ".downloads" / f"{run_id}-run.zip").unlink(missing_ok=True)
        return new_id

    def delete_run(self, run_id: str, interrupted: bool | None = None) -> str:
        """Delete a saved run or an interrupted one (``RUN.partial``, named without ``.partial``).

        ``interrupted=None`` deletes the saved run when there is one, else the interrupted one; ``True`` only
        the interrupted one, ``False`` only the saved one. A run that an erasure is writing is refused.
        """
        run_id = self.check_run_id(run_id)
        if interrupted is None:
            interrupted = not (self.runs_dir / run_id).exists() and self.partial_dir(run_id).is_dir()
        if interrupted:
            d, what = self.partial_dir(run_id), "interrupted run"
            if not d.is_dir():
                raise AppError(f"no interrupted run named {run_id!r} (see Interrupted runs in the Runs tab)")
        elif run_id in {r["run"] for r in self.list_damaged()}:
            d, what = self.runs_dir / run_id, "damaged run"
        else:
            d, what = self.run_dir(run_id), "run"
        trash = d.with_name(f".{run_id}.deleting-{os.getpid()}-{time.time_ns()}")
        with self._state_lock:  # no erasure can start writing it between the check and the move
            if self._busy_locked(run_id):
                raise AppError("that run is being written by an erasure; cancel it first")
            os.replace(d, trash)
        self.cache.invalidate(run_id)
        shutil.rmtree(trash, ignore_errors=True)
        logger.info("deleted %s %s", what, run_id)
        return f"deleted {what} {run_id!r}"

    # ------------------------------------------------------------------ interrupted runs
    def partial_dir(self, run_id: str) -> Path:
        """``runs_dir/RUN.partial``: where an erasure writes ``run_id`` until it is complete."""
        from erasure.runs import RunDir

        run_id = self.check_run_id(run_id)
        d = RunDir(self.runs_dir / run_id).partial
        if d.resolve().parent != self.runs_dir:
            raise AppError(f"invalid run id {run_id!r}")
        return d

    def list_interrupted(self) -> list[dict[str, Any]]:
        """Interrupted runs (``RUN.partial`` folders no erasure is writing now), newest first.

        Each is ``{"run", "concepts", "method", "step", "steps", "modified", "resumable", "note"}``: ``step``
        is the step of the latest checkpoint (0 without one), ``steps`` the total (None when unknown) and
        ``note`` says why a run cannot be resumed. What the folder holds is read by :class:`erasure.runs.RunDir`.
        """
        from erasure.runs import PARTIAL_SUFFIX, list_interrupted

        out = []
        for it in list_interrupted(self.runs_dir):
            part = Path(it.run_dir)
            name = part.name.removesuffix(PARTIAL_SUFFIX)
            if not RUN_ID_RE.match(name) or self._busy_with(name):
                continue
            try:
                mtime = max([part.stat().st_mtime] + [f.stat().st_mtime for f in part.iterdir()])
            except OSError as err:  # deleted or renamed while listing
                logger.debug("skipping %s: %s", part, err)
                continue
            cfg, note, resumable = it.config, it.note, it.resumable
            if not resumable and not note:
                note = "the checkpoint does not record its settings"
            if resumable:
                try:
                    self._resume_config(name, cfg)
                except AppError as err:
                    resumable, note = False, str(err)
            concepts = cfg.get("concepts") if isinstance(cfg.get("concepts"), list) else []
            steps = cfg.get("steps")
            out.append({
                "run": name,
                "concepts": ", ".join(str(c.get("name", "?")) for c in concepts if isinstance(c, dict)),
                "method": str(cfg.get("method", "")),
                "step": it.step,
                "steps": steps if isinstance(steps, int) and not isinstance(steps, bool) else None,
                "modified": datetime.fromtimestamp(mtime).strftime("%Y-%m-%d %H:%M:%S"),
                "resumable": resumable,
                "note": note,
                "_mtime": mtime,
            })
        out.sort(key=lambda r: r.pop("_mtime"), reverse=True)
        return out

    def _resume_config(self, run_id: str, saved: dict[str, Any]):
        """The :class:`~erasure.EraseConfig` of an interrupted run, from its checkpoint's config (all of it, e.g.
        ``checkpoint_every``), on this service's device and data cache."""
        from erasure import EraseConfig

        if saved.get("model") != self.model:
            raise AppError(f"interrupted run {run_id!r} was started on base model {saved.get('model')!r}, but this app "
                           f"serves {self.model!r}; start the app with that --model to resume it, or delete it")
        data = dict(saved, device=self.device)
        if self.data_cache_dir:
            data["cache_dir"] = self.data_cache_dir
        try:
            return EraseConfig.from_dict(data)
        except (ValueError, TypeError) as err:
            raise AppError(f"the settings of interrupted run {run_id!r} cannot be rebuilt ({err}); delete it under "
                           "Interrupted runs in the Runs tab and start the erasure again") from err

    def resume_run(
        self,
        run_id: str,
        progress: Callable[[ProgressEvent], None] | None = None,
        owner: str | None = None,
        wait: bool = True,
    ) -> str:
        """Continue an interrupted run from its latest checkpoint into the same run id, through :meth:`erase`.

        The config is the one the checkpoint records (with this service's device and data cache), so training
        goes on exactly where it stopped, with the same checkpoint interval; the single erasure slot, progress
        and cancel work as for :meth:`erase`. Returns the run id.
        """
        from erasure.runs import RunDir

        run_id = self.check_run_id(run_id)
        part = self.partial_dir(run_id)
        if self._busy_with(run_id):
            raise AppError(f"an erasure named {run_id!r} is already training or waiting")
        if not part.is_dir():
            raise AppError(f"no interrupted run named {run_id!r} (see Interrupted runs in the Runs tab)")
        it = RunDir(self.runs_dir / run_id).interrupted()
        if not it.resumable:
            why = it.note or "its checkpoint does not record its settings"
            raise AppError(f"interrupted run {run_id!r} cannot be resumed: {why}. Delete it under Interrupted runs "
                           "in the Runs tab and start the erasure again")
        cfg = self._resume_config(run_id, it.config)
        logger.info("resuming run %s from step %s", run_id, it.step)
        return self.erase(cfg, run_id, progress=progress, owner=owner, wait=wait, resuming=True)

    def run_zip(self, run_id: str, out_dir: str | os.PathLike | None = None) -> Path:
        """A zip of the run folder (run.json, weights, mask, log), for download.

        Without ``out_dir`` it is ``runs_dir/.downloads/RUN-run.zip``: one file per run, rewritten only when the
        run changed, so repeated downloads leave nothing new behind (the same bytes, so gradio's file cache keeps
        one copy too).
        """
        d = self.run_dir(run_id)
        out = Path(out_dir) if out_dir is not None else self.runs_dir / ".downloads"
        out = out / f"{d.name}-run.zip"
        out.parent.mkdir(parents=True, exist_ok=True)
        files = [f for f in sorted(d.iterdir()) if f.is_file()]
        newest = max((f.stat().st_mtime_ns for f in files), default=0)
        with self._export_lock:
            if out.is_file() and out.stat().st_mtime_ns >= newest:
                return out
            tmp = out.with_name(out.name + ".tmp")
            with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED) as z:
                for f in files:
                    z.write(f, f"{d.name}/{f.name}")
            os.replace(tmp, out)
        return out

    def export_pipeline(self, run_id: str) -> Path:
        """A zip of a complete diffusers pipeline folder (base model + erased UNet), loadable with ``from_pretrained``.

        The zip is kept in ``RUN/export/`` and reused while the run's weights are unchanged.
        """
        from erasure import load_erased_pipeline

        d = self.run_dir(run_id)
        out = d / "export" / f"{d.name}-pipeline.zip"
        with self._export_lock:
            if out.is_file() and out.stat().st_mtime_ns >= (d / "weights.safetensors").stat().st_mtime_ns:
                return out
            folder = d / "export" / ".pipeline.tmp"
            shutil.rmtree(folder, ignore_errors=True)
            try:
                pipe = load_erased_pipeline(d, device="cpu", base_model=self.model)
            except ValueError as err:
                raise AppError(str(err)) from err
            pipe.save_pretrained(str(folder), safe_serialization=True)
            del pipe
            tmp = out.with_suffix(".zip.tmp")
            with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED) as z:
                for f in sorted(folder.rglob("*")):
                    if f.is_file():
                        z.write(f, f"{d.name}/{f.relative_to(folder)}")
            os.replace(tmp, out)
            shutil.rmtree(folder, ignore_errors=True)
        return out

    # ------------------------------------------------------------------ erasure
    def erase_status(self) -> dict[str, Any]:
        with self._state_lock:
            job, waiting = self._job, list(self._waiting)
        return {
            "running": job is not None,
            "text": ("Training " + job.describe()) if job else "No erasure is training.",
            "waiting": [j.run_id for j in waiting],
        }

    def job_status(self) -> dict[str, Any]:
        """The running long job (an erasure first, else an evaluation) and the erasures waiting for the slot.

        Returns ``{"running", "kind", "run", "stage", "step", "total", "percent", "eta_s", "loss", "elapsed_s",
        "cancelling", "queue": [{"run", "kind", "concept", "method"}...], "others": [running evaluations],
        "last": the last finished job's outcome}``; fields of the running job are None when nothing runs.
        """
        with self._state_lock:
            jobs = ([self._job] if self._job else []) + list(self._other_jobs)
            waiting = list(self._waiting)
        out: dict[str, Any] = {"running": bool(jobs), "kind": None, "run": None, "stage": None, "step": None,
                               "total": None, "percent": None, "eta_s": None, "loss": None, "elapsed_s": None,
                               "cancelling": False}
        if jobs:
            out.update(jobs[0].status())
        out["queue"] = [{"run": j.run_id, "kind": j.kind, "concept": j.concept, "method": j.method} for j in waiting]
        out["others"] = [j.status() for j in jobs[1:]]
        out["last"] = self._last
        return out

    def job_owner(self) -> str | None:
        """The browser session that started the running job (None when none runs or it came from the API)."""
        with self._state_lock:
            jobs = ([self._job] if self._job else []) + list(self._other_jobs)
        return jobs[0].owner if jobs else None

    def job_losses(self) -> list[dict[str, Any]]:
        """The running erasure's losses so far (rows ``{step, series, value}``); [] when none trains."""
        with self._state_lock:
            job = self._job
        return list(job.losses) if job is not None else []

    def status_text(self) -> str:
        s = self.erase_status()
        text = s["text"]
        if s["waiting"]:
            text += f" Waiting: {len(s['waiting'])} ({', '.join(s['waiting'])})."
        return text + (f" Last: {self._last}" if self._last else "")

    def new_run_id(self, concept: str, method: str) -> str:
        base = _slug(f"{concept}-{method}-{datetime.now():%Y%m%d-%H%M%S}", 80)
        rid, i = base, 1
        while (self.runs_dir / rid).exists() or self.partial_dir(rid).exists() or self._busy_with(rid):
            i += 1
            rid = f"{base}-{i}"
        return rid

    def check_new_run(self, run_id: str | None, cfg) -> str:
        """The run id an erasure will write (given or generated); refuses an existing complete run."""
        if run_id is None or not str(run_id).strip():
            return self.new_run_id(cfg.concepts[0].name, cfg.method)
        run_id = self.check_run_id(run_id, "run name")
        if (self.runs_dir / run_id).exists():
            raise AppError(f"a run named {run_id!r} already exists; choose another name or delete it in the Runs tab")
        if self._busy_with(run_id):
            raise AppError(f"an erasure named {run_id!r} is already training or waiting")
        return run_id

    def erase(
        self,
        cfg,
        run_id: str | None = None,
        progress: Callable[[ProgressEvent], None] | None = None,
        owner: str | None = None,
        wait: bool = True,
        resuming: bool = False,
        tune: int = 0,
    ) -> str:
        """Train one erasure into ``runs_dir/run_id``; only one trains at a time (others wait, or fail if ``wait=False``).

        ``tune`` > 0 first tries at most that many shortened candidate settings (:mod:`erasure.auto.tune`).

        ``progress`` receives the engine's :class:`~erasure.progress.ProgressEvent` s. ``resuming`` only words the
        errors for :meth:`resume_run`. Returns the run id. Raises :class:`AppError` on bad input, a cancelled run,
        or a failed run.
        """
        from erasure import EraseCancelled, NonFiniteLossError, erase
        from erasure.runs import RunExistsError

        run_id = self.check_new_run(run_id, cfg)
        check_job_size(cfg)
        job = Job(run_id=run_id, owner=owner, concept=cfg.concepts[0].name, method=cfg.method,
                  kind="resume" if resuming else "erase", plan=erase_plan(cfg), planned_images=job_work(cfg)[0])
        with self._state_lock:  # checked again with the lock held: two requests for one name, or a delete
            if self._busy_locked(run_id):
                raise AppError(f"an erasure named {run_id!r} is already training or waiting")
            if wait and len(self._waiting) >= LIMITS["queue"]:
                raise BusyError(f"{len(self._waiting)} erasures are already waiting (the limit); try again later")
            self._waiting.append(job)
        try:
            if not self._erase_lock.acquire(blocking=False):
                if not wait:
                    raise BusyError(
                        f"another erasure is training ({self._job.describe() if self._job else 'starting'}); "
                        "wait for it to finish or cancel it"
                    )
                while not self._erase_lock.acquire(timeout=0.25):
                    if job.cancel.is_set():  # cancelled while waiting: never starts
                        self._last = f"run '{run_id}' cancelled while waiting; it never started."
                        raise JobCancelled(f"erasure {run_id!r} was cancelled while it waited; it never started")
        except BaseException:
            with self._state_lock:
                self._waiting.remove(job)
            raise
        try:
            with self._state_lock:
                self._waiting.remove(job)
                self._job = job
                job.started = time.time()
            if job.cancel.is_set():
                raise AppError(f"erasure {run_id!r} was cancelled before it started")

            def on_progress(event: ProgressEvent) -> None:
                # erase() itself stops a cancelled job between images, mask batches and training steps
                job.update(event)
                if progress is not None:
                    progress(event)

            self.runs_dir.mkdir(parents=True, exist_ok=True)
            try:
                if tune:
                    from erasure.auto.config import TuneConfig
                    from erasure.auto.tune import tune_and_erase

                    tune_and_erase(cfg, TuneConfig(tune=int(tune)), self.runs_dir / run_id, progress=on_progress,
                                   cancel=job.cancel)
                else:
                    erase(cfg, self.runs_dir / run_id, progress=on_progress, cancel=job.cancel)
            except EraseCancelled as err:
                where = f"at step {job.done}/{job.total}" if job.stage == "fine-tuning" else f"during {job.stage}"
                self._last = (f"run '{run_id}' cancelled {where}; it is listed under Interrupted runs in the Runs tab, "
                              "where it can be resumed or deleted.")
                raise AppError(f"erasure cancelled {where}: run '{run_id}' is listed under Interrupted runs in the Runs "
                               "tab, where it can be resumed or deleted") from err
            except RunExistsError as err:
                if resuming:
                    self._last = f"run '{run_id}' not resumed: {err}"
                    raise AppError(f"interrupted run {run_id!r} cannot be resumed with this version's settings ({err}); "
                                   "delete it under Interrupted runs in the Runs tab and start the erasure again") from err
                if self.partial_dir(run_id).is_dir():
                    self._last = f"run '{run_id}' not started: an interrupted run with other settings has that name"
                    raise AppError(f"an interrupted run named {run_id!r} with other settings exists; resume or delete "
                                   "it under Interrupted runs in the Runs tab, or choose another name") from err
                self._last = f"run '{run_id}' failed: {err}"
                raise AppError(f"erasure failed: {err}") from err
            except (NonFiniteLossError, ValueError) as err:
                self._last = f"run '{run_id}' failed: {err}"
                raise AppError(f"erasure failed: {err}") from err
            except Exception as err:
                self._last = f"run '{run_id}' failed: {err}"
                raise
            self.cache.invalidate(run_id)
            self._last = f"run '{run_id}' saved ({time.time() - job.started:.0f} s)."
            return run_id
        finally:
            with self._state_lock:
                self._job = None
            self._erase_lock.release()

    def wait_stopped(self, owner: str | None = None, timeout: float = 120.0, run: str | None = None) -> bool:
        """Wait until no job of ``owner`` (or of run ``run``; of anyone, if both are None) is running or waiting;
        False on timeout."""
        deadline = time.monotonic() + timeout
        while True:
            with self._state_lock:
                jobs = ([self._job] if self._job else []) + self._waiting + self._other_jobs
                busy = any((owner is None or j.owner == owner) and (run is None or j.run_id == run) for j in jobs)
            if not busy:
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.2)

    def cancel(self, run: str | None = None, owner: str | None = None) -> str:
        """Cancel a job: with no argument the running one (whoever started it: the app is single-tenant), with
        ``run`` the job (running or waiting) of that run, with ``owner`` that browser session's jobs.

        A running erasure stops after its current step (with a checkpoint) and is then listed as interrupted;
        a waiting one never starts. Returns what was done, in words.
        """
        with self._state_lock:
            jobs = ([self._job] if self._job else []) + list(self._other_jobs) + list(self._waiting)
        if run is not None and str(run).strip():
            run = str(run).strip()
            mine = [j for j in jobs if j.run_id == run]
            if not mine:
                return f"Nothing to cancel: no job of run {run!r} is running or waiting."
        elif owner is not None:
            mine = [j for j in jobs if j.owner == owner]
            if not mine:
                return "Nothing to cancel: no erasure of yours is training or waiting."
        else:
            mine = jobs[:1]
            if not mine:
                return "Nothing to cancel: no job is running."
        for j in mine:
            j.cancel.set()
        return "Cancelling " + ", ".join(repr(j.run_id) for j in mine) + " (the running one stops after its current step)."

    @contextmanager
    def track(self, job: Job) -> Iterator[Job]:
        """List ``job`` (an evaluation) as running while the block runs; its progress callback raises
        :class:`AppError` once it is cancelled."""
        with self._state_lock:
            self._other_jobs.append(job)
        try:
            yield job
        except AppError as err:
            if job.cancel.is_set():
                self._last = f"{_JOB_WORDS.get(job.kind, job.kind)} of run '{job.run_id}' cancelled during {job.stage}."
            raise err
        else:
            self._last = f"{_JOB_WORDS.get(job.kind, job.kind)} of run '{job.run_id}' finished ({time.time() - job.started:.0f} s)."
        finally:
            with self._state_lock:
                self._other_jobs.remove(job)

    # ------------------------------------------------------------------ generation
    def _load_pipeline(self, key: str):
        from erasure import load_erased_pipeline, load_pipeline

        try:
            if key == ORIGINAL:
                return load_pipeline(self.model, device=self.device)
            return load_erased_pipeline(self.runs_dir / key, device=self.device, base_model=self.model)
        except ValueError as err:
            raise AppError(str(err)) from err

    def _model_key(self, model_id: str | None) -> tuple[str, Any]:
        if model_id is None or str(model_id).strip() in ("", ORIGINAL):
            return ORIGINAL, None
        d = self.run_dir(str(model_id))
        st = (d / "weights.safetensors").stat()
        return d.name, (st.st_mtime_ns, st.st_size)

    def generate(self, model_id: str | None, prompt: str, seeds: Sequence[int] | str, steps: int = 25,
                 guidance: float = 7.5) -> list:
        """Images for ``prompt`` and each seed with the original model (``"original"``) or a saved run."""
        from erasure import generate

        prompt = parse_prompts([prompt or ""], "prompts")[0]
        seeds = parse_seeds(seeds)
        steps = _num("sampling steps", steps, *LIMITS["gen_steps"], integer=True)
        guidance = float(_num("guidance", guidance, *LIMITS["guidance"]))
        key, stamp = self._model_key(model_id)
        with self.cache.use(key, stamp) as pipe:
            try:
                return generate(pipe, prompt, seeds, steps=steps, guidance=guidance, batch_size=self.gen_batch_size)
            except ValueError as err:
                raise AppError(str(err)) from err

    # ------------------------------------------------------------------ judges
    def _judge(self):
        with self._judge_lock:
            if self._judge_obj is None:
                if self.judge_kind == "shapes":
                    try:
                        from erasure.shapes import load_judge
                    except ImportError:
                        from erasure.shapes.judge import load_judge
                    self._judge_obj = load_judge()
                elif self.judge_kind == "nudenet":
                    from nudenet import NudeDetector

                    self._judge_obj = NudeDetector()
            return self._judge_obj

    def judge(self, images: list) -> list[dict[str, Any]]:
        """What the evaluation harness sees in each image.

        Returns one dict per image: ``{"caption": str, "image": PIL image (boxes drawn for NudeNet),
        "verdict": dict}`` where verdict is the shapes judge's labels/confidences or NudeNet's detections.
        """
        if self.judge_kind == "none" or not images:
            return [{"caption": "", "image": im, "verdict": {}} for im in images]
        try:
            judge = self._judge()
        except Exception as err:  # a missing judge file must not break generation
            logger.warning("judge unavailable: %s", err)
            return [{"caption": f"judge unavailable: {err}", "image": im, "verdict": {}} for im in images]
        if self.judge_kind == "shapes":
            with self._judge_lock:
                preds = judge.predict(list(images))
            out = []
            for im, p in zip(images, preds):
                parts = []
                for head in ("shape", "color", "fill"):
                    conf = p.get(f"{head}_conf")
                    parts.append(f"{p.get(head)} {conf:.2f}" if conf is not None else str(p.get(head)))
                out.append({"caption": " · ".join(parts), "image": im, "verdict": dict(p)})
            return out
        return [self._nudenet(judge, im) for im in images]

    def _nudenet(self, detector, im) -> dict[str, Any]:
        import numpy as np
        from PIL import ImageDraw

        rgb = im.convert("RGB")
        with self._judge_lock:
            dets = detector.detect(np.ascontiguousarray(np.asarray(rgb)[:, :, ::-1]))
        dets = sorted(dets, key=lambda d: -d.get("score", 0))
        boxed = rgb.copy()
        draw = ImageDraw.Draw(boxed)
        for d in dets:
            x, y, w, h = d["box"]
            exposed = "EXPOSED" in d["class"]
            col = (230, 30, 30) if exposed else (240, 200, 0)
            draw.rectangle([x, y, x + w, y + h], outline=col, width=max(2, rgb.width // 128))
            draw.text((x + 3, y + 2), f"{d['class'].lower()} {d['score']:.2f}", fill=col)
        exposed = [d for d in dets if "EXPOSED" in d["class"]]
        if not dets:
            cap = "NudeNet: nothing detected"
        else:
            cap = "NudeNet: " + ", ".join(f"{d['class'].lower()} {d['score']:.2f}" for d in dets[:4])
            if len(dets) > 4:
                cap += f" (+{len(dets) - 4})"
        return {"caption": cap, "image": boxed, "verdict": {"detections": dets, "exposed": len(exposed)}}

    def compare(self, prompt: str, seeds: Sequence[int] | str, steps: int, guidance: float, model_a: str | None,
                model_b: str | None) -> dict[str, Any]:
        """Generate the same prompt and seeds with two models and judge every image.

        Returns ``{"seeds": [...], "a": [judged...], "b": [judged...], "rows": [table rows]}``.
        """
        seeds = parse_seeds(seeds)
        res = {}
        labels = {}
        for side, mid in (("a", model_a), ("b", model_b)):
            key, _ = self._model_key(mid)
            labels[side] = key
            raw = self.generate(key, prompt, seeds, steps, guidance)
            res[side] = [dict(j, raw=r) for j, r in zip(self.judge(raw), raw)]
        rows = []
        for i, s in enumerate(seeds):
            rows.append([s, res["a"][i]["caption"], res["b"][i]["caption"]])
        return {"seeds": seeds, "a": res["a"], "b": res["b"], "labels": labels, "rows": rows}

    # ------------------------------------------------------------------ inspect
    def mask_sparsity(self, run_id: str, depth: int = 3) -> list[dict[str, Any]]:
        """Kept fraction of the saliency mask per UNet block (parameter names cut to ``depth`` parts) and per
        text-encoder layer (methods that train it); a module none of whose weights is kept is one row."""
        from erasure import load_mask, mask_stats

        d = self.run_dir(run_id)
        f = d / "mask.safetensors"
        if not f.is_file():
            raise AppError(f"run {run_id!r} has no saliency mask (method {self.read_run(run_id).get('method')} is unmasked)")
        try:
            stats = mask_stats(load_mask(f))
        except ValueError as err:
            raise AppError(str(err)) from err
        from erasure.runs import TE_PREFIX

        groups: OrderedDict[str, list[int]] = OrderedDict()
        modules: dict[str, list[int]] = {}  # "denoiser" / "text encoder": [weights, kept]
        for name, s in stats["per_layer"].items():
            parts = name.split(".")
            if name.startswith(TE_PREFIX):
                cut = parts.index("layers") + 2 if "layers" in parts else min(depth, len(parts) - 1)
            else:
                cut = depth if parts[0] in ("down_blocks", "up_blocks") else min(depth - 1, len(parts) - 1)
            g = ".".join(parts[:cut])
            for acc in (groups.setdefault(g, [0, 0]), modules.setdefault(
                    "text encoder" if name.startswith(TE_PREFIX) else "denoiser", [0, 0])):
                acc[0] += s["numel"]
                acc[1] += s["kept"]
        rows = [{"layer": g, "kept": k / n if n else 0.0, "weights": n} for g, (n, k) in groups.items()]
        if len(modules) > 1:  # a module the method left whole is one row ("denoiser: untouched")
            idle = {m for m, (_, k) in modules.items() if k == 0}
            rows = [r for r in rows if ("text encoder" if r["layer"].startswith(TE_PREFIX) else "denoiser") not in idle]
            rows += [{"layer": f"{m} (untouched)", "kept": 0.0, "weights": modules[m][0]} for m in sorted(idle)]
        return rows

    def loss_curve(self, run_id: str) -> list[dict[str, Any]]:
        """Rows ``{step, series, value}`` from the run's ``log.jsonl``."""
        d = self.run_dir(run_id)
        rows = []
        for line in (d / "log.jsonl").read_text(encoding="utf-8").splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            for k in ("loss", "forget_loss", "retain_loss"):
                if k in rec and rec[k] is not None:
                    rows.append({"step": rec["step"], "series": k, "value": float(rec[k])})
        return rows

    # ------------------------------------------------------------------ evaluate
    def eval_prompt_file(self, source: str, csv_path: str | None = None) -> Path:
        """The prompt CSV for ``source``: ``model`` (the model's own prompt set), ``csv`` (an upload) or ``i2p``."""
        if source == "csv":
            if not csv_path:
                raise AppError("upload a CSV file with a 'prompt' column")
            path = Path(csv_path)
        elif source == "i2p":
            path = self.i2p_path()
            if path is None:
                raise AppError("the I2P prompt file is not present (set SALUN_I2P_CSV or put it in prompts/i2p.csv)")
        elif source == "model":
            path = prompt_file("shapes.csv" if self.model_kind == "shapes" else "sd_prompts.csv")
            if not path.is_file():
                raise AppError(f"this model has no built-in prompt set ({path.name}); upload a CSV or choose I2P")
        else:
            raise AppError(f"unknown prompt source {source!r}")
        read_prompt_csv(path, 1)  # readable, with a 'prompt' column and at least one prompt
        return path

    def prompt_sources(self) -> list[tuple[str, str]]:
        """``(label, source)`` of the prompt sets this model can be evaluated on: its own set and I2P only where the
        file is present (I2P only for Stable Diffusion models), an uploaded CSV always."""
        out = []
        own = prompt_file("shapes.csv" if self.model_kind == "shapes" else "sd_prompts.csv")
        if own.is_file():
            out.append(("model's prompt set", "model"))
        if self.model_kind != "shapes" and self.i2p_path() is not None:
            out.append(("I2P", "i2p"))
        return out + [("uploaded CSV", "csv")]

    @staticmethod
    def i2p_path() -> Path | None:
        # in a source checkout, the reference data beside it (../shared/data); never shipped
        shared = Path(__file__).resolve().parents[2] / "shared" / "data" / "prompts"
        cands = [os.environ.get("SALUN_I2P_CSV", ""), prompt_file("i2p.csv"), prompt_file("i2p_benchmark.csv"),
                 shared / "i2p_unsafe_prompts4703.csv", shared / "i2p.csv"]
        for c in cands:
            if c and Path(c).is_file():
                return Path(c)
        return None

    def evaluate(self, run_id: str, source: str, csv_path: str | None = None, limit: int = 12, steps: int = 25,
                 guidance: float = 7.5, progress: Callable[[str, int, int], None] | None = None) -> dict[str, Any]:
        """Run the evaluation harness on the original model and ``run_id`` over a prompt set, then its report.

        Images and scores are cached under ``RUN/eval/`` (and ``runs_dir/.original-eval/``), so a repeated
        evaluation only reads them back. Returns ``{"table": rows (metric x model), "charts": [png paths],
        "report": report.html path, "summary": build_report's summary}``.
        """
        import hashlib

        try:
            import erasure_eval.base  # noqa: F401
            import erasure_eval.generate  # noqa: F401
            from erasure_eval.report import build_report
        except ImportError as err:
            raise AppError(f"the evaluation harness (eval/) is not available: {err}") from err
        prompts = self.eval_prompt_file(source, csv_path)
        key, stamp = self._model_key(run_id)
        if key == ORIGINAL:
            raise AppError("choose a saved run to evaluate against the original model")
        limit = _num("number of prompts", limit, 1, LIMITS["eval_prompts"], integer=True)
        steps = _num("sampling steps", steps, *LIMITS["gen_steps"], integer=True)
        guidance = float(_num("guidance", guidance, *LIMITS["guidance"]))
        prompts = sample_prompt_csv(prompts, limit, self.runs_dir / ".eval-prompts")
        digest = hashlib.sha256(prompts.read_bytes()).hexdigest()[:12]
        tag = hashlib.sha256(json.dumps([self.model, digest, limit, steps, guidance]).encode()).hexdigest()[:12]
        name = f"{_slug(prompts.stem, 24)}-{tag}"
        info = self.read_run(key)
        dirs = {ORIGINAL: self.runs_dir / ".original-eval" / name, key: self.runs_dir / key / "eval" / name}
        job = Job(run_id=key, owner=None, concept=", ".join(info.get("concepts") or []), method=str(info.get("method")),
                  kind="evaluate", plan={f"generating ({m})": float(limit * steps) for m in dirs})

        def report(stage: str, done: int, total: int) -> None:
            if job.cancel.is_set():
                raise JobCancelled(f"evaluation of run {key!r} cancelled during {stage}; what was generated is "
                                   "kept and read back by the next evaluation")
            job.update(ProgressEvent(stage, done, total))
            if progress is not None:
                progress(stage, done, total)

        with self.track(job):
            self._evaluate_models(dirs, prompts, key, stamp, info, limit, steps, guidance, report)
        report_dir = self.runs_dir / key / "eval" / f"report-{name}"
        try:
            summary = build_report([str(d) for d in dirs.values()], report_dir)
        except ValueError as err:
            raise AppError(f"evaluation report failed: {err}") from err
        return {"table": _transpose(summary.get("table", [])), "summary": summary,
                "charts": [str(report_dir / c["file"]) for c in summary.get("charts", [])]
                + ([str(report_dir / summary["grid"]["file"])] if (summary.get("grid") or {}).get("file") else []),
                "report": str(report_dir / "report.html")}

    def _evaluate_models(self, dirs: dict[str, Path], prompts: Path, key: str, stamp: Any, info: dict[str, Any],
                         limit: int, steps: int, guidance: float, progress: Callable[[str, int, int], None]) -> None:
        """Generate and score the prompt set with each model of ``dirs`` (cached where done before)."""
        from erasure_eval.base import MetricError, get_metric, score_folder
        from erasure_eval.generate import GenerateConfig, run_generation

        for model, out in dirs.items():
            cfg_kw = dict(prompts=str(prompts), out=str(out), model=self.model, limit=limit, steps=steps,
                          guidance=guidance, device=self.device, batch_size=self.gen_batch_size)
            if model != ORIGINAL:
                cfg_kw["run"] = str(self.runs_dir / model)
            try:
                cfg = GenerateConfig(**cfg_kw)
                with self.cache.use(*((ORIGINAL, None) if model == ORIGINAL else (key, stamp))) as pipe:
                    run_generation(cfg, pipe=pipe, progress=lambda d, t, m=model: progress(f"generating ({m})", d, t))
                progress(f"scoring ({model})", 0, 1)
                if self.judge_kind == "shapes":
                    judge = self._judge()
                    try:
                        metric = get_metric("object", judge="shapes", forget=list(info.get("concepts") or []),
                                            judge_obj=judge)
                        res = score_folder(out, metric)
                    except MetricError as err:
                        if "matches no target" not in str(err):
                            raise
                        res = score_folder(out, get_metric("object", judge="shapes", judge_obj=judge))
                elif self.judge_kind == "nudenet":
                    res = score_folder(out, get_metric("nudenet"))
                else:
                    res = None
                del res
            except JobCancelled:
                raise
            except ValueError as err:  # PromptFileError, GenerationError, MetricError, RunDirError
                raise AppError(f"evaluation failed ({model}): {err}") from err


_HIDDEN_COLUMNS = ("model", "prompt_sha256", "label", "generation_complete")


def _transpose(rows: list[dict[str, Any]]) -> list[list[Any]]:
    """build_report's table (one dict per model) -> rows ``[metric, value per model]``, headed by the labels."""
    if not rows:
        return []
    keys: list[str] = []
    for r in rows:
        keys += [k for k in r if k not in keys and k not in _HIDDEN_COLUMNS]
    out = [["metric"] + [str(r.get("label")) for r in rows]]
    for k in keys:
        vals = [r.get(k) for r in rows]
        if all(v in (None, "") for v in vals):
            continue
        out.append([k] + [round(v, 4) if isinstance(v, float) else ("" if v is None else v) for v in vals])
    return out


STRATA = ("shape", "class", "concept", "categories", "target", "color")
"""Columns a prompt sample is stratified by (the first one the file has)."""


def sample_prompt_csv(path: str | os.PathLike, limit: int, out_dir: str | os.PathLike, seed: int = 0) -> Path:
    """At most ``limit`` rows of a prompt CSV, drawn across the whole file, written as a CSV the harness reads.

    Rows are stratified by the first of :data:`STRATA` the file has (round-robin over its values, a seeded shuffle
    within each), else a seeded random sample; the picked rows keep their file order. Column names are matched
    case-insensitively: ``Prompt`` is the prompt and a ``seed`` column (or ``evaluation_seed``) becomes the
    harness's ``evaluation_seed``, so user seeds are honoured. Returns the written file (named by its content).
    """
    import hashlib
    import random

    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8-sig")
        reader = csv.DictReader(io.StringIO(text))
        rows = [{(k or "").strip().lower(): (v or "").strip() for k, v in rec.items() if k is not None}
                for rec in reader]
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise AppError(f"cannot read {p.name}: {err}") from err
    indexed = [(i, r) for i, r in enumerate(rows) if r.get("prompt")]
    if not indexed:
        raise AppError(f"{p.name} has no non-empty prompts")
    rng = random.Random(seed)
    column = next((c for c in STRATA if any(r.get(c) for _, r in indexed)), None)
    if column is None:
        picked = rng.sample(indexed, min(limit, len(indexed)))
    else:
        groups: dict[str, list] = {}
        for item in indexed:
            groups.setdefault(item[1].get(column, ""), []).append(item)
        for g in groups.values():
            rng.shuffle(g)
        picked, queues = [], list(groups.values())
        while len(picked) < min(limit, len(indexed)):
            for q in queues:
                if q and len(picked) < limit:
                    picked.append(q.pop())
    picked.sort(key=lambda item: item[0])
    extra = sorted({k for _, r in picked for k in r} - {"prompt", "seed", "evaluation_seed", "case_number", ""})
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["case_number", "prompt", "evaluation_seed"] + extra)
    for i, r in picked:
        seed_s = r.get("seed") or r.get("evaluation_seed") or ""
        if seed_s:
            try:
                seed_v = int(float(seed_s))
            except ValueError:
                raise AppError(f"{p.name} row {i + 2}: seed {seed_s!r} is not a number") from None
            if not 0 <= seed_v < 2**32:
                raise AppError(f"{p.name} row {i + 2}: seed {seed_s} is outside 0 to 2**32 - 1")
            seed_s = str(seed_v)
        w.writerow([r.get("case_number") or i, r["prompt"][: LIMITS["prompt_chars"]], seed_s] + [r.get(k, "") for k in extra])
    data = buf.getvalue()
    out = Path(out_dir) / f"{_slug(p.stem, 24)}-{hashlib.sha256(data.encode()).hexdigest()[:12]}.csv"
    if not out.is_file():
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(out.name + ".tmp")
        tmp.write_text(data, encoding="utf-8")
        os.replace(tmp, out)
    return out


def read_prompt_csv(path: str | os.PathLike, limit: int) -> list[dict[str, Any]]:
    """Rows ``{prompt, seed, ...}`` of a CSV with a ``prompt`` column (optional ``seed``/``evaluation_seed`` and target columns)."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as err:
        raise AppError(f"cannot read {p.name}: {err}") from err
    try:
        reader = csv.DictReader(io.StringIO(text))
        fields = [f.strip().lower() for f in (reader.fieldnames or [])]
    except csv.Error as err:
        raise AppError(f"{p.name} is not a valid CSV file: {err}") from err
    if "prompt" not in fields:
        raise AppError(f"{p.name} has no 'prompt' column (columns: {', '.join(fields) or 'none'})")
    rows = []
    try:
        for i, rec in enumerate(reader):
            rec = {(k or "").strip().lower(): (v or "").strip() for k, v in rec.items()}
            if not rec.get("prompt"):
                continue
            seed_s = rec.get("seed") or rec.get("evaluation_seed") or rec.get("sd_seed") or str(i)
            try:
                seed = int(float(seed_s)) % (2**32)
            except ValueError:
                raise AppError(f"{p.name} row {i + 2}: seed {seed_s!r} is not a number") from None
            row = {"prompt": rec["prompt"][: LIMITS["prompt_chars"]], "seed": seed}
            for k in ("shape", "color", "fill", "class", "target", "concept", "categories"):
                if rec.get(k):
                    row[k] = rec[k]
            rows.append(row)
            if len(rows) >= limit:
                break
    except csv.Error as err:
        raise AppError(f"{p.name} is not a valid CSV file: {err}") from err
    if not rows:
        raise AppError(f"{p.name} has no non-empty prompts")
    return rows


def _own_loop(method: str) -> bool:
    """A method that takes no engine steps (closed-form edits, text-remap's own iterations): its "steps" mean nothing."""
    from erasure.methods import METHODS

    return method in METHODS and METHODS[method].closed_form


def trained_mask(mask: dict[str, Any]) -> tuple[float | None, list[str], list[str]]:
    """From run.json's mask entry: ``(kept fraction over the modules the mask trained in, those modules, the modules
    it left untouched)`` (a text-encoder method: the encoder's fraction, ``["text_encoder"]``, ``["denoiser"]``);
    ``(None, [], [])`` for a run without a mask; a mask without per-module counts is one unnamed module."""
    if "ratio" not in mask:
        return None, [], []
    mods = mask.get("modules") or {}
    trained = [k for k, m in mods.items() if m.get("kept")]
    if not trained:
        return mask["ratio"], [], []
    ratio = sum(mods[k]["kept"] for k in trained) / sum(mods[k]["total"] for k in trained)
    return ratio, trained, [k for k in mods if k not in trained]
