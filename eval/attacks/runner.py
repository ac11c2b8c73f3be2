"""``erasure-eval attack``: run a registered attack over a prompt set, resumable per prompt, shardable.

Layout of ``DIR``::

    DIR/attack.json        manifest: settings (attack + its config, judge, concept, threshold, steps, guidance,
                           seed, model/run identity, prompt-file hash), versions, status
    DIR/parts/attacks.<i>-of-<n>.jsonl   rows of shard i, appended one line (one prompt) at a time
    DIR/attacks.jsonl      all rows in prompt order (merged after every shard; ``prompt``, ``adv_prompt``,
                           ``success_pre``, ``success_post``, ``iteration``, ``generations``, ``seed``, images)
    DIR/summary.json       ``asr_pre`` / ``asr_post`` (percent), ``n_prompts``: written once every row is done
    DIR/images/<case>_{original,pre,post}.png

Per prompt: the original model's image (the attack's target, and a check that the concept is there to erase),
the attacked model's image from the plain prompt (``success_pre``), then the attack's candidates, each checked
with one generation from the row's seed until the judge sees the concept (``success_post``; a prompt that
already succeeds unattacked counts as a success after the attack too, as in the official code). A killed run
loses only the prompt in flight; a run with other settings in the same folder is refused.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from erasure.diffusion.pipeline import MAX_GUIDANCE, MAX_SEED
from erasure.io import (
    atomic_path,
    atomic_write_json,
    atomic_write_text,
    check_output_path,
    environment_info,
    read_json,
)
from erasure.jsonconfig import JsonConfig, field
from erasure.progress import Progress, emit
from erasure_eval.attacks.base import AttackError, ModelPair, PromptRow, get_attack, prompt_token_count

logger = logging.getLogger(__name__)

__all__ = ["AttackRunConfig", "AttackCancelled", "AttackContext", "run_attack", "load_rows", "FORMAT"]

FORMAT = "erasure-eval-attack-v1"


class AttackCancelled(RuntimeError):
    """The caller's cancel flag was set; finished prompts are kept."""


@dataclass
class AttackRunConfig(JsonConfig):
    """Settings of ``erasure-eval attack`` (the attack's own knobs live in its config class)."""

    attack: str = field("unlearndiffatk", help="Registered attack (see --help: unlearndiffatk, ringabell, random).")
    out: str = field(None, help="Output folder (attacks.jsonl, summary.json, attack.json, images/).")
    run: str | None = field(None, help="Run directory of an erased model (written by `erasure erase`).")
    model: str | None = field(None, help="A model to attack (diffusers folder; 'default' = the embedded shapes model). "
                                         "With --run: the run's base model.")
    prompts: str | None = field(None, help="Prompt CSV ('prompt' column; evaluation_seed per row).")
    prompt: str | None = field(None, help="One prompt to attack (instead of --prompts); its seed is --seed.")
    judge: str = field("shapes", help="Judge: shapes, nudenet or resnet50.")
    judge_weights: str | None = field(None, help="Judge weights (required for resnet50; shapes: default shipped).")
    forget: list[str] = field(default_factory=list, help="The concept as KIND=VALUE (shape=circle) or a class name; "
                                                          "default: the run's concept. Omit for nudenet.")
    seed: int = field(0, help="Seeds the attack's search; also the generation seed of --prompt and of CSV rows "
                              "without evaluation_seed (seed + row index).", min=0, max=MAX_SEED)
    steps: int = field(25, help="Denoising steps of every generated image.", min=1, max=1000)
    guidance: float = field(7.5, help="CFG scale for rows without evaluation_guidance.", min=0.0, max=MAX_GUIDANCE)
    limit: int | None = field(None, help="Attack only the first N prompt rows.", min=1)
    device: str = field("cpu", help="cpu, cuda or cuda:N.")
    num_shards: int | None = field(None, help="Split prompt rows over this many shards (row i goes to shard i mod n).", min=1)
    shard_index: int | None = field(None, help="Which shard this process runs (0-based).", min=0)

    def __post_init__(self) -> None:
        self.check_fields()
        if not self.out:
            raise ValueError("--out DIR is required")
        if not self.run and not self.model:
            raise ValueError("give --run RUN_DIR (an erased model) or --model PATH")
        if bool(self.prompts) == bool(self.prompt):
            raise ValueError("give exactly one of --prompts CSV and --prompt TEXT")
        if self.prompt is not None and not self.prompt.strip():
            raise ValueError("--prompt is empty: give the text to attack")
        if (self.num_shards is None) != (self.shard_index is None):
            raise ValueError("give --num-shards and --shard-index together")
        if self.num_shards is not None and not 0 <= self.shard_index < self.num_shards:  # type: ignore[operator]
            raise ValueError(f"--shard-index must be in [0, {self.num_shards}), got {self.shard_index}")
        if isinstance(self.forget, str):
            self.forget = [self.forget]


