"""``erasure bench``: erase one concept with several methods and training seeds, evaluate every model under one
evaluation protocol, and write a leaderboard.

Layout of the output folder ``DIR`` (every unit is resumable; a killed bench redoes only the unit in flight)::

    DIR/bench.json                      the bench settings and the protocol stamp (a rerun must match them)
    DIR/cache/                          Df/Dr images, shared: every method and seed trains on the same data
    DIR/runs/<method>-seed<k>/          one erasure run (``erasure.runs``); ``<method>-seed<k>.stats.json`` beside it
                                        (erase time, peak memory) marks the unit finished
    DIR/eval/<model>/                   one generation folder per model (``erasure-eval generate`` layout, resumable
                                        per fixed batch) and its ``result.json`` (forget / retain, protocol stamp)
    DIR/eval_prompts.csv                shapes protocol: the forget and retain rows, one image each
    DIR/leaderboard.{csv,md,json,html,svg}

Each training seed ``k`` sets ``EraseConfig.seed`` (timesteps, noise, batch order, mask sampling); Df/Dr come
from ``--data-seed`` for all of them. The original model is evaluated once.
"""

from __future__ import annotations

import csv
import gc
import io
import json
import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from erasure.io import atomic_write_json, atomic_write_text, read_json
from erasure.jsonconfig import JsonConfig, field
from erasure.progress import Progress, emit

logger = logging.getLogger(__name__)

__all__ = ["BenchConfig", "BenchError", "run_bench"]

FORMAT = "erasure-bench-v1"


class BenchError(ValueError):
    """Bad bench settings, or an output folder holding a bench with other settings."""


@dataclass
class BenchConfig(JsonConfig):
    """Settings of ``erasure bench``."""

    preset: str | None = field(None, help="Concept preset (e.g. shape_circle); or give --concept-file.")
    concept_file: str | None = field(None, help="A preset-format JSON file ({\"concept\": {...}, \"config\": {...}}).")
    methods: str = field("salun,rl,esd-x,esd-u", help="Comma-separated erasure methods.")
    protocol: str = field("shapes", help="Evaluation protocol (`erasure-eval protocols` lists them).")
    seeds: int = field(3, help="Training seeds per method (seed, seed+1, ...).", min=1, max=1000)
    seed: int = field(0, help="First training seed.", min=0)
    data_seed: int = field(0, help="Seed of the shared Df/Dr images.", min=0)
    out: str = field(None, help="Output folder (resumable: rerun the same command to continue).")
    model: str | None = field(None, help="Base model (default: the preset's; 'default' = the embedded shapes model).")
    prompts: str | None = field(None, help="The protocol's prompt file on this machine (SD protocols).")
    override: str = field("{}", help="JSON of EraseConfig overrides applied to every method (e.g. {\"steps\": 2}).")
    device: str = field("auto", help="auto, cpu, cuda or cuda:N.")
    report_only: bool = field(False, help="Only write the leaderboard from the units finished so far (runs nothing).")

    def __post_init__(self) -> None:
        self.check_fields()
        if (self.preset is None) == (self.concept_file is None):
            raise BenchError("give exactly one of --preset NAME or --concept-file FILE")
        if not self.out:
            raise BenchError("--out is required")
        if not self.method_list():
            raise BenchError("--methods is empty; e.g. --methods salun,rl,esd-x,esd-u")
        try:
            ov = json.loads(self.override)
        except json.JSONDecodeError as err:
            raise BenchError(f"--override is not JSON ({err}); e.g. --override '{{\"steps\": 2}}'") from None
        if not isinstance(ov, dict):
            raise BenchError("--override must be a JSON object, e.g. '{\"steps\": 2}'")

    def method_list(self) -> list[str]:
        return [m.strip() for m in self.methods.split(",") if m.strip()]

    def seed_list(self) -> list[int]:
        return list(range(self.seed, self.seed + self.seeds))


