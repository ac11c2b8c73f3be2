"""Class-wise forgetting in the embedded class-conditional DDPM (models/shapes-ddpm): SalUn, RL, ESD, FT, Retrain.

For every method: forget one class, then draw ``--seeds`` images per class with the shipped sampler and report
    UA            share of forget-class images the shapes judge does NOT label as the forget class
    shown         forget-class images still labelled as the forget class (bar for SalUn: <= 1 of 64)
    other acc     mean judge accuracy on the other classes, and its drop from the original model (bar: <= 2 pts)
    judge-FD      Frechet distance in the judge's features between the other classes' generations and rendered
                  images of those classes (the offline FID of the paper's "FID on the remaining classes"; bar:
                  within 10% of the original model's)
    time          the whole erasure (data, mask, training) as recorded in run.json (bar: SalUn <= 3 min and <= 1/5
                  of Retrain's)

    python bench/ddpm_forget.py --forget circle --methods salun,rl,esd-class,ft,retrain

Resumable: runs go to ``--runs-dir`` (an existing complete run is reused; an interrupted one resumes), per-method
results are kept in the JSON file and skipped when present (``--redo M`` recomputes one). Times on a shared CPU
depend on the load: the load average is recorded before and after each erasure.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

from erasure.ddpm.erase import ClassEraseConfig, erase_class, load_class_run, resolve_model_dir  # noqa: E402
from erasure.ddpm.evaluate import class_report, judge_fd, unconditional_report  # noqa: E402
from erasure.ddpm.model import load_class_ddpm  # noqa: E402
from erasure.io import atomic_write_json, atomic_write_text, read_json  # noqa: E402
from erasure.shapes import load_judge  # noqa: E402

ROOT = Path(__file__).resolve().parent


def loadavg() -> float:
    try:
        return float(Path("/proc/loadavg").read_text().split()[0])
    except OSError:
        return float("nan")


def reference_images(classes: list[str], n: int, size: int) -> list:
    """Rendered images of ``classes`` (random colour and fill), ``n`` per class, from the bench seed range."""
    from erasure.shapes.data import SEED_BASES
    from erasure.shapes.render import COLORS, FILLS, SHAPES, ShapeSpec, render_spec

    out = []
    for c in classes:
        rng = np.random.default_rng([SHAPES.index(c), 29])
        for i in range(n):
            spec = ShapeSpec(c, COLORS[int(rng.integers(6))], FILLS[int(rng.integers(4))])
            out.append(render_spec(spec, SEED_BASES["bench"] + 1000 * SHAPES.index(c) + i, size))
    return out


def evaluate(model, judge, forget: str, seeds: list[int], ref: list, orig_other: list | None, uncond: int = 0) -> dict:
    t0 = time.time()
    imgs = {c: model.sample([c] * len(seeds), seeds, batch_size=128) for c in model.class_names}
    rep = class_report(judge, imgs, forget)
    if uncond:
        rep["unconditional"] = unconditional_report(judge, model, forget, list(range(uncond)), batch_size=128)
    other = [im for c in model.class_names if c != forget for im in imgs[c]]
    rep["judge_fd_other_vs_render"] = judge_fd(judge, other, ref)
    if orig_other is not None:
        rep["judge_fd_other_vs_original"] = judge_fd(judge, other, orig_other)
    rep["eval_s"] = round(time.time() - t0, 1)
    return rep, imgs


def _uncond(r: dict) -> str:
    u = r.get("unconditional")
    return "-" if u is None else f"{100 * u['forget_share']:.1f}% of {u['n']}"


def table(res: dict) -> str:
    o = res["original"]
    lines = [
        f"Forget class **{res['forget']}** of `{res['model']}` ({res['seeds']} seeds per class, DDIM "
        f"{res['sampler']['steps']} steps, CFG {res['sampler']['guidance']}; judge: models/shapes-judge).",
        "",
        "| method | UA (%) | forget class shown (of {n}) | unconditional: forget class share | other-class judge acc (%) "
        "| drop (pts) | judge-FD other vs render | FD ratio to original | judge-FD other vs original | wall time (s) | "
        "CPU time (s) | load avg | changed weights |".format(n=res["seeds"]),
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        f"| original | {100 * o['ua']:.1f} | {o['forget_shown']} | {_uncond(o)} | {100 * o['other_accuracy']:.1f} | 0.0 | "
        f"{o['judge_fd_other_vs_render']:.2f} | 1.00 | 0 | - | - | - | - |",
    ]
    if "original_resampled" in res:
        f = res["original_resampled"]
        lines.append(
            f"| original, seeds {res['seeds']}-{2 * res['seeds'] - 1} (sampling noise) | {100 * f['ua']:.1f} | "
            f"{f['forget_shown']} | {_uncond(f)} | {100 * f['other_accuracy']:.1f} | {100 * (o['other_accuracy'] - f['other_accuracy']):.1f} | "
            f"{f['judge_fd_other_vs_render']:.2f} | {f['judge_fd_other_vs_render'] / o['judge_fd_other_vs_render']:.2f} | "
            f"{f['judge_fd_other_vs_original']:.2f} | - | - | - | - |")
    for m, r in res["methods"].items():
        lines.append(
            f"| {m} | {100 * r['ua']:.1f} | {r['forget_shown']} | {_uncond(r)} | {100 * r['other_accuracy']:.1f} | "
            f"{100 * (o['other_accuracy'] - r['other_accuracy']):.1f} | {r['judge_fd_other_vs_render']:.2f} | "
            f"{r['judge_fd_other_vs_render'] / o['judge_fd_other_vs_render']:.2f} | {r['judge_fd_other_vs_original']:.2f} | "
            f"{r['time_s']:.0f} | {r['timing'].get('cpu', float('nan')):.0f} | {r['load_before']:.1f}/{r['load_after']:.1f} | {r['changed_params']:,} |")
    lines += ["", "Per-class judge accuracy (%):", "",
              "| model | " + " | ".join(res["classes"]) + " |", "|---" * (len(res["classes"]) + 1) + "|"]
    for name, r in [("original", o), *res["methods"].items()]:
        lines.append(f"| {name} | " + " | ".join(f"{100 * r['per_class'][c]['accuracy']:.0f}" for c in res["classes"]) + " |")
    lines += ["", "What the judge saw in the forget class's generations:", ""]
    for name, r in [("original", o), *res["methods"].items()]:
        lines.append(f"- {name}: {json.dumps(r['per_class'][res['forget']]['labels'], sort_keys=True)}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--forget", default="circle")
    ap.add_argument("--anchor", default="random")
    ap.add_argument("--methods", default="salun,rl,esd-class,ft,retrain")
    ap.add_argument("--seeds", type=int, default=64)
    ap.add_argument("--runs-dir", default=str(ROOT.parent / "runs" / "bench-ddpm"), help="run folders (kept: a "
                    "later process reuses them; under /tmp a reboot lost the Retrain run once)")
    ap.add_argument("--out", default=str(ROOT / "results" / "ddpm_forget"))
    ap.add_argument("--redo", action="append", default=[])
    ap.add_argument("--tag", default="", help="suffix of the method's row and run folder (settings variants)")
    ap.add_argument("--floor", action="store_true", help="also evaluate the original model on the next --seeds "
                    "seeds: the sampling noise of every figure (a model compared with itself)")
    ap.add_argument("--set", action="append", default=[], help="method:key=value override (e.g. salun:steps=100)")
    ap.add_argument("--uncond", type=int, default=128, help="also draw this many images from the null class "
                    "(unconditional) and report the forget class's share there (0 = skip; rows measured before "
                    "this column show '-')")
    ap.add_argument("--model-row", action="append", default=[], metavar="NAME=DIR",
                    help="also evaluate another model folder as a row (e.g. the original recipe trained with another "
                    "seed: how far a second training run of the same model lands on every figure)")
    ap.add_argument("--merge", nargs="*", default=[], help="only merge these result JSONs (same model and class; "
                    "e.g. methods run in parallel processes) into --out")
    args = ap.parse_args(argv)
    if args.merge:
        parts = [read_json(p) for p in args.merge]
        res = dict(parts[0], methods={m: r for part in parts for m, r in part.get("methods", {}).items()})
        for part in parts:
            if "original_resampled" in part:
                res["original_resampled"] = part["original_resampled"]
        atomic_write_json(Path(args.out + ".json"), res)
        atomic_write_text(Path(args.out + ".md"), table(res))
        print(table(res))
        return 0
    torch.set_num_threads(1)
    model_dir = resolve_model_dir(args.model)
    out_json = Path(args.out + ".json")
    res = read_json(out_json) if out_json.is_file() else {}
    if res.get("forget") != args.forget or res.get("model_dir") != str(model_dir):
        res = {}
    judge = load_judge()
    model = load_class_ddpm(model_dir)
    seeds = list(range(args.seeds))
    classes = model.class_names
    others = [c for c in classes if c != args.forget]
    ref = reference_images(others, args.seeds, model.image_size)
    res.update(forget=args.forget, model="models/" + model_dir.name, model_dir=str(model_dir), seeds=args.seeds,
               classes=classes, sampler={"steps": model.num_inference_steps, "guidance": model.guidance_scale})
    orig_rep, orig_imgs = evaluate(model, judge, args.forget, seeds, ref, None, args.uncond)
    res["original"] = orig_rep
    orig_other = [im for c in others for im in orig_imgs[c]]
    if args.floor:
        rep, _ = evaluate(model, judge, args.forget, list(range(args.seeds, 2 * args.seeds)), ref, orig_other)
        res["original_resampled"] = rep
        print("original, next seeds", {k: rep[k] for k in ("ua", "forget_shown", "other_accuracy",
                                                           "judge_fd_other_vs_render", "judge_fd_other_vs_original")})
    res.setdefault("methods", {})
    overrides: dict[str, dict] = {}
    for s in args.set:
        m, kv = s.split(":", 1)
        k, v = kv.split("=", 1)
        overrides.setdefault(m, {})[k] = json.loads(v) if v[:1] in "0123456789-[{tf" else v
    for spec in args.model_row:
        name, _, path = spec.partition("=")
        if name in res["methods"] and name not in args.redo:
            continue
        other = load_class_ddpm(resolve_model_dir(path))
        if other.class_names != classes:
            raise SystemExit(f"{path} has classes {other.class_names}, not {classes}")
        info = read_json(Path(path) / "training_info.json")
        rep, _ = evaluate(other, judge, args.forget, seeds, ref, orig_other, args.uncond)
        secs = float(info.get("train_seconds", float("nan")))
        rep.update(time_s=secs, timing={"total": secs}, load_before=float("nan"), load_after=float("nan"),
                   changed_params=int(info.get("parameters", 0)), config=info["config"], run_dir=str(path))
        res["methods"][name] = rep
        atomic_write_json(out_json, res)
        atomic_write_text(Path(args.out + ".md"), table(res))
        print(name, {k: rep[k] for k in ("ua", "forget_shown", "other_accuracy", "judge_fd_other_vs_render")},
              flush=True)
    for m in [x for x in args.methods.split(",") if x]:
        key = m + args.tag
        if key in res["methods"] and key not in args.redo:
            continue
        kw = dict(model=str(model_dir), forget_class=args.forget, anchor_class=args.anchor, method=m)
        kw.update(overrides.get(m, {}))
        cfg = ClassEraseConfig(**kw)
        run_dir = Path(args.runs_dir) / f"{args.forget}-{key}"
        l0 = loadavg()
        if not (run_dir / "run.json").is_file() or key in args.redo:
            erase_class(cfg, run_dir, overwrite=key in args.redo)
        info = read_json(run_dir / "run.json")
        l1 = loadavg()
        rep, _ = evaluate(load_class_run(run_dir), judge, args.forget, seeds, ref, orig_other, args.uncond)
        rep.update(time_s=info["timing_s"]["total"], timing=info["timing_s"], load_before=l0, load_after=l1,
                   changed_params=info["changed_params"], config=info["config"], run_dir=str(run_dir))
        res["methods"][key] = rep
        atomic_write_json(out_json, res)
        atomic_write_text(Path(args.out + ".md"), table(res))
        print(key, {k: rep[k] for k in ("ua", "forget_shown", "other_accuracy", "judge_fd_other_vs_render", "time_s")},
              flush=True)
    atomic_write_json(out_json, res)
    atomic_write_text(Path(args.out + ".md"), table(res))
    print(table(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