def load_rows(cfg: AttackRunConfig) -> tuple[list[PromptRow], dict[str, Any]]:
    """The prompt rows to attack and a description of the prompt source (for the manifest)."""
    if cfg.prompt is not None:
        return [PromptRow(0, "0", cfg.prompt.strip(), cfg.seed, cfg.guidance)], {"text": cfg.prompt.strip()}
    from erasure_eval.prompts import load_prompts

    ps = load_prompts(cfg.prompts)
    rows = [PromptRow(r.index, r.case_number, r.prompt, r.seed if r.seed is not None else cfg.seed + r.index,
                      float(r.guidance if r.guidance is not None else cfg.guidance)) for r in ps.rows]
    if cfg.limit:
        rows = rows[: cfg.limit]
    return rows, {"path": ps.path, "sha256": ps.sha256, "rows": len(rows)}


class AttackContext:
    """What an attack sees: the model pair, the judge, generation settings, progress and cancel."""

    def __init__(self, pair: ModelPair, verdict: Any, steps: int, progress: Progress | None = None,
                 cancel: Callable[[], bool] | None = None) -> None:
        self.pair, self.verdict, self.steps = pair, verdict, steps
        self.progress, self.cancel = progress, cancel
        self._orig: dict[int, Any] = {}
        self.units_done = 0
        self.units_total = 0
        self.row_base = 0
        self.row_units = 1
        self.stage = "attack"
        self._last_emit = 0.0

    def generate(self, prompt: str, row: PromptRow, original: bool = False):
        from erasure.diffusion.pipeline import generate

        self._check_cancel()
        cm = self.pair.original() if original else contextlib.nullcontext(self.pair.pipe)
        with cm as pipe:
            return generate(pipe, prompt, row.seed, steps=self.steps, guidance=row.guidance)[0]

    def original_image(self, row: PromptRow):
        if row.index not in self._orig:
            self._orig = {row.index: self.generate(row.prompt, row, original=True)}
        return self._orig[row.index]

    def _check_cancel(self) -> None:
        if self.cancel is not None and self.cancel():
            raise AttackCancelled("attack cancelled; finished prompts are kept (run again to resume)")

    def tick(self, units: int = 1, **info: Any) -> None:
        """One unit of search work (an optimisation step, a GA generation, a random try)."""
        self._check_cancel()
        self.units_done = min(self.row_base + self.row_units, self.units_done + units)
        now = time.monotonic()
        if now - self._last_emit > 0.2:
            self._last_emit = now
            emit(self.progress, self.stage, self.units_done, self.units_total, **info)


def _settings(cfg: AttackRunConfig, attack_cfg: JsonConfig, verdict: Any, ident: dict, prompts: dict) -> dict:
    return {"attack": cfg.attack, "attack_config": attack_cfg.to_dict(), "judge": verdict.manifest(),
            "model_fingerprint": ident["fingerprint"], "prompts": prompts, "seed": cfg.seed, "steps": cfg.steps,
            "default_guidance": cfg.guidance}


def _sid(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _read_rows(path: Path, repair: bool = False) -> list[dict]:
    """Rows of a part file; a torn last line (killed mid-write) is dropped (and cut from the file with ``repair``)."""
    if not path.is_file():
        return []
    good, bad = [], False
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            good.append(json.loads(line))
        except json.JSONDecodeError:
            bad = True
    if bad and repair:
        atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in good))
    return good


def _append_row(path: Path, row: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(row, ensure_ascii=False) + "\n")
        fh.flush()
        os.fsync(fh.fileno())


def _save_png(img, path: Path) -> None:
    with atomic_path(path, ".png") as tmp:
        img.save(tmp, format="PNG")


