"""Erasure on the embedded shapes model, judged by the shapes judge: SalUn against RL (no mask) and ESD.

For a preset (``shape_circle``, ``color_red``, ``fill_striped``) and each method: run a whole erasure from
scratch (fresh Df/Dr cache, so the time includes generating Df/Dr, the mask and the fine-tuning), then generate
with the original and the erased model and let the judge say what it sees:

* forget: every forget prompt of the preset x ``--forget-seeds`` seeds; the share of images in which the judge
  sees the erased concept (bar: <= 5%, from >= 90% before);
* retain: the rows of ``prompts/shapes.csv`` that do not name the erased concept x ``--retain-seeds`` seeds; the
  judge's accuracy on the concept kind (shape accuracy when a shape is erased; bar: drops <= 3 points) and on
  the other two kinds.

    python bench/shapes_erasure.py --preset shape_circle --methods salun rl esd-x
    python bench/shapes_erasure.py --preset color_red --methods salun
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

import torch  # noqa: E402

from erasure import erase, generate, load_erased_pipeline, load_pipeline, read_run  # noqa: E402
from erasure.presets import config_from_preset, load_preset  # noqa: E402
from erasure.shapes import all_captions, concept_kind, load_judge  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
logger = logging.getLogger("shapes_erasure")


def judge_images(judge, images) -> list[dict]:
    return judge.predict(images)


def evaluate(pipe, judge, concept: str, kind: str, forget_prompts, retain_rows, forget_seeds, retain_seeds, batch):
    """Forget share (judge sees the concept) and retain accuracies for one model."""
    prompts = [p for p in forget_prompts for _ in range(forget_seeds)]
    seeds = [10_000 * i + s for i in range(len(forget_prompts)) for s in range(forget_seeds)]
    imgs = generate(pipe, prompts, seeds, steps=25, guidance=7.5, batch_size=batch)
    preds = judge_images(judge, imgs)
    per_prompt = {}
    for i, p in enumerate(forget_prompts):
        chunk = preds[i * forget_seeds : (i + 1) * forget_seeds]
        per_prompt[p] = sum(q[kind] == concept for q in chunk) / forget_seeds
    forget_share = sum(q[kind] == concept for q in preds) / len(preds)
    rp, rs, rows = [], [], []
    for row in retain_rows:
        for s in range(retain_seeds):
            rp.append(row["prompt"])
            rs.append(int(row["evaluation_seed"]) + s)
            rows.append(row)
    imgs = generate(pipe, rp, rs, steps=25, guidance=7.5, batch_size=batch)
    preds = judge_images(judge, imgs)
    acc = {}
    for k in ("shape", "color", "fill"):
        named = [(r, q) for r, q in zip(rows, preds) if r[k]]
        acc[k] = sum(q[k] == r[k] for r, q in named) / len(named) if named else None
    leak = sum(q[kind] == concept for q in preds) / len(preds)
    return {"forget_share": forget_share, "forget_worst_prompt": max(per_prompt.values()), "forget_per_prompt": per_prompt,
            "retain_acc": acc, "retain_sees_concept": leak, "forget_images": len(prompts), "retain_images": len(rp)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="shape_circle")
    ap.add_argument("--methods", nargs="+", default=["salun", "rl", "esd-x"])
    ap.add_argument("--forget-seeds", type=int, default=64)
    ap.add_argument("--retain-seeds", type=int, default=8)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--override", default="{}", help="JSON of EraseConfig overrides applied to every method.")
    ap.add_argument("--model", default="default", help="Base model (default: the embedded shapes model).")
    ap.add_argument("--runs-dir", default=str(ROOT / "runs" / "bench"))
    ap.add_argument("--out", default=None, help="JSON results (default bench/results/shapes_erasure_<preset>.json).")
    ap.add_argument("--keep-cache", action="store_true", help="Reuse Df/Dr images (time then excludes generation).")
    ap.add_argument("--merge", action="store_true", help="Keep the other methods' rows of an existing --out file (same "
                    "seeds); the original model is then not re-evaluated.")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(os.cpu_count() or 1)
    pr = load_preset(args.preset)
    concept = pr.concept.name
    kind = concept_kind(concept)
    with open(ROOT / "prompts" / "shapes.csv", encoding="utf-8") as fh:
        retain_rows = [r for r in csv.DictReader(fh) if r[kind] != concept]
    judge = load_judge()
    # every template naming only the concept, plus a spread of the preset's combined prompts
    only = all_captions(**{"shape": None, "color": None, "fill": None, kind: concept})
    forget_prompts = only + [p for p in pr.concept.forget_prompts[::3] if p not in only]
    results = {"preset": args.preset, "concept": concept, "kind": kind, "forget_seeds": args.forget_seeds,
               "retain_seeds": args.retain_seeds, "load_avg_start": os.getloadavg(), "models": {}}
    out = Path(args.out or ROOT / "bench" / "results" / f"shapes_erasure_{args.preset}.json")
    if args.merge and out.is_file():
        old = json.loads(out.read_text())
        if (old.get("forget_seeds"), old.get("retain_seeds")) != (args.forget_seeds, args.retain_seeds):
            raise SystemExit(f"{out} was measured with other seed counts; drop --merge or match them")
        results["models"] = old["models"]
    t = time.time()
    if "original" not in results["models"]:
        base = load_pipeline(args.model)
        results["models"]["original"] = evaluate(base, judge, concept, kind, forget_prompts, retain_rows,
                                                 args.forget_seeds, args.retain_seeds, args.batch)
        results["models"]["original"]["eval_s"] = round(time.time() - t, 1)
    logger.info("original: %s", {k: v for k, v in results["models"]["original"].items() if k != "forget_per_prompt"})
    overrides = json.loads(args.override)
    for method in args.methods:
        run_dir = Path(args.runs_dir) / f"{args.preset}-{method}"
        cache = Path(args.runs_dir) / f"cache-{args.preset}-{method}"
        if not args.keep_cache:
            shutil.rmtree(cache, ignore_errors=True)
        cfg = config_from_preset(args.preset, method=method, cache_dir=str(cache), model=args.model, **overrides)
        erase(cfg, run_dir, overwrite=True)
        info = read_run(run_dir)
        pipe = load_erased_pipeline(run_dir)
        t = time.time()
        r = evaluate(pipe, judge, concept, kind, forget_prompts, retain_rows, args.forget_seeds, args.retain_seeds, args.batch)
        r.update(erase_s=info["timing_s"], eval_s=round(time.time() - t, 1), changed_params=info["changed_params"],
                 unet_params=info["unet_params"], config=info["config"])
        results["models"][method] = r
        logger.info("%s: %s", method, {k: v for k, v in r.items() if k not in ("forget_per_prompt", "config")})
    results["load_avg_end"] = os.getloadavg()
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(table(results))
    out.with_suffix(".md").write_text(table(results) + "\n")


def table(res: dict) -> str:
    kind = res["kind"]
    others = [k for k in ("shape", "color", "fill") if k != kind]
    lines = [
        f"Erasing **{res['concept']}** ({kind}); forget: {res['forget_seeds']} seeds x each forget prompt; "
        f"retain: prompts/shapes.csv rows without it x {res['retain_seeds']} seeds. Judge = models/shapes-judge.",
        "",
        f"| model | sees {res['concept']} on forget prompts | worst forget prompt | retain {kind} acc | "
        + " | ".join(f"retain {o} acc" for o in others) + " | erase time (data / mask / train / total s) | weights in saved tensors (SalUn trains the 50% in its mask) |",
        "|---|---|---|---|" + "---|" * len(others) + "---|---|",
    ]
    for name, r in res["models"].items():
        t = r.get("erase_s")
        ts = f"{t['data']:.0f} / {t['mask']:.0f} / {t['train']:.0f} / {t['total']:.0f}" if t else "-"
        ch = f"{r['changed_params'] / r['unet_params']:.0%}" if "changed_params" in r else "-"
        lines.append(
            f"| {name} | {r['forget_share']:.1%} | {r['forget_worst_prompt']:.1%} | {r['retain_acc'][kind]:.1%} | "
            + " | ".join(f"{r['retain_acc'][o]:.1%}" for o in others) + f" | {ts} | {ch} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
