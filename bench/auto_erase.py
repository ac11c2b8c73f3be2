"""Automatic erasure on the embedded model: every shape, colour and fill erased one at a time with the model's
defaults (models/shapes-sd/erasure_defaults.json: automatic retain set, forget paraphrases, neighbour set; no
tuning) from one plain forget prompt ("a star", "a red shape", "a dotted shape") and no anchor: the model's anchor
rule chooses it (the nearest concept of the same kind; ``--preset-anchors``: the presets' anchors, as the tables
before that rule).

For each concept: a whole erasure from an empty Df/Dr cache (the time includes generating Df/Dr), then the shapes
judge on

* forget: every caption template naming only the concept x ``--forget-seeds`` seeds (bar: the judge sees the
  concept in <= 5% of images);
* retain: the ``prompts/shapes.csv`` rows that do not name the concept x ``--retain-seeds`` seeds; accuracy on the
  other concepts of the same kind (bar: drop <= 3 points) and on the other kinds (bar: <= 2 points) against the
  original model on the same images' prompts and seeds;
* neighbours: the judge's accuracy on the rows naming each neighbour concept the run chose.

Resumable: one record per concept in ``--out`` (JSON), written after each concept; finished concepts are skipped,
a finished run directory is reused. Run in the background:

    nohup nice -n 5 python bench/auto_erase.py > /tmp/auto_erase.log 2>&1 &
    python bench/auto_erase.py --table-only          # rewrite bench/results/auto_erase.md from the JSON
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import argparse  # noqa: E402
import csv  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from shapes_erasure import judge_images  # noqa: E402

logger = logging.getLogger("auto_erase")
KINDS = ("shape", "color", "fill")


def plain_prompt(concept: str, kind: str) -> str:
    from erasure.shapes import make_caption

    return make_caption(**{"shape": None, "color": None, "fill": None, kind: concept})


def concepts_all() -> list[tuple[str, str]]:
    from erasure.shapes import COLORS, FILLS, SHAPES

    return [(s, "shape") for s in SHAPES] + [(c, "color") for c in COLORS] + [(f, "fill") for f in FILLS]


def predict(pipe, judge, prompts, seeds, batch) -> list[dict]:
    from erasure import generate

    out = []
    for i in range(0, len(prompts), 64):
        out += judge_images(judge, generate(pipe, prompts[i : i + 64], seeds[i : i + 64], steps=25, guidance=7.5,
                                            batch_size=batch))
    return [{k: q[k] for k in KINDS} for q in out]


def forget_eval(pipe, judge, concept, kind, images, batch) -> dict:
    """``images`` seeds spread over the first 4 caption templates naming only the concept."""
    from erasure.shapes import all_captions

    prompts = all_captions(**{"shape": None, "color": None, "fill": None, kind: concept})[:4]
    seeds = max(1, images // len(prompts))
    ps = [p for p in prompts for _ in range(seeds)]
    ss = [10_000 * i + s for i in range(len(prompts)) for s in range(seeds)]
    preds = predict(pipe, judge, ps, ss, batch)
    per = {p: sum(q[kind] == concept for q in preds[i * seeds : (i + 1) * seeds]) / seeds for i, p in enumerate(prompts)}
    return {"share": sum(q[kind] == concept for q in preds) / len(preds), "worst_prompt": max(per.values()),
            "per_prompt": per, "images": len(preds)}


def rows_eval(pipe, judge, rows, seeds, batch) -> list[list[dict]]:
    ps = [r["prompt"] for r in rows for _ in range(seeds)]
    ss = [int(r["evaluation_seed"]) + s for r in rows for s in range(seeds)]
    preds = predict(pipe, judge, ps, ss, batch)
    return [preds[i * seeds : (i + 1) * seeds] for i in range(len(rows))]


def accuracy(rows, preds, kind, keep=lambda r: True) -> float | None:
    hits = [q[kind] == r[kind] for r, qs in zip(rows, preds) if r[kind] and keep(r) for q in qs]
    return sum(hits) / len(hits) if hits else None


def retain_summary(rows, preds, concept, kind) -> dict:
    """Accuracy on rows not naming the concept: same kind (other values), and each other kind."""
    keep = [i for i, r in enumerate(rows) if r[kind] != concept]
    rr, pp = [rows[i] for i in keep], [preds[i] for i in keep]
    return {"same_kind": accuracy(rr, pp, kind), **{k: accuracy(rr, pp, k) for k in KINDS if k != kind}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--concepts", nargs="*", default=None, help="Subset of concepts (default: all 16).")
    ap.add_argument("--forget-seeds", type=int, default=64, help="Forget images (seeds over 4 templates).")
    ap.add_argument("--original-forget-seeds", type=int, default=16, help="The same for the original model.")
    ap.add_argument("--retain-seeds", type=int, default=4, help="Seeds per prompts/shapes.csv row.")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--runs-dir", default=str(ROOT / "runs" / "bench-auto"))
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "auto_erase.json"))
    ap.add_argument("--override", default="{}", help="JSON of settings applied on top of the model defaults.")
    ap.add_argument("--tune", type=int, default=0, help="Tune with this budget (erasure.auto.tune) before erasing.")
    ap.add_argument("--original-from", default=None, help="Reuse the original model's retain predictions of this JSON "
                    "(same --retain-seeds).")
    ap.add_argument("--anchor", action="append", default=[], metavar="CONCEPT=ANCHOR",
                    help="Anchor concept instead of the shapes world's default (e.g. red=orange; repeatable).")
    ap.add_argument("--preset-anchors", action="store_true", help="Give each concept the presets' anchor "
                    "(circle -> square, red -> blue, striped -> solid; the tables before the automatic anchor) "
                    "instead of leaving it to the model's anchor rule.")
    ap.add_argument("--table-only", action="store_true")
    ap.add_argument("--merge", nargs="+", default=None, metavar="JSON",
                    help="Add the concept records of these result files (parallel processes, same settings) to --out.")
    ap.add_argument("--app-blue-star", action="store_true", help="Instead: the app's custom erasure of 'a blue star' "
                    "(anchor 'a blue heart', no retain prompts) through erasure_app.service.AppService.")
    ap.add_argument("--app-anchor", default="a blue heart", help="The anchor typed in the app's form for "
                    "--app-blue-star ('' = none typed: the model's anchor rule chooses).")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    out = Path(args.out)
    if args.app_blue_star and args.out == ap.get_default("out"):
        out = out.with_name("auto_erase_app_blue_star.json")
    res = json.loads(out.read_text()) if out.is_file() else {"concepts": {}}
    if args.merge:
        for f in args.merge:
            part = json.loads(Path(f).read_text())
            for k in ("forget_seeds", "retain_seeds", "override", "tune", "anchors", "original_rows"):
                if k in res and k in part and part[k] != res[k]:
                    raise SystemExit(f"{f}: {k} differs from {out}'s; merge only runs with the same settings")
                res.setdefault(k, part.get(k))
            res["concepts"].update({c: r for c, r in part["concepts"].items() if r.get("erased")})
        save(out, res)
    if args.table_only or args.merge:
        out.with_suffix(".md").write_text(table(res) + "\n")
        print(table(res))
        return
    import torch

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    if args.app_blue_star:
        return app_blue_star(args, res, out)
    from erasure import ConceptSpec, load_erased_pipeline, load_pipeline, read_run
    from erasure.auto.defaults import default_config
    from erasure.shapes import default_anchor, load_judge

    judge = load_judge()
    with open(ROOT / "prompts" / "shapes.csv", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    res.update(forget_seeds=args.forget_seeds, retain_seeds=args.retain_seeds, override=json.loads(args.override),
               tune=args.tune, anchors=dict(a.split("=", 1) for a in args.anchor), preset_anchors=args.preset_anchors)
    base = None
    if "original_rows" not in res and args.original_from:
        old = json.loads(Path(args.original_from).read_text())
        if old.get("retain_seeds") != args.retain_seeds:
            raise SystemExit(f"{args.original_from} has {old.get('retain_seeds')} retain seeds, not {args.retain_seeds}")
        res["original_rows"] = old["original_rows"]
    if "original_rows" not in res:
        base = load_pipeline("default")
        t = time.time()
        res["original_rows"] = rows_eval(base, judge, rows, args.retain_seeds, args.batch)
        res["original_rows_s"] = round(time.time() - t, 1)
        save(out, res)
    kinds = dict((c, k) for c, k in concepts_all())
    anchors = dict(a.split("=", 1) for a in args.anchor)
    todo = [(c, kinds[c]) for c in args.concepts] if args.concepts else concepts_all()
    for concept, kind in todo:
        if concept in res["concepts"] and "erased" in res["concepts"][concept]:
            continue
        forget = plain_prompt(concept, kind)
        given = anchors.get(concept, default_anchor(concept) if args.preset_anchors else None)
        anchor = plain_prompt(given, kind) if given else None  # None: the model's anchor rule chooses
        run_dir = Path(args.runs_dir) / concept
        cache = Path(args.runs_dir) / f"cache-{concept}"
        rec: dict = {"kind": kind, "forget_prompt": forget, "anchor_prompt": anchor}
        spec = ConceptSpec(name=concept, forget_prompts=[forget], anchor_prompts=[anchor] if anchor else [])
        cfg, source = default_config(concepts=[spec], cache_dir=str(cache), **json.loads(args.override))
        if not (run_dir / "run.json").is_file():
            shutil.rmtree(cache, ignore_errors=True)
            load0 = os.getloadavg()
            t, cpu = time.time(), time.process_time()
            if args.tune:
                from erasure.auto.config import TuneConfig
                from erasure.auto.tune import tune_and_erase

                tune_and_erase(cfg, TuneConfig(tune=args.tune), run_dir, overwrite=True,
                               run_info={"settings_source": source})
            else:
                from erasure import erase

                erase(cfg, run_dir, overwrite=True, run_info={"settings_source": source})
            rec["wall_s"] = round(time.time() - t, 1)
            rec["cpu_s"] = round(time.process_time() - cpu, 1)  # ~ the wall time on an idle core (1 thread)
            rec["load_avg"] = [round(x, 2) for x in load0] + [round(x, 2) for x in os.getloadavg()]
        info = read_run(run_dir)
        rec["timing_s"] = info["timing_s"]
        rec["auto"] = info.get("auto")
        if anchor is None:  # the automatic anchor
            rec["anchor_prompt"] = rec["auto"]["concepts"][concept]["anchor"]["prompts"][0]
            rec["anchor_auto"] = True
        rec["tuning"] = info.get("tuning")
        rec.setdefault("wall_s", info["timing_s"]["total"])
        if base is None:
            base = load_pipeline("default")
        rec["original_forget"] = forget_eval(base, judge, concept, kind, args.original_forget_seeds, args.batch)
        pipe = load_erased_pipeline(run_dir)
        t = time.time()
        rec["erased_forget"] = forget_eval(pipe, judge, concept, kind, args.forget_seeds, args.batch)
        keep = [i for i, r in enumerate(rows) if r[kind] != concept]
        erased_rows = rows_eval(pipe, judge, [rows[i] for i in keep], args.retain_seeds, args.batch)
        full = [None] * len(rows)
        for i, p in zip(keep, erased_rows):
            full[i] = p
        rec["original_retain"] = retain_summary(rows, res["original_rows"], concept, kind)
        rec["erased_retain"] = retain_summary([rows[i] for i in keep], erased_rows, concept, kind)
        nb = {}
        for c in (rec["auto"] or {}).get("concepts", {}).get(concept, {}).get("neighbours", {}).get("terms", []):
            term = {"outlined": "outline"}.get(c["term"], c["term"])
            nk = next((k for k in KINDS if any(r[k] == term for r in rows)), None)
            if nk is None:
                continue
            sel = [i for i in keep if rows[i][nk] == term]
            nb[term] = {"kind": nk, "similarity": c["similarity"],
                        "original": accuracy([rows[i] for i in sel], [res["original_rows"][i] for i in sel], nk),
                        "erased": accuracy([rows[i] for i in sel], [full[i] for i in sel], nk)}
        rec["neighbours"] = nb
        rec["eval_s"] = round(time.time() - t, 1)
        rec["erased"] = True
        res["concepts"][concept] = rec
        save(out, res)
        logger.info("%s: forget %.1f%% retain %s -> %s (%.0f s erase)", concept, 100 * rec["erased_forget"]["share"],
                    rec["original_retain"], rec["erased_retain"], rec["wall_s"])
    out.with_suffix(".md").write_text(table(res) + "\n")
    print(table(res))


def app_blue_star(args, res: dict, out: Path) -> None:
    """The app's custom form with "a blue star" -> "a blue heart" and no retain prompts (the model's defaults)."""
    from erasure import load_erased_pipeline, load_pipeline, read_run
    from erasure.shapes import all_captions, load_judge
    from erasure_app.service import AppService

    judge = load_judge()
    with open(ROOT / "prompts" / "shapes.csv", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    service = AppService(model="default", runs_dir=args.runs_dir, device="cpu",
                         data_cache_dir=str(Path(args.runs_dir) / "cache-app-blue-star"))
    rec = res.setdefault("app_blue_star", {})
    rid = "app-blue-star"
    if not (Path(args.runs_dir) / rid / "run.json").is_file():
        cfg = service.make_config("", "a blue star", args.app_anchor, "")  # every setting: the custom form's
        rec["preview"] = service.auto_preview("", "a blue star", args.app_anchor, "")
        rec["anchor_typed"] = args.app_anchor
        t = time.time()
        load0 = os.getloadavg()
        service.erase(cfg, rid, tune=args.tune)  # --tune N: the app's "Tune first" (4 candidates)
        rec["tune"] = args.tune
        rec["wall_s"] = round(time.time() - t, 1)
        rec["load_avg"] = [round(x, 2) for x in load0 + os.getloadavg()]
    info = read_run(Path(args.runs_dir) / rid)
    rec.update(timing_s=info["timing_s"], auto=info.get("auto"), settings_source=info.get("settings_source"))
    prompts = all_captions("star", "blue", None)[:4]
    seeds = max(1, args.forget_seeds // len(prompts))

    def sees(pipe, n):
        ps = [p for p in prompts for _ in range(n)]
        ss = [10_000 * i + s for i in range(len(prompts)) for s in range(n)]
        preds = predict(pipe, judge, ps, ss, args.batch)
        return sum(q["shape"] == "star" and q["color"] == "blue" for q in preds) / len(preds)

    base = load_pipeline("default")
    pipe = load_erased_pipeline(Path(args.runs_dir) / rid)
    rec["original_forget"] = sees(base, max(1, args.original_forget_seeds // len(prompts)))
    rec["erased_forget"] = sees(pipe, seeds)
    keep = [r for r in rows if not (r["shape"] == "star" and r["color"] == "blue")]
    o = rows_eval(base, judge, keep, args.retain_seeds, args.batch)
    e = rows_eval(pipe, judge, keep, args.retain_seeds, args.batch)
    for k in KINDS:
        rec[f"retain_{k}"] = [accuracy(keep, o, k), accuracy(keep, e, k)]
    stars = [i for i, r in enumerate(keep) if r["shape"] == "star"]
    rec["other_stars_shape"] = [accuracy([keep[i] for i in stars], [o[i] for i in stars], "shape"),
                                accuracy([keep[i] for i in stars], [e[i] for i in stars], "shape")]
    save(out, res)
    print(json.dumps({k: v for k, v in rec.items() if k not in ("auto", "settings_source")}, indent=1))


def save(out: Path, res: dict) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(res, indent=1))
    tmp.replace(out)


def time_limit(res: dict) -> float:
    """The time bar: 3 minutes per erasure; with ``--tune``, 15 minutes for tuning and the final run together."""
    return 900.0 if res.get("tune") else 180.0


def verdict(rec: dict, limit: float = 180.0) -> tuple[bool, list[str]]:
    miss = []
    if rec["erased_forget"]["share"] > 0.05:
        miss.append(f"forget {rec['erased_forget']['share']:.1%}")
    o, e = rec["original_retain"], rec["erased_retain"]
    for k in o:
        if o[k] is None or e[k] is None:
            continue
        drop = 100 * (o[k] - e[k])
        if drop > (3.0 if k == "same_kind" else 2.0):
            miss.append(f"{k.replace('_', ' ')} -{drop:.1f}")
    t = rec.get("cpu_s", rec["wall_s"])
    if t > limit:
        miss.append(f"time {t:.0f} s")
    return not miss, miss


def table(res: dict) -> str:
    lines = [
        f"Each concept erased alone with the model defaults from one plain forget prompt; forget: "
        f"{res.get('forget_seeds')} images (seeds) over the first 4 templates naming only the concept; retain: prompts/shapes.csv rows "
        f"without it x {res.get('retain_seeds')} seeds (drops in points against the original on the same prompts and "
        f"seeds). Bars: forget <= 5%, same kind drop <= 3, other kinds <= 2, erasure <= {time_limit(res):.0f} s "
        f"{'(tuning and the final run; ' if res.get('tune') else '('}CPU seconds of the one-thread "
        "process where measured, since the wall time depends on the shared machine's load).",
        "",
        "| concept | forget prompt -> anchor | judge sees it: before / after (worst prompt) | same kind | other kinds | "
        "neighbours (acc before -> after) | erase wall s (data/mask/train) | erase CPU s | load avg | bars |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in res.get("concepts", {}).items():
        if "erased" not in r:
            continue
        o, e = r["original_retain"], r["erased_retain"]

        def d(k, o=o, e=e):
            return "-" if o[k] is None or e[k] is None else f"{100 * e[k]:.1f} ({100 * (e[k] - o[k]):+.1f})"

        others = ", ".join(f"{k} {d(k)}" for k in o if k != "same_kind")
        nb = ", ".join(f"{t} {100 * v['original']:.0f}->{100 * v['erased']:.0f}" for t, v in r["neighbours"].items()
                       if v["original"] is not None and v["erased"] is not None) or "-"
        t = r["timing_s"]
        ok, miss = verdict(r, time_limit(res))
        la = r.get("load_avg")
        lines.append(
            f"| {name} ({r['kind']}) | {r['forget_prompt']} -> {r['anchor_prompt']}{' (auto)' if r.get('anchor_auto') else ''} | "
            f"{100 * r['original_forget']['share']:.0f}% / {100 * r['erased_forget']['share']:.1f}% "
            f"({100 * r['erased_forget']['worst_prompt']:.1f}%) | {d('same_kind')} | {others} | {nb} | "
            f"{r['wall_s']:.0f} ({t['data']:.0f}/{t['mask']:.0f}/{t['train']:.0f}) | {r.get('cpu_s', '-')} | "
            f"{'-' if not la else f'{la[0]:.1f}-{la[3]:.1f}'} | {'met' if ok else 'missed: ' + '; '.join(miss)} |"
        )
    done = [r for r in res.get("concepts", {}).values() if "erased" in r]
    lines += ["", f"{sum(verdict(r, time_limit(res))[0] for r in done)} of {len(done)} concepts meet every bar."]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
