"""``erasure-eval generate`` for class-conditional DDPMs (``erasure.ddpm``): the CSV names a class per row.

The prompt CSV needs a ``class`` column (a class name of the model; no ``prompt`` column is needed) and may have
``evaluation_seed``, ``evaluation_guidance`` and ``case_number``. The output folder has the same layout as
prompt generation (images/, manifest.jsonl/.csv, generation.json; resumable), each record's ``prompt`` is the
class name and its ``extra`` carries ``class`` (and ``shape`` for a shapes model, so the shapes judge's
``object_acc`` and ``judge_fd`` metrics score it). ``--steps``/``--guidance`` left at their defaults mean the
model's own sampler settings (``model_index.json``).
"""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from erasure.io import (
    atomic_write_json,
    check_output_path,
    clean_stale_temps,
    environment_info,
    file_sha256,
    read_json,
)

logger = logging.getLogger(__name__)

__all__ = ["is_class_generation", "load_class_rows", "run_class_generation"]


def is_class_generation(cfg) -> bool:
    """True when ``cfg.run`` is a class-forgetting run or ``cfg.model`` a class-conditional DDPM folder."""
    from erasure.ddpm.model import is_class_ddpm_folder
    from erasure.runs import DDPM_RUN_FORMAT

    if cfg.run:
        p = Path(cfg.run) / "run.json"
        try:
            return p.is_file() and json.loads(p.read_text()).get("format") == DDPM_RUN_FORMAT
        except (OSError, ValueError):
            return False
    return bool(cfg.model) and is_class_ddpm_folder(cfg.model)


def load_class_rows(path: str, class_names: list[str]):
    """Rows of a class CSV as :class:`erasure_eval.prompts.PromptRow` (prompt = class name)."""
    from erasure_eval.prompts import PromptFileError, PromptRow, PromptSet

    p = Path(path)
    if not p.is_file():
        raise PromptFileError(f"class CSV not found: {p}")
    with open(p, encoding="utf-8-sig", newline="") as fh:
        reader = csv.DictReader(fh)
        columns = [c.strip() for c in (reader.fieldnames or [])]
        raw = [{(k or "").strip(): (v or "").strip() for k, v in r.items() if k is not None} for r in reader]
    if "class" not in columns:
        raise PromptFileError(f"{p} has no 'class' column (a class-conditional model draws a class per row); "
                              f"columns: {', '.join(columns)}")
    rows, seen = [], set()
    for i, rec in enumerate(raw):
        name = rec["class"]
        if name not in class_names:
            raise PromptFileError(f"{p} line {i + 2}: unknown class {name!r}; the model's classes are {', '.join(class_names)}")
        case = rec.get("case_number") or str(i)
        if case in seen:
            raise PromptFileError(f"{p} line {i + 2}: case_number {case} repeats")
        seen.add(case)
        seed = rec.get("evaluation_seed")
        guid = rec.get("evaluation_guidance")
        extra = {k: v for k, v in rec.items() if k not in ("case_number", "evaluation_seed", "evaluation_guidance", "prompt")}
        if set(class_names) <= {"circle", "square", "triangle", "star", "heart", "cross"}:
            extra.setdefault("shape", name)
        rows.append(PromptRow(i, case, name, int(float(seed)) if seed else None, float(guid) if guid else None, [], extra))
    if not rows:
        raise PromptFileError(f"{p} has no rows")
    return PromptSet(str(p.resolve()), file_sha256(p), columns, rows)


