"""Budgeted tuning: at most N shortened candidate runs over learning rate, retain weight (alpha, and the
neighbours' weight) and mask ratio, each
judged on held-out forget and retain prompts; the best under a readable rule is then trained in full.

Rule (``TuneConfig.tune_max_drop`` = R): among the candidates whose held-out retain score drops at most R points
below the original model's, keep the one with the lowest forget rate (ties: the smaller drop, then the earlier
candidate); when none stays within R, keep the smallest drop. A candidate is stopped early (after half its
held-out seeds) when it is clearly worse than the best so far: forget rate 20 points higher and a retain drop no
smaller.

Judges (:data:`JUDGES`): ``shapes`` (the embedded model's judge: forget = the judge sees every concept word,
retain = its accuracy on the concepts a prompt names) and ``clip`` (open_clip weights from the user: forget = the
image is closer to the concept's prompt than to the anchor's, retain = CLIP score against the prompt). The search
log and the choice go into the final run's ``run.json["tuning"]``.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import os
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from erasure.auto.config import TuneConfig
from erasure.auto.text import carries, concept_words

logger = logging.getLogger("erasure.auto")

__all__ = ["candidates", "choose", "tune_and_erase", "JUDGES", "ShapesTuneJudge", "ClipTuneJudge"]


def candidates(cfg, n: int) -> list[dict[str, Any]]:
    """The first ``n`` of a fixed, ordered list of settings around ``cfg`` (the config's own first): the method's
    own grid (:meth:`erasure.methods.MethodConfig.tune_grid`) or the trainer's."""
    own = cfg.method_args.tune_grid(cfg)
    if own is not None:
        return [{k: _round(v) for k, v in g.items()} for g in own[:n]]
    lr, ratio = cfg.lr, cfg.mask_ratio
    alpha = getattr(cfg.method_args, "alpha", None)
    grid: list[dict[str, Any]] = [{}, {"lr": lr * 1.5}, {"lr": lr * 0.6}]
    if alpha is not None and alpha > 0:
        nw = cfg.auto.neighbour_weight if cfg.auto.neighbours else None
        grid += [{"alpha": alpha * 2}]
        if nw:
            grid += [{"alpha": alpha * 2, "neighbour_weight": nw * 2}]
        grid += [{"lr": lr * 1.5, "alpha": alpha * 2}, {"lr": lr * 0.6, "alpha": alpha * 2}, {"alpha": alpha * 0.5}]
    grid += [{"mask_ratio": max(0.1, ratio * 0.6)}, {"lr": lr * 1.5, "mask_ratio": max(0.1, ratio * 0.6)},
             {"lr": lr * 2.5}, {"lr": lr * 0.35}]
    return [{k: _round(v) for k, v in g.items()} for g in grid[:n]]


def _round(v: Any) -> Any:
    """3 significant digits for a float setting; an integer one (iterations) stays an integer."""
    return v if isinstance(v, int) and not isinstance(v, bool) else float(f"{v:.3g}")


def choose(log: Sequence[dict[str, Any]], max_drop: float) -> int:
    """Index (into ``log``) of the candidate the rule keeps; see the module docstring."""
    scored = [(i, r) for i, r in enumerate(log) if r.get("forget") is not None]
    if not scored:
        raise ValueError("no tuning candidate finished")
    within = [(i, r) for i, r in scored if r["retain_drop"] <= max_drop]
    if within:
        return min(within, key=lambda ir: (ir[1]["forget"], ir[1]["retain_drop"], ir[0]))[0]
    return min(scored, key=lambda ir: (ir[1]["retain_drop"], ir[0]))[0]


def _apply(cfg, cand: dict[str, Any], steps: int):
    c = copy.deepcopy(cfg)
    for k, v in cand.items():
        if k in {f.name for f in dataclasses.fields(c.method_args)}:
            setattr(c.method_args, k, v)
        elif k == "neighbour_weight":
            c.auto.neighbour_weight = v
        else:
            setattr(c, k, v)
    c.steps = steps
    c.checkpoint_every = 0
    return c


# ------------------------------------------------------------------------------------------------ judges
class ShapesTuneJudge:
    """The shapes judge: forget = share of images showing every concept word; retain = accuracy (%) on the
    concepts each prompt names."""

    name = "shapes"

    def __init__(self) -> None:
        from erasure.shapes import load_judge

        self.judge = load_judge()

    @staticmethod
    def _truth(prompt: str) -> dict[str, str]:
        from erasure.auto.text import words
        from erasure.shapes import CONCEPT_WORDS

        ws = set(words(prompt))
        out = {}
        for kind, vocab in CONCEPT_WORDS.items():
            for name, word in vocab.items():
                if word in ws:
                    out[kind] = name
        return out

    def forget_rate(self, images, prompts, concept) -> list[float]:
        truth = self._truth(" ".join(concept_words(concept)))
        preds = self.judge.predict(images)
        return [float(all(q[k] == v for k, v in truth.items())) if truth else 0.0 for q in preds]

    def retain_score(self, images, prompts) -> list[float]:
        preds = self.judge.predict(images)
        out = []
        for q, p in zip(preds, prompts):
            t = self._truth(p)
            out.append(100.0 * sum(q[k] == v for k, v in t.items()) / len(t) if t else 100.0)
        return out


class ClipTuneJudge:
    """open_clip with user weights (``SALUN_CLIP_WEIGHTS``, arch ``SALUN_CLIP_ARCH``, default ViT-L-14)."""

    name = "clip"

    def __init__(self) -> None:
        from erasure_eval.clip_score import load_clip

        weights = os.environ.get("SALUN_CLIP_WEIGHTS")
        if not weights:
            raise ValueError("tuning on this model needs a judge: set SALUN_CLIP_WEIGHTS to an open_clip checkpoint file "
                             "(CLIP similarity), or tune on the embedded model")
        self.model, self.preprocess, self.tokenizer = load_clip(os.environ.get("SALUN_CLIP_ARCH", "ViT-L-14"), weights)

    def _sim(self, images, texts) -> Any:
        import torch

        with torch.no_grad():
            im = self.model.encode_image(torch.stack([self.preprocess(i) for i in images]))
            tx = self.model.encode_text(self.tokenizer(list(texts)))
        im = torch.nn.functional.normalize(im.float(), dim=-1)
        tx = torch.nn.functional.normalize(tx.float(), dim=-1)
        return im @ tx.T

    def forget_rate(self, images, prompts, concept) -> list[float]:
        s = self._sim(images, [concept.forget_prompts[0], concept.anchor_for(0)])
        return [float(a > b) for a, b in s.tolist()]

    def retain_score(self, images, prompts) -> list[float]:
        s = self._sim(images, prompts)
        return [100.0 * max(float(s[i, i]), 0.0) for i in range(len(images))]


JUDGES: dict[str, Callable[[], Any]] = {"shapes": ShapesTuneJudge, "clip": ClipTuneJudge}


def _held_out(cfg, pipe_model: str, seed: int, neighbours: Sequence[str] = ()) -> tuple[list[str], list[str]]:
    """Held-out prompts: the user's first forget prompt and 3 pool captions naming the concept that training does not
    use (forget), and pool captions without it that are neither training retain prompts (retain): 2 naming each
    neighbour term (where collateral damage lands: orange when red is erased) and 8 others. Without a caption
    pool: the training prompts."""
    import random

    from erasure.auto.retain import caption_pool

    c = cfg.concepts[0]
    try:
        pool, _ = caption_pool(cfg.auto.retain_pool, pipe_model, seed + 1)
    except FileNotFoundError as err:
        logger.warning("tuning judges on the training prompts (no caption pool for held-out prompts: %s)", err)
        return list(c.forget_prompts[:4]), list(c.retain_prompts[:8]) or [c.anchor_for(0)]
    cw = concept_words(c)
    used = set(c.forget_prompts) | set(c.retain_prompts)
    rng = random.Random(seed + 7)
    forget = [p for p in pool if carries(p, cw) and p not in used]
    retain = [p for p in pool if not carries(p, cw) and p not in used]
    # the user's own first forget prompt (on judging seeds, not the training ones) leads the set: a plain prompt
    # ("a dotted shape") can resist an erasure that pool captions naming more attributes do not show
    forget = [c.forget_prompts[0]] + rng.sample(forget, min(3, len(forget)))
    near: list[str] = []
    for term in neighbours:
        named = [p for p in retain if carries(p, [term.lower()]) and p not in near]
        near += rng.sample(named, min(2, len(named)))
    rest = [p for p in retain if p not in near]
    retain = near + rng.sample(rest, min(8, len(rest)))
    retain = retain or list(c.retain_prompts[:8]) or [c.anchor_for(0)]
    return forget, retain


def _score(pipe, judge, concept, forget, retain, seeds: Sequence[int]) -> tuple[float, float]:
    from erasure.diffusion.pipeline import generate

    fp = [p for p in forget for _ in seeds]
    fs = [10_000 * i + s for i in range(len(forget)) for s in seeds]
    rp = [p for p in retain for _ in seeds]
    rs = [20_000 + 10_000 * i + s for i in range(len(retain)) for s in seeds]
    f = judge.forget_rate(generate(pipe, fp, fs, steps=25, guidance=7.5, batch_size=16), fp, concept)
    r = judge.retain_score(generate(pipe, rp, rs, steps=25, guidance=7.5, batch_size=16), rp)
    return 100.0 * sum(f) / len(f), sum(r) / len(r)


def tune_and_erase(cfg, tune: TuneConfig, out_dir: str | os.PathLike, overwrite: bool = False, progress=None,
                   cancel=None, run_info: dict[str, Any] | None = None, judge: str = "auto") -> Path:
    """Try at most ``tune.tune`` candidates (shortened runs), pick one by the rule, erase with it into ``out_dir``.

    The candidates' runs live in ``<out_dir>.tune/`` (removed at the end); they share the Df/Dr cache, so only
    the first generates images. Returns the final run directory; its run.json has ``tuning`` (log, rule, choice).
    """
    from erasure.auto.retain import is_shapes_model
    from erasure.diffusion.pipeline import load_pipeline, resolve_model
    from erasure.diffusion.train import erase
    from erasure.runs import load_erased_pipeline

    if tune.tune < 1:
        return erase(cfg, out_dir, overwrite=overwrite, progress=progress, cancel=cancel, run_info=run_info)
    if len(cfg.concepts) != 1:
        raise ValueError("--tune works on one concept at a time; erase several concepts without it")
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        from erasure.runs import RunExistsError

        raise RunExistsError(f"{out_dir} already exists; pass --overwrite or choose another --out")
    model = resolve_model(cfg.model)
    if judge == "auto":
        judge = "shapes" if is_shapes_model(model) else "clip"
    if judge not in JUDGES:
        raise ValueError(f"unknown tuning judge {judge!r}; choose one of {', '.join(JUDGES)}")
    t0 = time.time()
    judge_obj = JUDGES[judge]()
    # the automatic sets are built inside erase(); held-out prompts must avoid them, so build them once here
    from erasure.auto.prepare import auto_active, prepare_concepts

    base = load_pipeline(model, device=cfg.device)
    full = cfg
    if auto_active(cfg):
        concepts, _, record = prepare_concepts(cfg, base, model, cfg.method_args.uses_retain_prompts(),
                                               retain_required=cfg.method_args.uses_retain())
        full = copy.deepcopy(cfg)
        full.concepts = concepts
        nbrs = [n["term"] for rec in record["concepts"].values() for n in rec.get("neighbours", {}).get("terms", [])]
    else:
        nbrs = []
    forget, retain = _held_out(full, model, cfg.seed, nbrs)
    concept = full.concepts[0]
    seeds = list(range(tune.tune_seeds))
    half = seeds[: max(1, len(seeds) // 2)]
    f0, r0 = _score(base, judge_obj, concept, forget, retain, seeds)
    del base
    steps = max(1, round(cfg.steps * tune.tune_steps_fraction))
    work = out_dir.with_name(out_dir.name + ".tune")
    log: list[dict[str, Any]] = []
    best: dict[str, Any] | None = None
    for i, cand in enumerate(candidates(cfg, tune.tune)):
        t = time.time()
        c = _apply(cfg, cand, steps)
        run = erase(c, work / f"cand{i}", overwrite=True, progress=progress, cancel=cancel)
        pipe = load_erased_pipeline(run, device=cfg.device)
        f, r = _score(pipe, judge_obj, concept, forget, retain, half)
        rec = {"candidate": i, "settings": cand, "steps": steps}
        if best is not None and f >= best["forget"] + 20 and (r0 - r) >= best["retain_drop"]:
            rec.update(forget=round(f, 2), retain=round(r, 2), retain_drop=round(r0 - r, 2), stopped_early=True)
        else:
            f, r = _score(pipe, judge_obj, concept, forget, retain, seeds)
            rec.update(forget=round(f, 2), retain=round(r, 2), retain_drop=round(r0 - r, 2), stopped_early=False)
        rec["seconds"] = round(time.time() - t, 1)
        log.append(rec)
        logger.info("tuning candidate %d %s: forget %.1f%%, retain %.1f (drop %.1f)%s", i, cand or "(defaults)",
                    rec["forget"], rec["retain"], rec["retain_drop"], " [stopped early]" if rec["stopped_early"] else "")
        if not rec["stopped_early"] and (best is None or choose([best, rec], tune.tune_max_drop) == 1):
            best = rec
    k = choose([r if not r["stopped_early"] else {**r, "forget": None} for r in log], tune.tune_max_drop)
    chosen = log[k]
    shutil.rmtree(work, ignore_errors=True)
    tuning = {"judge": judge, "rule": f"lowest held-out forget rate with retain drop <= {tune.tune_max_drop} points "
              "(else the smallest drop)", "config": tune.to_dict(), "held_out": {"forget": forget, "retain": retain},
              "original": {"forget": round(f0, 2), "retain": round(r0, 2)}, "log": log, "chosen": chosen,
              "search_s": round(time.time() - t0, 1)}
    logger.info("tuning chose candidate %d %s (forget %.1f%%, retain drop %.1f)", k, chosen["settings"] or "(defaults)",
                chosen["forget"], chosen["retain_drop"])
    final = _apply(cfg, chosen["settings"], cfg.steps)
    final.checkpoint_every = cfg.checkpoint_every
    return erase(final, out_dir, overwrite=overwrite, progress=progress, cancel=cancel,
                 run_info={**(run_info or {}), "tuning": tuning})
