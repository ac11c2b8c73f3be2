"""How much of an erasure survives as a LoRA, by rank: the embedded shapes model, a SalUn ``shape_circle`` run.

Extracts the run's weight change at each rank (``erasure.lora``, SVD per changed Linear/Conv2d weight), applies
it to the original model (base + up @ down, what ``fuse_lora`` does) and lets the shapes judge score it as
``bench/shapes_erasure.py`` does: forget = share of images of the circle prompts in which the judge still sees a
circle; retain = judge accuracy on the prompts/shapes.csv rows without a circle. Rows: the original model, the
full erased weights, and the LoRA at each rank (``full`` = every layer's full rank; ``full+bias`` adds the bias
changes, peft ``lora_bias``); norm-layer changes are never in a LoRA. File sizes are those of the peft and
kohya files (float32; float16 halves them). Results are saved after every row; a rerun skips finished rows.

    python bench/lora_rank.py --run /tmp/fmt-run --out bench/results/lora_rank.json

Without ``--run`` a run is made first (``erasure erase --preset shape_circle --out /tmp/fmt-run``).
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import argparse  # noqa: E402
import csv  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
from shapes_erasure import evaluate  # noqa: E402

from erasure import erase, load_erased_pipeline, load_pipeline, read_run  # noqa: E402
from erasure.lora import extract_lora, save_lora  # noqa: E402
from erasure.presets import config_from_preset, load_preset  # noqa: E402
from erasure.runs import load_run_weights  # noqa: E402
from erasure.shapes import all_captions, concept_kind, load_judge  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def apply_lora(pipe, base_state: dict, ext) -> None:
    """Set the UNet to base + the LoRA's deltas (weights, and biases when carried); other tensors stay original."""
    sd = pipe.unet.state_dict()
    with torch.no_grad():
        for k, v in base_state.items():
            sd[k].copy_(v)
        for mod, f in ext.factors.items():
            sd[f"{mod}.weight"].add_(f.delta().to(sd[f"{mod}.weight"].dtype))
            if f.bias is not None:
                sd[f"{mod}.bias"].add_(f.bias)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", default="/tmp/fmt-run")
    ap.add_argument("--ranks", default="1,2,4,8,16,32,full,full+bias")
    ap.add_argument("--forget-seeds", type=int, default=16)
    ap.add_argument("--retain-seeds", type=int, default=2)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--retain-every", type=int, default=1, help="use every N-th retain row (a quicker screen)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "lora_rank.json"))
    args = ap.parse_args()
    run = Path(args.run)
    if not (run / "run.json").is_file():
        erase(config_from_preset("shape_circle"), run)
    info = read_run(run)
    concept = info["config"]["concepts"][0]["name"]
    kind = concept_kind(concept)
    pr = load_preset("shape_circle")
    with open(ROOT / "prompts" / "shapes.csv", encoding="utf-8") as fh:
        retain_rows = [r for r in csv.DictReader(fh) if r[kind] != concept][::args.retain_every]
    only = all_captions(**{"shape": None, "color": None, "fill": None, kind: concept})
    forget_prompts = only + [p for p in pr.concept.forget_prompts[::3] if p not in only]
    out = Path(args.out)
    res = json.loads(out.read_text()) if out.is_file() else {}
    setup = (str(run), args.forget_seeds, args.retain_seeds, args.retain_every)
    if (res.get("run"), res.get("forget_seeds"), res.get("retain_seeds"), res.get("retain_every")) != setup:
        res = {"run": str(run), "forget_seeds": args.forget_seeds, "retain_seeds": args.retain_seeds,
               "retain_every": args.retain_every, "retain_prompts": len(retain_rows), "concept": concept,
               "kind": kind, "run_config": {k: info["config"].get(k) for k in ("method", "steps", "mask_ratio", "lr",
                                                                               "trainable")}, "rows": {}}
    res["loadavg_start"] = os.getloadavg()
    judge = load_judge()

    def ev(pipe, name, extra):
        if name in res["rows"]:
            return
        t = time.time()
        r = evaluate(pipe, judge, concept, kind, forget_prompts, retain_rows, args.forget_seeds, args.retain_seeds,
                     args.batch)
        r.pop("forget_per_prompt", None)
        r.update(extra, eval_s=round(time.time() - t, 1), loadavg=os.getloadavg())
        res["rows"][name] = r
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(res, indent=1) + "\n")
        print(name, {k: r[k] for k in ("forget_share", "retain_acc")}, flush=True)

    ev(load_erased_pipeline(run, device="cpu"), "full weights", {})
    pipe = load_pipeline(info.get("base_model"), device="cpu")
    weights = load_run_weights(run)
    state = pipe.unet.state_dict()
    base_state = {k: state[k].clone() for k in weights}
    total = sum(float((weights[k] - base_state[k]).pow(2).sum()) for k in weights)
    for spec in args.ranks.split(","):
        name = f"rank {spec}"
        if name in res["rows"]:
            continue
        bias = spec.endswith("+bias")
        r = None if spec.startswith("full") else int(spec)
        t = time.time()
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # clamping to each layer's smallest dimension is intended here
            ext = extract_lora(pipe.unet, base_state, weights, rank=r, bias=bias)
        svd_s = time.time() - t
        err = sum(float((f.delta() - (weights[f"{m}.weight"] - base_state[f"{m}.weight"])).pow(2).sum())
                   for m, f in ext.factors.items())
        sizes = {}
        with tempfile.TemporaryDirectory() as tmp:
            for fmt in ("peft",) + (() if bias else ("kohya",)):
                p = save_lora(ext, Path(tmp) / f"{fmt}.safetensors", fmt)
                sizes[fmt] = p.stat().st_size
        apply_lora(pipe, base_state, ext)
        st = ext.stats()
        ev(pipe, name, {"file_bytes": sizes, "lora_params": st["params"], "max_rank": st["max_rank"],
                        "mean_rank": round(st["mean_rank"], 1), "svd_s": round(svd_s, 1),
                        "delta_energy_lost": (err + sum(v ** 2 for v in ext.leftover.values())) / total,
                        "leftover_tensors": len(ext.leftover)})
    apply_lora(pipe, base_state, type("NoLora", (), {"factors": {}})())
    ev(pipe, "original", {})
    res["loadavg_end"] = os.getloadavg()
    res["unet_file_bytes_fp32"] = 4 * sum(v.numel() for v in state.values())
    out.write_text(json.dumps(res, indent=1) + "\n")
    out.with_suffix(".md").write_text(table(res) + "\n")
    print(table(res))


