"""Attack robustness of plain SalUn vs salun-adv on the embedded shapes model (preset ``shape_circle``).

For each variant: a whole erasure from scratch (fresh Df/Dr cache, so the time includes generating Df/Dr, the
mask and the training), then

* retain: the judge's shape/colour/fill accuracy on the ``prompts/shapes.csv`` rows without a circle
  (``--retain-seeds`` seeds each), and the plain-prompt circle share on the preset's circle prompts;
* attack: ``erasure-eval attack --attack unlearndiffatk`` (helper ATK's UnlearnDiffAtk) over ``--n-prompts`` circle
  prompts (``bench/results/adv_circle_prompts.csv``, written here), judge ``shapes``, target ``shape=circle``:
  pre- and post-attack ASR from its ``summary.json``.

Every phase is resumable: finished runs, evaluations and attacks are kept (``--runs-dir``) and skipped.

    python bench/adv_robustness.py --variants salun adv-unet adv-te adv-both
    python bench/adv_robustness.py --variants salun adv-unet --phases erase retain   # no attack
    python bench/adv_robustness.py --variants salun --phases attack --shards 3          # attack in 3 processes
    python bench/adv_robustness.py --variants salun adv-unet-fast --phases collect      # table of what is done
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
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
logger = logging.getLogger("adv_robustness")

# variant -> (method, method_args overrides on top of the preset's alpha/retain_loss, EraseConfig overrides);
# an override "cache" names another variant whose Df/Dr cache is reused (same preset and seed: the same images;
# the erase time then excludes generating them)
ADV = {"attack_steps": 3, "attack_lr": 5e-3, "adv_tokens": 5, "attack_init": "random"}
FAST = {"attack_steps": 1, "attack_lr": 5e-3, "adv_tokens": 5, "attack_init": "random"}  # FGSM from a random start
VARIANTS: dict[str, tuple[str, dict, dict]] = {
    "salun": ("salun", {}, {}),
    "adv-unet": ("salun-adv", {"train": "unet", **ADV}, {}),
    "adv-te": ("salun-adv", {"train": "text_encoder", **ADV}, {}),
    "adv-both": ("salun-adv", {"train": "both", **ADV}, {}),
    "adv-unet-fast": ("salun-adv", {"train": "unet", **FAST}, {"cache": "adv-unet"}),
    "adv-te-fast": ("salun-adv", {"train": "text_encoder", **FAST}, {"cache": "adv-te"}),
}


def circle_prompts(n: int, path: Path) -> Path:
    """``n`` circle prompts (shape-only captions, then colour/fill combinations) with one seed each, as a CSV in
    the ``prompts/shapes.csv`` format."""
    from erasure.shapes import all_captions
    from erasure.shapes.render import COLORS, FILLS

    rows = [(p, "", "") for p in all_captions("circle", None, None)]
    combos = [(c, f) for f in (None, *FILLS) for c in (None, *COLORS) if c or f]
    i = 0
    while len(rows) < n:
        c, f = combos[i % len(combos)]
        caps = all_captions("circle", c, f)
        rows.append((caps[(i // len(combos)) % len(caps)], c or "", f or ""))
        i += 1
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["case_number", "prompt", "evaluation_seed", "shape", "color", "fill"])
        for k, (p, c, f) in enumerate(rows[:n]):
            w.writerow([k, p, 70_000_000 + 1000 * k, "circle", c, f])
    return path


def do_erase(name: str, runs: Path, seed: int) -> Path:
    from erasure import erase, read_run
    from erasure.presets import config_from_preset
    from erasure.runs import RunDirError

    run_dir = runs / name
    try:
        read_run(run_dir)
        return run_dir
    except RunDirError:
        pass
    method, margs, over = VARIANTS[name]
    over = dict(over)
    shared = over.pop("cache", None)
    cache = runs / f"cache-{shared or name}"
    if not shared and not (runs / f"{name}.partial").exists():
        shutil.rmtree(cache, ignore_errors=True)  # fresh: the time includes generating Df/Dr
    cfg = config_from_preset("shape_circle", method=method, cache_dir=str(cache), seed=seed, **over)
    if margs:
        import dataclasses

        cfg = dataclasses.replace(cfg, method_args=dataclasses.replace(cfg.method_args, **margs))
    logger.info("erasing %s: %s", name, cfg.method_args)
    erase(cfg, run_dir)
    return run_dir


def do_retain(run_dir: Path, retain_seeds: int, forget_seeds: int) -> dict:
    out = run_dir.parent / f"{run_dir.name}-retain.json"
    if out.is_file():
        return json.loads(out.read_text())
    from shapes_erasure import evaluate

    from erasure import load_erased_pipeline
    from erasure.presets import load_preset
    from erasure.shapes import all_captions, load_judge

    pr = load_preset("shape_circle")
    with open(ROOT / "prompts" / "shapes.csv", encoding="utf-8") as fh:
        retain_rows = [r for r in csv.DictReader(fh) if r["shape"] != "circle"]
    only = all_captions("circle", None, None)
    forget_prompts = only + [p for p in pr.concept.forget_prompts[::3] if p not in only]
    t = time.time()
    r = evaluate(load_erased_pipeline(run_dir), load_judge(), "circle", "shape", forget_prompts, retain_rows,
                 forget_seeds, retain_seeds, 16)
    r["eval_s"] = round(time.time() - t, 1)
    out.write_text(json.dumps(r, indent=2))
    return r


def do_attack(run_dir: Path, prompts: Path, seed: int, extra: list[str], shards: int) -> dict | None:
    """``erasure-eval attack`` in ``shards`` parallel processes (rows i mod n); resumes per prompt."""
    out = run_dir.parent / f"{run_dir.name}-attack"
    if (out / "summary.json").is_file():
        return json.loads((out / "summary.json").read_text())
    cmd = [sys.executable, "-m", "erasure_eval", "attack", "--run", str(run_dir), "--attack", "unlearndiffatk",
           "--prompts", str(prompts), "--judge", "shapes", "--forget", "shape=circle", "--seed", str(seed),
           "--out", str(out), *extra]
    logger.info("attack: %s", " ".join(cmd))
    t = time.time()
    procs = [subprocess.Popen(cmd + (["--num-shards", str(shards), "--shard-index", str(i)] if shards > 1 else []))
             for i in range(shards)]
    rc = max(p.wait() for p in procs)
    if rc != 0 or not (out / "summary.json").is_file():
        logger.error("attack on %s failed (rc %s)", run_dir, rc)
        return None
    s = json.loads((out / "summary.json").read_text())
    s.setdefault("bench_attack_s", round(time.time() - t, 1))
    (out / "summary.json").write_text(json.dumps(s, indent=2))
    return s


def partial_attack(out: Path) -> dict | None:
    """ASR over the prompts attacked so far (no summary.json yet: an unfinished, resumable attack)."""
    rows = {}
    for f in sorted((out / "parts").glob("attacks.*.jsonl")) if (out / "parts").is_dir() else []:
        for line in f.read_text(encoding="utf-8").splitlines():
            if line.strip():
                r = json.loads(line)
                rows[r["row_index"]] = r
    if not rows:
        return None
    n = len(rows)
    return {"n_prompts": n, "partial": True, "rows": sorted(rows),
            "asr_pre": 100 * sum(r["success_pre"] for r in rows.values()) / n,
            "asr_post": 100 * sum(r["success_post"] for r in rows.values()) / n}


def table(res: dict) -> str:
    lines = ["| variant | method args | erase time (data / mask / train / total s) | circle on plain prompts | "
             "UnlearnDiffAtk ASR pre -> post | retain shape / colour / fill acc |", "|---|---|---|---|---|---|"]
    for name, r in res["variants"].items():
        t = r.get("erase_s") or {}
        tt = " / ".join(str(t.get(k, "-")) for k in ("data", "mask", "train", "total"))
        ret = r.get("retain") or {}
        acc = ret.get("retain_acc") or {}
        accs = " / ".join(f"{100 * acc[k]:.1f}%" if acc.get(k) is not None else "-" for k in ("shape", "color", "fill"))
        fs = f"{100 * ret['forget_share']:.1f}%" if "forget_share" in ret else "-"
        a = r.get("attack") or {}
        asr = f"{a['asr_pre']:.1f}% -> {a['asr_post']:.1f}% ({a.get('n_prompts')} prompts)" if "asr_post" in a else "-"
        if a.get("partial"):
            asr += ", unfinished"
        margs = {k: v for k, v in (r.get("method_args") or {}).items() if k not in ("alpha", "retain_loss")}
        lines.append(f"| {name} | `{json.dumps(margs)}` | {tt} | {fs} | {asr} | {accs} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--phases", nargs="+", default=["erase", "retain", "attack"], choices=["erase", "retain", "attack", "collect"])
    ap.add_argument("--n-prompts", type=int, default=32)
    ap.add_argument("--retain-seeds", type=int, default=8)
    ap.add_argument("--forget-seeds", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--attack-args", default="--prefix-length 3 --timesteps 5 --iterations 10",
                    help="Flags for `erasure-eval attack` (one string).")
    ap.add_argument("--shards", type=int, default=1, help="Parallel attack processes per run.")
    ap.add_argument("--runs-dir", default=str(ROOT / "runs" / "adv_bench"))
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "adv_robustness.json"))
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    runs = Path(args.runs_dir)
    runs.mkdir(parents=True, exist_ok=True)
    prompts = circle_prompts(args.n_prompts, ROOT / "bench" / "results" / "adv_circle_prompts.csv")
    out = Path(args.out)
    res = json.loads(out.read_text()) if out.is_file() else {"variants": {}}
    from erasure import read_run

    for name in args.variants:
        r = res["variants"].setdefault(name, {})
        if "erase" in args.phases:
            run_dir = do_erase(name, runs, args.seed)
            info = read_run(run_dir)
            r.update(method=info["method"], method_args=info["config"]["method_args"], erase_s=info["timing_s"],
                     changed_params=info["changed_params"], load_avg=os.getloadavg())
        run_dir = runs / name
        if "retain" in args.phases and run_dir.is_dir():
            r["retain"] = {k: v for k, v in do_retain(run_dir, args.retain_seeds, args.forget_seeds).items()
                           if k != "forget_per_prompt"}
        if "attack" in args.phases and run_dir.is_dir():
            a = do_attack(run_dir, prompts, args.seed, args.attack_args.split(), args.shards)
            if a is not None:
                r["attack"] = {k: v for k, v in a.items() if not isinstance(v, (list, dict))}
        if "collect" in args.phases:  # what is there, without running anything (unfinished attacks: the rows done)
            for f, key in ((runs / f"{name}-retain.json", "retain"),):
                if f.is_file():
                    r[key] = {k: v for k, v in json.loads(f.read_text()).items() if k != "forget_per_prompt"}
            out_dir = runs / f"{name}-attack"
            if (out_dir / "summary.json").is_file():
                r["attack"] = {k: v for k, v in json.loads((out_dir / "summary.json").read_text()).items()
                               if not isinstance(v, (list, dict))}
            elif (p := partial_attack(out_dir)) is not None:
                r["attack"] = p
            if (run_dir / "run.json").is_file():
                info = read_run(run_dir)
                r.update(method=info["method"], method_args=info["config"]["method_args"], erase_s=info["timing_s"],
                         changed_params=info["changed_params"])
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(res, indent=2))
        logger.info("%s: %s", name, {k: v for k, v in r.items() if k != "method_args"})
    out.with_suffix(".md").write_text(table(res) + "\n")
    print(table(res))


if __name__ == "__main__":
    main()