class _PeakMemory:
    """Peak memory of a block: CUDA peak allocation on a GPU, else the peak process RSS (sampled every 50 ms)."""

    def __init__(self, device: Any) -> None:
        self.cuda = str(device).startswith("cuda")
        self.peak = 0
        self._stop = threading.Event()

    def _rss(self) -> int:
        import psutil

        return psutil.Process().memory_info().rss

    def _watch(self) -> None:
        while not self._stop.wait(0.05):
            self.peak = max(self.peak, self._rss())

    def __enter__(self) -> _PeakMemory:
        if self.cuda:
            import torch

            torch.cuda.reset_peak_memory_stats()
        else:
            self.peak = self._rss()
            self._t = threading.Thread(target=self._watch, daemon=True)
            self._t.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.cuda:
            import torch

            self.peak = torch.cuda.max_memory_allocated()
        else:
            self._stop.set()
            self._t.join()
            self.peak = max(self.peak, self._rss())

    @property
    def mb(self) -> float:
        return round(self.peak / 2**20, 1)


def _resolve_device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


# ---------------------------------------------------------------------------------------------------- setup
def _load_concept(cfg: BenchConfig):
    from erasure.presets import load_preset

    src = cfg.preset or cfg.concept_file
    if cfg.concept_file and not Path(cfg.concept_file).is_file():
        raise BenchError(f"--concept-file not found: {cfg.concept_file}")
    try:
        return load_preset(src)
    except ValueError as err:
        raise BenchError(str(err)) from None


def _check_methods(methods: list[str]) -> None:
    from erasure.methods import METHODS

    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise BenchError(f"unknown method(s) {', '.join(unknown)}; registered: {', '.join(sorted(METHODS))}")


def _bench_header(cfg: BenchConfig, stamp: dict[str, Any]) -> dict[str, Any]:
    settings = {k: v for k, v in cfg.to_dict().items() if k not in ("out", "device", "seeds", "methods", "report_only")}
    return {"format": FORMAT, "settings": settings, "protocol": stamp}


def _claim_folder(cfg: BenchConfig, out: Path, stamp: dict[str, Any]) -> None:
    """Write DIR/bench.json, or check that the one there was made with the same settings (methods/seeds may grow)."""
    head = _bench_header(cfg, stamp)
    p = out / "bench.json"
    if p.is_file():
        prev = read_json(p)
        if prev.get("format") != FORMAT:
            raise BenchError(f"{out} is not a bench folder (bench.json format {prev.get('format')!r}); use a new --out")
        diff = [k for k in head["settings"] if prev.get("settings", {}).get(k) != head["settings"][k]]
        if prev.get("protocol", {}).get("hash") != stamp["hash"]:
            diff.append(f"protocol ({prev.get('protocol', {}).get('name')} {str(prev.get('protocol', {}).get('hash'))[:12]})")
        if diff:
            raise BenchError(f"{out} holds a bench made with other settings (differs in: {', '.join(diff)}); "
                             "use a new --out folder or delete the old one")
    elif out.exists() and any(out.iterdir()):
        raise BenchError(f"{out} exists and is not a bench folder; use a new --out folder")
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(p, dict(head, config=cfg.to_dict()))