def table(res: dict) -> str:
    kind, c = res["kind"], res["concept"]
    others = [k for k in ("shape", "color", "fill") if k != kind]
    lines = [f"SalUn run `{res['run']}` ({res['run_config']}); forget: {res['forget_seeds']} seeds x each circle prompt; "
             f"retain: {res.get('retain_prompts')} prompts/shapes.csv rows without a {c} (every "
             f"{res.get('retain_every', 1)}th) x {res['retain_seeds']} seeds; judge = models/shapes-judge. "
             f"The full UNet in float32 is {res.get('unet_file_bytes_fp32', 0) / 1e6:.1f} MB.", "",
             f"| model | sees {c} on forget prompts | retain {kind} acc | " + " | ".join(f"retain {o} acc" for o in others)
             + " | change energy lost | LoRA params | peft file | kohya file |",
             "|---|---|---|" + "---|" * len(others) + "---|---|---|---|"]
    def order(item):
        name = item[0]
        if not name.startswith("rank "):
            return (0 if name == "original" else 1, 0)
        spec = name[5:]
        return (2, int(spec) if spec.isdigit() else 10**6 + len(spec))

    for name, r in sorted(res["rows"].items(), key=order):
        fb = r.get("file_bytes", {})
        mb = {k: f"{v / 1e6:.2f} MB" for k, v in fb.items()}
        lost = f"{r['delta_energy_lost']:.1%}" if "delta_energy_lost" in r else "-"
        lines.append(f"| {name} | {r['forget_share']:.1%} | {r['retain_acc'][kind]:.1%} | "
                     + " | ".join(f"{r['retain_acc'][o]:.1%}" for o in others)
                     + f" | {lost} | {r.get('lora_params', '-')} | {mb.get('peft', '-')} | {mb.get('kohya', '-')} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
