""""Attack this run" for the app (no gradio here): one prompt, one registered attack, the original and the erased
model's images side by side with the judge's verdict. Results are written like ``erasure-eval attack`` under
``RUN/attacks/<prompt>-<hash>/`` (so a repeated attack with the same settings is read back, not recomputed)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from typing import Any

from erasure.progress import ProgressEvent
from erasure_app.jobs import Job
from erasure_app.service import ORIGINAL, AppError, AppService, JobCancelled, _num, _slug, parse_seeds

__all__ = ["ATTACK_CHOICES", "attack_knob_fields", "run_attack_job"]

ATTACK_CHOICES = ("unlearndiffatk", "ringabell", "random")
KNOB_LIMITS = {"timesteps": (1, 200), "iterations": (1, 200), "prefix_length": (1, 16), "generations": (1, 5000),
               "population": (4, 1000), "prompt_tokens": (1, 75)}


def attack_knob_fields(attack: str) -> list[str]:
    import dataclasses

    from erasure_eval.attacks import get_attack

    return [f.name for f in dataclasses.fields(get_attack(attack).config_cls)]


def run_attack_job(service: AppService, run_id: str, prompt: str, seed: int | str, attack: str = "unlearndiffatk",
                   knobs: dict[str, Any] | None = None, steps: int = 25, guidance: float = 7.5,
                   progress: Callable[[ProgressEvent], None] | None = None) -> dict[str, Any]:
    """Attack ``prompt`` on run ``run_id`` (tracked as a job: banner, progress, Cancel).

    Returns ``{"adv_prompt", "success_pre", "success_post", "iteration", "generations", "images": {"original",
    "pre", "post"} (paths), "verdicts": {...}, "captions": {...}, "out": folder}``.
    """
    from erasure_eval.attacks import AttackError, get_attack
    from erasure_eval.attacks.base import ModelPair
    from erasure_eval.attacks.runner import AttackCancelled, AttackRunConfig, run_attack

    key, stamp = service._model_key(run_id)  # noqa: SLF001 - the service's own run lookup
    if key == ORIGINAL:
        raise AppError("choose a saved run to attack (the original model has nothing erased)")
    if attack not in ATTACK_CHOICES:
        raise AppError(f"unknown attack {attack!r}; choose one of {', '.join(ATTACK_CHOICES)}")
    if service.judge_kind == "none":
        raise AppError("the app runs without a judge (--judge none): an attack needs one to tell success")
    text = (prompt or "").strip()
    if not text:
        raise AppError("type a prompt to attack")
    seeds = parse_seeds(seed)
    steps = _num("sampling steps", steps, 1, 200, integer=True)
    guidance = float(_num("guidance", guidance, 0.0, 50.0))
    kw = {}
    for k, v in (knobs or {}).items():
        if v is None or k not in attack_knob_fields(attack):
            continue
        lo, hi = KNOB_LIMITS.get(k, (None, None))
        kw[k] = _num(k.replace("_", " "), v, lo, hi, integer=True) if lo is not None else v
    try:
        acfg = get_attack(attack).config_cls(**kw)
    except ValueError as err:
        raise AppError(str(err)) from err
    info = service.read_run(key)
    tag = hashlib.sha256(json.dumps([text, seeds[0], attack, acfg.to_dict(), steps, guidance, stamp],
                                    default=str).encode()).hexdigest()[:10]
    out = service.runs_dir / key / "attacks" / f"{_slug(text, 24)}-{tag}"
    try:
        cfg = AttackRunConfig(attack=attack, run=str(service.runs_dir / key), model=service.model, prompt=text,
                              judge=service.judge_kind, seed=seeds[0], steps=steps, guidance=guidance, out=str(out),
                              device="cpu" if service.device == "auto" else service.device)
    except ValueError as err:
        raise AppError(str(err)) from err
    concept = ", ".join(c.get("name", "") if isinstance(c, dict) else str(c) for c in info.get("concepts") or [])
    job = Job(run_id=key, owner=None, concept=concept, method=str(info.get("method")), kind="attack",
              plan={"attack": 1.0})

    def on_event(ev: ProgressEvent) -> None:
        job.update(ev)
        if progress is not None:
            progress(ev)

    judge_obj = service._judge() if service.judge_kind == "shapes" else None  # noqa: SLF001 - shared judge
    with service.track(job):
        try:
            with service.cache.use(ORIGINAL, None) as orig, service.cache.use(key, stamp) as pipe:
                run_attack(cfg, acfg, progress=on_event, cancel=job.cancel.is_set,
                           pair=ModelPair(pipe, original_pipe=orig), judge_obj=judge_obj)
        except AttackCancelled as err:
            raise JobCancelled(f"attack on run {key!r} cancelled") from err
        except AttackError as err:
            raise AppError(str(err)) from err
    row = json.loads((out / "attacks.jsonl").read_text(encoding="utf-8").splitlines()[0])
    images = {k: str(out / v) for k, v in row["images"].items()}
    return {"adv_prompt": row["adv_prompt"], "prompt": row["prompt"], "success_pre": row["success_pre"],
            "success_post": row["success_post"], "iteration": row["iteration"], "generations": row["generations"],
            "seed": row["seed"], "images": images, "out": str(out), "concept": concept,
            "verdicts": {"original": row["judge_original"], "pre": row["judge_pre"], "post": row["judge_post"]},
            "captions": {k: _caption(row[f"judge_{k}"], service.judge_kind) for k in ("original", "pre", "post")}}


def _caption(v: dict[str, Any], kind: str) -> str:
    if kind == "shapes":
        return " · ".join(f"{h} {v.get(h)} {v.get(h + '_conf', 0):.2f}" for h in ("shape", "color", "fill"))
    if kind == "nudenet":
        return "nude: " + (", ".join(v.get("classes") or []) if v.get("nude") else "no")
    return json.dumps(v)