# ---------------------------------------------------------------------------------------------------- erase units
def _erase_unit(cfg: BenchConfig, preset, method: str, seed: int, out: Path, device: str,
                progress: Progress | None) -> dict[str, Any]:
    from erasure.diffusion.train import erase
    from erasure.presets import config_from_preset

    run_dir = out / "runs" / f"{method}-seed{seed}"
    stats_p = out / "runs" / f"{method}-seed{seed}.stats.json"
    if stats_p.is_file() and (run_dir / "run.json").is_file():
        return read_json(stats_p)
    overrides = dict(json.loads(cfg.override))
    if cfg.model:
        overrides["model"] = cfg.model
    ecfg = config_from_preset(cfg.preset or cfg.concept_file, method=method, seed=seed, data_seed=cfg.data_seed,
                              cache_dir=str(out / "cache"), device=cfg.device, **overrides)
    ecfg = _with_model_method_args(ecfg, {**preset.config, **overrides})
    logger.info("erase %s seed %d -> %s", method, seed, run_dir)
    t0 = time.perf_counter()
    with _PeakMemory(device) as mem:
        # a run left half-done by a killed bench is redone whole: the unit in flight starts over
        erase(ecfg, run_dir, overwrite=True, progress=progress)
    gc.collect()
    info = read_json(run_dir / "run.json")
    stats = {"method": method, "seed": seed, "erase_s": round(time.perf_counter() - t0, 2),
             "timing_s": info.get("timing_s"), "peak_mem_mb": mem.mb,
             "peak_mem_kind": "cuda max_memory_allocated" if mem.cuda else "process RSS (sampled)",
             "changed_params": info.get("changed_params"), "unet_params": info.get("unet_params"),
             "load_avg": list(os.getloadavg()) if hasattr(os, "getloadavg") else None}
    atomic_write_json(stats_p, stats)
    return stats


def _with_model_method_args(ecfg, explicit: dict[str, Any]):
    """The method's settings the model's ``erasure_defaults.json`` gives (text-remap's learning rate on the embedded
    model) under what the preset and ``--override`` set: a method other than the preset's would otherwise start from
    its built-in settings, made for SD (as the app's method choice and ``erasure erase`` do)."""
    import dataclasses

    from erasure.auto.defaults import model_method_args
    from erasure.config import EraseConfig
    from erasure.methods import LEGACY_KEYS

    given = {LEGACY_KEYS.get(k, k) for k in explicit} | set(explicit.get("method_args") or {})
    fields = {f.name for f in dataclasses.fields(ecfg.method_args)}
    try:
        model_args = {k: v for k, v in model_method_args(ecfg.model).items() if k in fields and k not in given}
    except ValueError as err:
        raise BenchError(str(err)) from None
    if not model_args:
        return ecfg
    return EraseConfig.from_dict({**ecfg.to_dict(), "method_args": {**ecfg.method_args.to_dict(), **model_args}})


# ---------------------------------------------------------------------------------------------------- eval units
def _shapes_prompt_csv(rp, preset, out: Path) -> Path:
    """DIR/eval_prompts.csv: forget rows (each forget prompt x ``samples`` seeds) and retain rows (each
    prompt-file row not naming the concept x ``retain_samples`` seeds), one image per row."""
    from erasure.shapes import all_captions, concept_kind

    concept = preset.concept.name
    try:
        kind = concept_kind(concept)
    except (KeyError, ValueError) as err:
        raise BenchError(f"the shapes protocol needs a shape, color or fill concept, got {concept!r} ({err})") from None
    only = all_captions(**{"shape": None, "color": None, "fill": None, kind: concept})
    forget = only + [p for p in preset.concept.forget_prompts[::3] if p not in only]
    p = rp.protocol
    rows: list[dict[str, Any]] = []
    for i, prompt in enumerate(forget):
        for s in range(p.samples):
            rows.append({"prompt": prompt, "evaluation_seed": p.seed + 10_000 * i + s, "role": "forget",
                         "shape": "", "color": "", "fill": "", kind: concept})
    with open(rp.prompts_path, encoding="utf-8-sig", newline="") as fh:
        src = [r for r in csv.DictReader(fh) if r.get(kind) != concept]
    src = src[: p.limit] if p.limit else src
    for r in src:
        for s in range(p.retain_samples):
            rows.append({"prompt": r["prompt"], "evaluation_seed": int(r["evaluation_seed"]) + s, "role": "retain",
                         "shape": r.get("shape", ""), "color": r.get("color", ""), "fill": r.get("fill", "")})
    cols = ["case_number", "prompt", "evaluation_seed", "role", "shape", "color", "fill"]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols, lineterminator="\n")
    w.writeheader()
    for n, r in enumerate(rows):
        w.writerow(dict(r, case_number=n))
    path = out / "eval_prompts.csv"
    atomic_write_text(path, buf.getvalue())
    return path


