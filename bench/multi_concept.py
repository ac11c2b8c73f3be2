"""Several concepts in one run on the embedded shapes model: how forgetting and retain accuracy change with the
number of erased shapes (1, 3, 5), per method, judged by the shapes judge.

For each set (``circle``; ``circle star heart``; ``circle star heart triangle cross``), every concept is remapped to
``square`` (the shape never erased), with retain prompts that name no erased shape. Measured:

* forget: for each erased shape, its shape-only captions plus every third preset forget prompt x ``--forget-seeds``;
  the share of images the judge calls that shape (bar for 3 shapes with SalUn: <= 10% each);
* retain: the ``prompts/shapes.csv`` rows naming a shape that is not erased x ``--retain-seeds``; the judge's shape
  accuracy (bar: drops <= 3 points), and colour/fill accuracy on every row that names no erased shape.

    python bench/multi_concept.py --sets 3 --methods salun          # the bar
    python bench/multi_concept.py --sets 1 3 5 --methods salun uce --steps-per-concept 100 --forget-seeds 16 \
        --retain-seeds 4 --out bench/results/multi_concept_scaling.json   # the table and plot

Results: ``bench/results/multi_concept.json``, ``.md`` and ``.svg`` (merged across invocations).
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import argparse  # noqa: E402
import csv  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import shutil  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

from erasure import ConceptSpec, EraseConfig, erase, generate, load_erased_pipeline, load_pipeline, read_run  # noqa: E402
from erasure.resources import prompt_file  # noqa: E402
from erasure.shapes import all_captions, load_judge  # noqa: E402
from erasure.shapes.make_prompts import PRESET_CONFIG, multi_preset  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
SETS = {1: ("circle",), 3: ("circle", "star", "heart"), 5: ("circle", "star", "heart", "triangle", "cross")}
ANCHOR = "square"
logger = logging.getLogger("multi_concept")


def forget_prompts(preset: dict) -> dict[str, list[str]]:
    out = {}
    for c in preset["concepts"]:
        only = all_captions(shape=c["name"], color=None, fill=None)
        out[c["name"]] = only + [p for p in c["forget_prompts"][::3] if p not in only]
    return out


def evaluate(pipe, judge, erased: tuple[str, ...], prompts: dict[str, list[str]], rows: list[dict], forget_seeds: int,
             retain_seeds: int, batch: int, known: dict | None = None) -> dict:
    """Forget shares per erased shape and retain accuracies; ``known`` holds forget results measured before
    (the original model's, per shape, shared by every set)."""
    res: dict = {"forget": {}, "forget_worst_prompt": {}}
    for name, plist in prompts.items():
        if known and name in known.get("forget", {}):
            res["forget"][name] = known["forget"][name]
            res["forget_worst_prompt"][name] = known["forget_worst_prompt"][name]
            continue
        ps = [p for p in plist for _ in range(forget_seeds)]
        seeds = [10_000 * i + s for i in range(len(plist)) for s in range(forget_seeds)]
        preds = judge.predict(generate(pipe, ps, seeds, steps=25, guidance=7.5, batch_size=batch))
        res["forget"][name] = sum(q["shape"] == name for q in preds) / len(preds)
        res["forget_worst_prompt"][name] = max(
            sum(q["shape"] == name for q in preds[i * forget_seeds:(i + 1) * forget_seeds]) / forget_seeds
            for i in range(len(plist)))
    keep = [r for r in rows if r["shape"] not in erased]
    ps = [r["prompt"] for r in keep for _ in range(retain_seeds)]
    seeds = [int(r["evaluation_seed"]) + s for r in keep for s in range(retain_seeds)]
    rr = [r for r in keep for _ in range(retain_seeds)]
    preds = judge.predict(generate(pipe, ps, seeds, steps=25, guidance=7.5, batch_size=batch))
    acc = {}
    for k in ("shape", "color", "fill"):
        named = [(r, q) for r, q in zip(rr, preds) if r[k]]
        acc[k] = sum(q[k] == r[k] for r, q in named) / len(named) if named else None
    res["retain_acc"] = acc
    res["retain_sees_erased"] = sum(q["shape"] in erased for q in preds) / len(preds)
    return res


def run_config(method: str, preset: dict, cache: Path, overrides: dict) -> EraseConfig:
    base = {**PRESET_CONFIG, **preset["config"]}
    if method in ("salun", "rl"):
        data = {**base, "method": method}
    else:  # other methods: only the generic data settings of the preset; their own defaults otherwise
        data = {k: v for k, v in base.items() if k not in ("alpha", "retain_loss", "lr", "steps")} | {"method": method}
    data.update(overrides.get("*", {}))
    data.update(overrides.get(method, {}))
    return EraseConfig.from_dict({**data, "model": "default", "cache_dir": str(cache),
                                  "concepts": [ConceptSpec.from_dict(c).to_dict() for c in preset["concepts"]]})


def _acc(r: dict, ref: dict | None, k: str) -> str:
    v = r["retain_acc"][k]
    return f"{v:.1%}" if ref is None else f"{v:.1%} ({(v - ref['retain_acc'][k]) * 100:+.1f})"


def table(res: dict) -> str:
    lines = ["Erasing 1, 3 and 5 shapes in one run (anchor: square); forget = share of images the judge calls the "
             "erased shape (mean over erased shapes, worst shape in brackets); retain = judge accuracy on prompts "
             "that name no erased shape (drop vs the original model in brackets).", "",
             "| shapes erased | model | forget: mean (worst) | retain shape acc | retain color acc | retain fill acc | "
             "erase time s |", "|---|---|---|---|---|---|---|"]
    for n, entry in sorted(res["sets"].items(), key=lambda kv: int(kv[0])):
        orig = entry["models"].get("original")
        for name, r in entry["models"].items():
            f = r["forget"]
            mean, worst = sum(f.values()) / len(f), max(f.values())

            ref = None if name == "original" else orig
            t = r.get("erase_s", {}).get("total")
            lines.append(f"| {n} ({', '.join(entry['concepts'])}) | {name} | {mean:.1%} ({worst:.1%}) | "
                         f"{_acc(r, ref, 'shape')} | {_acc(r, ref, 'color')} | {_acc(r, ref, 'fill')} | "
                         f"{'-' if t is None else f'{t:.0f}'} |")
    return "\n".join(lines)


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    methods = sorted({m for e in res["sets"].values() for m in e["models"] if m != "original"})
    for m in methods:
        xs, fs, ds = [], [], []
        for n, e in sorted(res["sets"].items(), key=lambda kv: int(kv[0])):
            if m in e["models"] and "original" in e["models"]:
                r, o = e["models"][m], e["models"]["original"]
                xs.append(int(n))
                fs.append(100 * sum(r["forget"].values()) / len(r["forget"]))
                ds.append(100 * (r["retain_acc"]["shape"] - o["retain_acc"]["shape"]))
        axes[0].plot(xs, fs, marker="o", label=m)
        axes[1].plot(xs, ds, marker="o", label=m)
    axes[0].set(xlabel="shapes erased in one run", ylabel="erased shape still seen (%)", ylim=(0, None), xticks=[1, 3, 5])
    axes[1].set(xlabel="shapes erased in one run", ylabel="retain shape accuracy change (points)", xticks=[1, 3, 5])
    axes[1].axhline(-3, color="grey", lw=0.8, ls="--")
    axes[0].axhline(10, color="grey", lw=0.8, ls="--")
    for ax in axes:
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, format="svg")
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sets", nargs="+", type=int, default=[1, 3, 5], choices=sorted(SETS))
    ap.add_argument("--methods", nargs="+", default=["salun"])
    ap.add_argument("--forget-seeds", type=int, default=32)
    ap.add_argument("--retain-seeds", type=int, default=8)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--override", default="{}", help='JSON: {"*": {...}, "salun": {...}} EraseConfig overrides.')
    ap.add_argument("--steps-per-concept", type=int, default=0,
                    help="Give per-step methods this many steps per erased concept (0 = the preset's steps).")
    ap.add_argument("--reuse-runs", action="store_true",
                    help="Evaluate a finished run directory of the same name again instead of erasing anew.")
    ap.add_argument("--tag", default="", help="Suffix of the result rows (e.g. '-300steps' beside the defaults).")
    ap.add_argument("--runs-dir", default=str(ROOT / "runs" / "bench-multi"))
    ap.add_argument("--out", default=str(RESULTS / "multi_concept.json"))
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    out = Path(args.out)
    res = json.loads(out.read_text()) if out.is_file() else {"sets": {}}
    res.update(forget_seeds=args.forget_seeds, retain_seeds=args.retain_seeds)
    with open(prompt_file("shapes.csv"), encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    judge = load_judge()
    overrides = json.loads(args.override)
    for n in args.sets:
        names = SETS[n]
        preset = multi_preset(names, ANCHOR)
        prompts = forget_prompts(preset)
        entry = res["sets"].setdefault(str(n), {"concepts": list(names), "models": {},
                                                "seeds": [args.forget_seeds, args.retain_seeds]})
        if entry.get("seeds", [args.forget_seeds, args.retain_seeds]) != [args.forget_seeds, args.retain_seeds]:
            raise SystemExit(f"set {n} in {out} was measured with other seed counts {entry['seeds']}; use another --out")
        if "original" not in entry["models"]:
            t = time.time()
            known = {"forget": {}, "forget_worst_prompt": {}}  # the original's per-shape results of other sets
            for other in res["sets"].values():
                o = other["models"].get("original")
                if o and other.get("seeds") == [args.forget_seeds, args.retain_seeds]:
                    known["forget"].update(o["forget"])
                    known["forget_worst_prompt"].update(o["forget_worst_prompt"])
            entry["models"]["original"] = evaluate(load_pipeline("default"), judge, names, prompts, rows,
                                                   args.forget_seeds, args.retain_seeds, args.batch, known)
            entry["models"]["original"]["eval_s"] = round(time.time() - t, 1)
            logger.info("set %d original: %s", n, entry["models"]["original"])
        for method in args.methods:
            run_dir = Path(args.runs_dir) / f"set{n}-{method}{args.tag}"
            cache = Path(args.runs_dir) / f"cache-set{n}"
            cfg = run_config(method, preset, cache, overrides)
            if args.steps_per_concept and cfg.spec.shape == "loss":
                cfg = EraseConfig.from_dict({**cfg.to_dict(), "steps": args.steps_per_concept * n})
            if not (args.reuse_runs and (run_dir / "run.json").is_file()):
                erase(cfg, run_dir, overwrite=True)
            info = read_run(run_dir)
            if info["config"] != cfg.to_dict() and not args.reuse_runs:
                raise SystemExit(f"{run_dir} holds another config")
            t = time.time()
            r = evaluate(load_erased_pipeline(run_dir), judge, names, prompts, rows, args.forget_seeds,
                         args.retain_seeds, args.batch)
            r.update(erase_s=info["timing_s"], eval_s=round(time.time() - t, 1), config=info["config"],
                     changed_params=info["changed_params"])
            entry["models"][method + args.tag] = r
            logger.info("set %d %s: forget %s retain %s", n, method, r["forget"], r["retain_acc"])
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(res, indent=2))
    out.write_text(json.dumps(res, indent=2))
    out.with_suffix(".md").write_text(table(res) + "\n")
    plot(res, out.with_suffix(".svg"))
    print(table(res))
    shutil.rmtree(Path(args.runs_dir) / "tmp", ignore_errors=True)


if __name__ == "__main__":
    main()
