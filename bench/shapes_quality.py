"""Quality of the embedded shapes model, judged by the shapes judge: ``python bench/shapes_quality.py``.

For each row of ``prompts/shapes.csv`` (by default the rows naming shape and color), generates ``--seeds`` images
(seeds ``evaluation_seed + k``) with DDIM ``--steps`` and CFG ``--guidance``, labels them with the judge and
reports how often the judge agrees with each concept the prompt names: per shape, per color, per fill, per row.
Writes ``bench/results/shapes_quality.json`` and ``.md`` (override with ``--out``).

Bars (issue 3): shape >= 90%, color >= 90%, fill >= 80% over prompts naming shape + color (+ fill).
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch: shared 2-core CPU
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import argparse  # noqa: E402
import csv  # noqa: E402
import logging  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

logger = logging.getLogger("shapes_quality")

BARS = {"shape": 0.90, "color": 0.90, "fill": 0.80}


def read_rows(path: Path, which: str) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    if which == "named":
        rows = [r for r in rows if r["shape"] and r["color"]]
    elif which != "all":
        wanted = {int(x) for x in which.split(",")}
        rows = [r for r in rows if int(r["case_number"]) in wanted]
    if not rows:
        raise SystemExit(f"no rows selected from {path} with --rows {which}")
    return rows


def summarize(rows: list[dict], preds: list[list[dict]]) -> dict:
    """Agreement per concept value (over rows naming it) and per row."""
    from erasure.shapes import COLORS, FILLS, SHAPES

    per_value: dict[str, dict[str, list[int]]] = {
        "shape": {s: [0, 0] for s in SHAPES}, "color": {c: [0, 0] for c in COLORS}, "fill": {f: [0, 0] for f in FILLS}
    }
    per_row = []
    joint = [0, 0]
    for r, ps in zip(rows, preds):
        named = [h for h in ("shape", "color", "fill") if r[h]]
        rec = {"case_number": int(r["case_number"]), "prompt": r["prompt"], "n": len(ps)}
        for h in named:
            ok = sum(p[h] == r[h] for p in ps)
            per_value[h][r[h]][0] += ok
            per_value[h][r[h]][1] += len(ps)
            rec[h] = ok / len(ps)
        for h in ("shape", "color", "fill"):
            if not r[h]:  # distribution of an unnamed concept (should be varied)
                counts: dict[str, int] = {}
                for p in ps:
                    counts[p[h]] = counts.get(p[h], 0) + 1
                rec[f"{h}_distribution"] = counts
        if named:
            jok = sum(all(p[h] == r[h] for h in named) for p in ps)
            joint[0] += jok
            joint[1] += len(ps)
            rec["all_named"] = jok / len(ps)
        per_row.append(rec)
    overall = {}
    for h, d in per_value.items():
        ok = sum(v[0] for v in d.values())
        n = sum(v[1] for v in d.values())
        overall[h] = ok / n if n else None
    return {
        "per_value": {h: {k: (v[0] / v[1] if v[1] else None) for k, v in d.items()} for h, d in per_value.items()},
        "per_value_n": {h: {k: v[1] for k, v in d.items()} for h, d in per_value.items()},
        "overall": overall,
        "joint": joint[0] / joint[1] if joint[1] else None,
        "per_row": per_row,
    }


def to_markdown(s: dict, meta: dict) -> str:
    lines = [f"# shapes model quality ({meta['model_name']}, {meta['steps']} DDIM steps, CFG {meta['guidance']}, "
             f"{meta['seeds']} seeds per prompt, {meta['rows']} prompts)", ""]
    lines.append("| concept | value | judge agrees | images |")
    lines.append("|---|---|---|---|")
    for h in ("shape", "color", "fill"):
        for k, v in s["per_value"][h].items():
            if v is not None:
                lines.append(f"| {h} | {k} | {v:.1%} | {s['per_value_n'][h][k]} |")
    lines.append("")
    lines.append("| head | overall | bar | pass |")
    lines.append("|---|---|---|---|")
    for h, v in s["overall"].items():
        if v is not None:
            lines.append(f"| {h} | {v:.1%} | {BARS[h]:.0%} | {'yes' if v >= BARS[h] else 'NO'} |")
    if s["joint"] is not None:
        lines.append(f"| all named concepts at once | {s['joint']:.1%} | - | - |")
    lines += ["", "| case | prompt | shape | color | fill | all |", "|---|---|---|---|---|---|"]
    for r in s["per_row"]:
        cells = [f"{r[k]:.0%}" if k in r else "" for k in ("shape", "color", "fill", "all_named")]
        lines.append(f"| {r['case_number']} | {r['prompt']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    import torch

    from erasure.io import atomic_write_json, atomic_write_text, environment_info
    from erasure.shapes import default_model_path, load_judge
    from erasure.shapes.sample import load_shapes_pipeline, sample_images

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(default_model_path()), help="pipeline folder")
    ap.add_argument("--judge", default=None, help="judge weights (default: the shipped judge)")
    ap.add_argument("--prompts", default=str(ROOT / "prompts" / "shapes.csv"))
    ap.add_argument("--rows", default="named", help="'named' (shape+color rows), 'all', or case numbers '0,5,7'")
    ap.add_argument("--seeds", type=int, default=64, help="images per prompt")
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--guidance", type=float, default=7.5)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "shapes_quality"), help="output path stem")
    ap.add_argument("--grid", default=None, help="optional PNG path: first 8 images of every row")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    torch.set_num_threads(args.threads)

    rows = read_rows(Path(args.prompts), args.rows)
    pipe = load_shapes_pipeline(args.model)
    judge = load_judge(args.judge)
    prompts, seeds = [], []
    for r in rows:
        for k in range(args.seeds):
            prompts.append(r["prompt"])
            seeds.append(int(r["evaluation_seed"]) + k)
    t0 = time.time()
    last = [t0]

    def progress(done: int, total: int) -> None:
        if time.time() - last[0] > 30 or done == total:
            last[0] = time.time()
            logger.info("generated %d/%d images (%.0fs)", done, total, time.time() - t0)

    images = sample_images(pipe, prompts, seeds, args.steps, args.guidance, args.batch_size, progress)
    gen_s = time.time() - t0
    preds = judge.predict(images)
    per_row_preds = [preds[i * args.seeds : (i + 1) * args.seeds] for i in range(len(rows))]
    s = summarize(rows, per_row_preds)
    meta = {"model": args.model, "model_name": Path(args.model).name, "steps": args.steps, "guidance": args.guidance,
            "seeds": args.seeds, "rows": len(rows), "images": len(images), "generation_seconds": round(gen_s, 1),
            "threads": args.threads, "loadavg": os.getloadavg(), "bars": BARS, **environment_info()}
    md = to_markdown(s, meta)
    logger.info("%s", md)
    out = Path(args.out)
    atomic_write_json(out.with_suffix(".json"), {**meta, **s})
    atomic_write_text(out.with_suffix(".md"), md)
    if args.grid:
        from PIL import Image

        n = min(8, args.seeds)
        grid = Image.new("RGB", (64 * n, 64 * len(rows)), "white")
        for i in range(len(rows)):
            for k in range(n):
                grid.paste(images[i * args.seeds + k].resize((64, 64)), (64 * k, 64 * i))
        grid.save(args.grid)
    logger.info("wrote %s.json/.md", out)
    ok = all(v is None or v >= BARS[h] for h, v in s["overall"].items())
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