def _shapes_result(folder: Path, concept: str, kind: str) -> dict[str, Any]:
    from erasure_eval.base import get_metric, score_folder
    from erasure_eval.generate import read_manifest

    res = score_folder(folder, get_metric("object", judge="shapes", forget=[f"{kind}={concept}"]))
    _, _, recs = read_manifest(folder)
    preds = {r["file"]: r for r in res["records"]}
    forget = [preds[m["file"]] for m in recs if m["extra"].get("role") == "forget"]
    retain = [(m["extra"], preds[m["file"]]) for m in recs if m["extra"].get("role") == "retain"]
    acc = {}
    for k in ("shape", "color", "fill"):
        named = [(t, q) for t, q in retain if t.get(k)]
        acc[k] = 100.0 * sum(q.get(k) == t[k] for t, q in named) / len(named) if named else None
    others = [acc[k] for k in ("shape", "color", "fill") if k != kind and acc[k] is not None]
    return {
        "forget": 100.0 * sum(q.get(kind) == concept for q in forget) / len(forget),
        "retain": acc[kind],
        "retain_other": sum(others) / len(others) if others else None,
        "retain_acc": acc,
        "retain_sees_concept": 100.0 * sum(q.get(kind) == concept for _, q in retain) / max(1, len(retain)),
        "forget_images": len(forget), "retain_images": len(retain),
    }


def _sd_result(folder: Path, rp, concept: str) -> dict[str, Any]:
    from erasure_eval.base import get_metric, score_folder

    p = rp.protocol
    if p.metric == "nudenet":
        t = float(p.nudenet["threshold"])
        res = score_folder(folder, get_metric("nudenet", thresholds=[t], classes=p.nudenet["classes"]))
        th = res["summary"]["thresholds"]
        key = next(k for k in th if abs(float(k) - t) < 1e-9)
        return {"forget": 100.0 * th[key]["any_exposed"]["fraction"], "retain": None, "retain_other": None,
                "forget_images": res["coverage"]["images"]}
    judge = p.judge or {}
    res = score_folder(folder, get_metric("object", judge=judge.get("name", "resnet50"), forget=[concept],
                                          weights=judge.get("weights_path")))
    s = res["summary"]
    return {"forget": 100.0 * (s["forget"]["accuracy"] or 0.0), "retain": 100.0 * (s["retain"]["accuracy"] or 0.0),
            "retain_other": None, "forget_images": s["forget"]["images"], "retain_images": s["retain"]["images"]}


def _eval_unit(name: str, run_dir: Path | None, model: str | None, rp, preset, prompts_csv: Path, out: Path,
               device: str, progress: Progress | None) -> dict[str, Any]:
    from erasure_eval.generate import GenerateConfig, run_generation
    from erasure_eval.protocols import protocol_generate_settings

    folder = out / "eval" / name
    res_p = folder / "result.json"
    if res_p.is_file():
        prev = read_json(res_p)
        if prev.get("protocol", {}).get("hash") == rp.hash:
            return prev
    gen = protocol_generate_settings(rp)
    if rp.protocol.metric == "shapes_judge":  # one image per row of DIR/eval_prompts.csv
        gen.update(prompts=str(prompts_csv), samples=1, category=[], limit=None)
    gcfg = GenerateConfig.from_dict(dict(gen, out=str(folder), run=str(run_dir) if run_dir else None, model=model,
                                         device=device))
    logger.info("evaluate %s under %s -> %s", name, rp.label(), folder)
    t0 = time.perf_counter()
    run_generation(gcfg, progress=(lambda d, t: emit(progress, f"generate {name}", d, t)) if progress else None)
    concept = preset.concept.name
    if rp.protocol.metric == "shapes_judge":
        from erasure.shapes import concept_kind

        r = _shapes_result(folder, concept, concept_kind(concept))
    else:
        r = _sd_result(folder, rp, concept)
    r.update(model=name, protocol=rp.stamp(), eval_s=round(time.perf_counter() - t0, 2))
    gc.collect()
    atomic_write_json(res_p, r)
    return r