def merge(out: Path, planned: list[PromptRow], header: dict) -> dict:
    """Merge every shard's rows into ``attacks.jsonl`` (prompt order); write ``summary.json`` once all are done."""
    from erasure_eval.generate import _locked  # noqa: PLC2701 - same package

    with _locked(out / ".lock"):
        rows: dict[int, dict] = {}
        for part in sorted((out / "parts").glob("attacks.*.jsonl")):
            for r in _read_rows(part):
                rows.setdefault(int(r["row_index"]), r)
        order = [rows[r.index] for r in planned if r.index in rows]
        atomic_write_text(out / "attacks.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in order))
        n = len(order)
        complete = n == len(planned)
        summary = summarize(order, header)
        summary["complete"] = complete
        status = {"planned": len(planned), "done": n, "complete": complete}
        atomic_write_json(out / "attack.json", dict(header, status=status))
        if complete:
            atomic_write_json(out / "summary.json", summary)
    return summary


def summarize(rows: list[dict], header: dict | None = None) -> dict:
    n = len(rows)
    pre = sum(bool(r["success_pre"]) for r in rows)
    post = sum(bool(r["success_post"]) for r in rows)
    attacked = [r for r in rows if not r["success_pre"]]
    won = [r for r in attacked if r["success_post"]]
    out = {
        "format": FORMAT, "n_prompts": n,
        "asr_pre": round(100.0 * pre / n, 2) if n else 0.0,
        "asr_post": round(100.0 * post / n, 2) if n else 0.0,
        "successes_pre": pre, "successes_post": post,
        "original_sees_concept": round(100.0 * sum(bool(r.get("original_seen")) for r in rows) / n, 2) if n else 0.0,
        "generations": sum(int(r.get("generations", 0)) for r in rows),
        "mean_iteration_of_success": (sum(r["iteration"] for r in won) / len(won)) if won else None,
        "seconds": round(sum(float(r.get("seconds", 0)) for r in rows), 1),
    }
    if header:
        s = header["settings"]
        out.update(attack=s["attack"], attack_config=s["attack_config"], judge=s["judge"]["judge"],
                   concept=s["judge"]["concept"], model=header.get("model"), run_id=header.get("run_id"))
    return out


def _attack_row(ctx: AttackContext, attack: Any, row: PromptRow, seed: int, images: Path) -> dict:
    t0 = time.perf_counter()
    rng = torch.Generator().manual_seed((seed * 1_000_003 + row.index) % MAX_SEED)
    orig = ctx.original_image(row)
    pre = ctx.generate(row.prompt, row)
    (seen_orig, rec_orig), (seen_pre, rec_pre) = ctx.verdict.check([orig, pre])
    adv, post, seen_post, rec_post, it, gens = row.prompt, pre, seen_pre, rec_pre, 0, 0
    if not seen_pre:
        for step, cand in attack.candidates(ctx, row, rng):
            gens, it = gens + 1, step
            img = ctx.generate(cand, row)
            (seen, rec), = ctx.verdict.check([img])
            adv, post, seen_post, rec_post = cand, img, seen, rec
            if seen:
                break
    stem = row.case
    for name, img in (("original", orig), ("pre", pre), ("post", post)):
        _save_png(img, images / f"{stem}_{name}.png")
    return {
        "row_index": row.index, "case": row.case, "prompt": row.prompt, "adv_prompt": adv,
        "success_pre": bool(seen_pre), "success_post": bool(seen_post), "iteration": int(it) if seen_post else None,
        "generations": gens, "seed": row.seed, "guidance": row.guidance, "original_seen": bool(seen_orig),
        "judge_original": rec_orig, "judge_pre": rec_pre, "judge_post": rec_post,
        "images": {k: f"images/{stem}_{k}.png" for k in ("original", "pre", "post")},
        "seconds": round(time.perf_counter() - t0, 2),
    }


def _load_pair(cfg: AttackRunConfig) -> ModelPair:
    from erasure.diffusion.pipeline import ModelLoadError, load_pipeline

    if cfg.run:
        return ModelPair.from_run(cfg.run, device=cfg.device, base_model=cfg.model)
    try:
        return ModelPair(load_pipeline(cfg.model, device=cfg.device))
    except ModelLoadError:
        raise
    except Exception as err:  # noqa: BLE001 - any loader failure is a model error
        raise ModelLoadError(f"cannot load model {cfg.model!r}: {err}") from err


def run_attack(cfg: AttackRunConfig, attack_cfg: JsonConfig | None = None, progress: Progress | None = None,
               cancel: Callable[[], bool] | None = None, pair: ModelPair | None = None,
               judge_obj: Any = None) -> dict:
    """Attack every (this shard's) prompt not done yet; returns the summary of all rows present.

    Args:
        cfg (`AttackRunConfig`): what to attack, the judge, the output folder.
        attack_cfg (`JsonConfig`, *optional*): the attack's config (defaults to its paper defaults).
        progress (*optional*): receives :class:`erasure.progress.ProgressEvent` (stage ``attack``).
        cancel (*optional*): returns True to stop between two search steps (raises :class:`AttackCancelled`).
        pair (`ModelPair`, *optional*): an already loaded model pair (the app's cache); else loaded from cfg.
    """
    from erasure_eval.attacks.judges import forget_from_run, make_verdict
    from erasure_eval.generate import _model_identity  # noqa: PLC2701 - same package

    attack_cls = get_attack(cfg.attack)
    attack_cfg = attack_cfg if attack_cfg is not None else attack_cls.config_cls()
    if not isinstance(attack_cfg, attack_cls.config_cls):
        raise AttackError(f"attack {cfg.attack!r} takes a {attack_cls.config_cls.__name__}")
    attack = attack_cls(attack_cfg)
    out = Path(cfg.out)
    check_output_path(out, "--out", "folder")
    rows, prompt_info = load_rows(cfg)
    forget = list(cfg.forget)
    if cfg.run:
        from erasure import read_run

        info = read_run(cfg.run)
        if not forget:
            forget = forget_from_run(info, cfg.judge)
    verdict = make_verdict(cfg.judge, forget, cfg.judge_weights, cfg.device, judge_obj=judge_obj)
    ident = _model_identity(SimpleNamespace(run=cfg.run, model=cfg.model))
    pair = pair or _load_pair(cfg)
    tok = pair.pipe.tokenizer
    k = attack.prefix_length()
    for r in rows:
        n = prompt_token_count(tok, r.prompt)
        if n + k + 2 > tok.model_max_length:
            raise AttackError(f"prompt {r.case} ({r.prompt[:40]!r}...) is {n} tokens: with the {k}-token prefix it "
                              f"exceeds the {tok.model_max_length}-token limit; shorten it or lower --prefix-length")
    settings = _settings(cfg, attack_cfg, verdict, ident, prompt_info)
    sid = _sid(settings)
    if (out / "attack.json").is_file():
        prev = read_json(out / "attack.json")
        if prev.get("settings_id") != sid and any((out / "parts").glob("attacks.*.jsonl")):
            diff = [k for k in settings if prev.get("settings", {}).get(k) != settings[k]]
            raise AttackError(f"{out} holds an attack with other settings (differs in: {', '.join(diff) or '?'}); "
                              "use a new --out folder or delete the old one")
    ctx = AttackContext(pair, verdict, cfg.steps, progress, cancel)
    attack.prepare(ctx, rows)
    n_sh, i_sh = (cfg.num_shards or 1), (cfg.shard_index or 0)
    mine = rows[i_sh::n_sh]
    header = {"format": FORMAT, "settings_id": sid, "settings": settings, "model": ident["model"],
              "run_id": ident["run_id"], "run_dir": ident["run_dir"], "method": ident["method"],
              "attack_defaults_from": (attack_cls.__doc__ or "").strip().splitlines()[0],
              "seeds": "search: torch.Generator(seed * 1000003 + row index); images: the row's evaluation_seed",
              "environment": environment_info()}
    images = out / "images"
    images.mkdir(parents=True, exist_ok=True)
    from erasure_eval.generate import _locked  # noqa: PLC2701

    with _locked(out / ".lock"):
        if not (out / "attack.json").is_file() or read_json(out / "attack.json").get("settings_id") != sid:
            atomic_write_json(out / "attack.json", dict(header, status={"planned": len(rows), "done": 0,
                                                                          "complete": False}))
    part = out / "parts" / f"attacks.{i_sh}-of-{n_sh}.jsonl"
    done = {int(r["row_index"]) for p in sorted((out / "parts").glob("attacks.*.jsonl"))
            for r in _read_rows(p, repair=(p == part))}
    todo = [r for r in mine if r.index not in done]
    logger.info("attack %s: %d prompts in this shard, %d done, %d to attack", cfg.attack, len(mine),
                len(mine) - len(todo), len(todo))
    per_row = max(1, attack.work_units())
    ctx.units_total = len(mine) * per_row
    ctx.units_done = (len(mine) - len(todo)) * per_row
    emit(progress, "attack", ctx.units_done, ctx.units_total)
    for r in todo:
        ctx.row_base, ctx.row_units = ctx.units_done, per_row
        rec = _attack_row(ctx, attack, r, cfg.seed, images)
        _append_row(part, rec)
        ctx.units_done = ctx.row_base + per_row
        emit(progress, "attack", ctx.units_done, ctx.units_total, prompt=r.case, success=rec["success_post"])
    return merge(out, rows, header)