def run_class_generation(cfg, progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """Generate the missing images of a class CSV with a class-conditional model or run (single process)."""
    from erasure.ddpm.erase import load_class_run, resolve_model_dir
    from erasure.ddpm.model import load_class_ddpm
    from erasure_eval.generate import (
        GenerateConfig,
        GenerationError,
        _fixed_batches,
        _has_images,
        _is_done,
        _locked,
        _save_png,
        _settings_id,
        merge_manifest,
        plan_items,
    )
    from erasure_eval.prompts import filter_rows

    out = Path(cfg.out)
    check_output_path(out, "--out", "folder")
    device = "cpu" if cfg.device == "auto" else cfg.device
    if cfg.run:
        model = load_class_run(cfg.run, device, base_model=cfg.model)
        info = model.extra["run"]
        ident = {"model": info["base_model"], "run_id": Path(cfg.run).resolve().name, "run_dir": info["run_dir"],
                 "method": info["method"], "fingerprint": file_sha256(Path(cfg.run) / "weights.safetensors")}
    else:
        base = resolve_model_dir(cfg.model)
        model = load_class_ddpm(base, device)
        ident = {"model": str(base), "run_id": "original", "run_dir": None, "method": None,
                 "fingerprint": file_sha256(base / "unet" / "diffusion_pytorch_model.safetensors")}
    defaults = {f.name: f.default for f in dataclasses.fields(GenerateConfig)}
    steps = model.num_inference_steps if cfg.steps == defaults["steps"] else cfg.steps
    guidance = model.guidance_scale if cfg.guidance == defaults["guidance"] else cfg.guidance
    pset = load_class_rows(cfg.prompts, model.class_names)
    rows = filter_rows(pset.rows, None, cfg.start, cfg.end, cfg.limit)
    size = model.image_size
    settings = {"model_fingerprint": ident["fingerprint"], "steps": steps, "default_guidance": guidance,
                "seed_base": cfg.seed, "height": size, "width": size, "prompt_sha256": pset.sha256,
                "batch_size": cfg.batch_size, "kind": "class-conditional"}
    sid = _settings_id(settings)
    images_dir = out / "images"
    gen_json = out / "generation.json"
    if gen_json.is_file() and read_json(gen_json).get("settings_id") != sid and _has_images(images_dir):
        raise GenerationError(f"{out} holds images made with other settings; use a new --out folder or delete the old one")
    items = plan_items(rows, cfg.samples, guidance, cfg.seed)
    header = {"format": "erasure-eval-generation-v1", "settings_id": sid, "settings": settings, "model": ident["model"],
              "run_id": ident["run_id"], "run_dir": ident["run_dir"], "method": ident["method"], "concepts": None,
              "prompts": {"path": pset.path, "sha256": pset.sha256, "name": Path(pset.path).stem, "columns": pset.columns,
                          "rows_in_file": len(pset.rows), "skipped_empty_prompt_cases": []},
              "filters": {"category": [], "start": cfg.start, "end": cfg.end, "limit": cfg.limit},
              "samples": cfg.samples, "steps": steps, "height": size, "width": size, "default_guidance": guidance,
              "negative_prompt": None, "seeds": "evaluation_seed + sample (rows without one: seed_base + row index + sample)",
              "environment": environment_info()}
    images_dir.mkdir(parents=True, exist_ok=True)
    with _locked(out / ".lock"):
        if not gen_json.is_file() or not _has_images(images_dir):
            atomic_write_json(gen_json, dict(header, status={"planned": len(items), "written": 0, "complete": False}))
    clean_stale_temps(images_dir)
    done_flags = {it.file: _is_done(images_dir, it, sid) for it in items}
    skipped = sum(done_flags.values())
    t0 = time.perf_counter()
    done = 0
    for batch in _fixed_batches(items, cfg.batch_size):
        if all(done_flags[it.file] for it in batch):
            continue
        imgs = model.sample([it.prompt for it in batch], [it.seed for it in batch], batch[0].guidance, steps,
                            batch_size=cfg.batch_size)
        for it, im in zip(batch, imgs):
            if not done_flags[it.file]:
                _save_png(im, images_dir / it.file, {"settings_id": sid, "key": it.key(), "run_id": ident["run_id"]})
                done += 1
        if progress is not None:
            progress(skipped + done, len(items))
    manifest = merge_manifest(out, items, header)
    return {"planned": len(items), "shard_planned": len(items), "generated": done, "skipped": skipped,
            "seconds": time.perf_counter() - t0, "manifest": manifest, "num_shards": 1, "shard_index": 0}