# ---------------------------------------------------------------------------------------------------- driver
def run_bench(cfg: BenchConfig, progress: Progress | None = None) -> dict[str, Any]:
    """Run (or resume) a bench and write the leaderboard; returns the leaderboard dict."""
    from erasure.leaderboard import write_leaderboard
    from erasure_eval.protocols import ProtocolError, resolve_protocol

    out = Path(cfg.out)
    methods = cfg.method_list()
    _check_methods(methods)
    preset = _load_concept(cfg)
    try:
        rp = resolve_protocol(cfg.protocol, prompts=cfg.prompts)
    except ProtocolError as err:
        raise BenchError(str(err)) from None
    model = cfg.model or ("default" if preset.model in ("shapes", "") else None)
    if rp.protocol.model == "shapes" and preset.model not in ("shapes", ""):
        raise BenchError(f"protocol {rp.name} is for the embedded shapes model; preset {preset.name} is for {preset.model}")
    if preset.model == "sd" and not cfg.model:
        raise BenchError(f"preset {preset.name} is for Stable Diffusion: pass --model SD_FOLDER (a diffusers folder or hub id)")
    if rp.protocol.model == "sd" and preset.model == "shapes" and not cfg.model:
        raise BenchError(f"protocol {rp.name} is for Stable Diffusion: pass --model SD_FOLDER (preset {preset.name} is a shapes preset)")
    if cfg.report_only:
        return _report_only(cfg, out, methods, rp, preset)
    _claim_folder(cfg, out, rp.stamp())
    device = _resolve_device(cfg.device)
    prompts_csv = _shapes_prompt_csv(rp, preset, out) if rp.protocol.metric == "shapes_judge" else rp.prompts_path
    units = [(m, s) for s in cfg.seed_list() for m in methods]  # seed-major: every method early on
    total = 2 * len(units) + 1
    done = 0
    stats: dict[tuple[str, int], dict[str, Any]] = {}
    results: dict[str, dict[str, Any]] = {}
    emit(progress, "bench", done, total)
    results["original"] = _eval_unit("original", None, model, rp, preset, prompts_csv, out, device, progress)
    done += 1
    emit(progress, "bench", done, total)
    for m, s in units:
        stats[(m, s)] = _erase_unit(cfg, preset, m, s, out, device, progress)
        done += 1
        emit(progress, "bench", done, total)
        name = f"{m}-seed{s}"
        results[name] = _eval_unit(name, out / "runs" / name, cfg.model, rp, preset, prompts_csv, out, device, progress)
        done += 1
        emit(progress, "bench", done, total)
        write_leaderboard(out, methods, cfg.seed_list(), rp.stamp(), preset, stats, results)
    return write_leaderboard(out, methods, cfg.seed_list(), rp.stamp(), preset, stats, results)


def _report_only(cfg: BenchConfig, out: Path, methods: list[str], rp, preset) -> dict[str, Any]:
    """The leaderboard of the units finished in ``out`` (nothing is run; a unit counts once its files exist)."""
    from erasure.leaderboard import write_leaderboard

    if not (out / "bench.json").is_file():
        raise BenchError(f"{out} holds no bench (no bench.json); run the bench first")
    if read_json(out / "bench.json").get("protocol", {}).get("hash") != rp.hash:
        raise BenchError(f"{out} was benched under another protocol than {rp.label()}")
    stats, results = {}, {}
    for m in methods:
        for s in cfg.seed_list():
            st, res = out / "runs" / f"{m}-seed{s}.stats.json", out / "eval" / f"{m}-seed{s}" / "result.json"
            if st.is_file() and res.is_file():
                stats[(m, s)], results[f"{m}-seed{s}"] = read_json(st), read_json(res)
    if (out / "eval" / "original" / "result.json").is_file():
        results["original"] = read_json(out / "eval" / "original" / "result.json")
    return write_leaderboard(out, methods, cfg.seed_list(), rp.stamp(), preset, stats, results)
