"""The red problem, measured per colour: erase one colour of the embedded model with its defaults (plus an
override), then ask the shapes judge what colour every colour's prompts draw, original vs erased.

    python bench/colour_shift.py --concept red --anchor blue --tag default
    python bench/colour_shift.py --concept red --anchor blue --tag retain-on-forget \\
        --override '{"method_args": {"retain_on_forget": true}}'
    python bench/colour_shift.py --concept red --anchor blue --tag anchor-images --remap-anchor-images

Prompts: "a <colour> <shape>" for the six shapes x 4 seeds (24 images per colour, seeds 1000+). ``--anchor none``
uses "a shape" as the anchor. ``--remap-anchor-images`` gives Df as image folders: the forget prompt and its 8
paraphrases (those of the default run) on the model's images of them *and* on its images of the anchor captions,
so the remap also acts on the states a red prompt's new trajectory passes through. Each variant's run goes to
``--runs-dir/<tag>`` (Df/Dr images cached once in ``--runs-dir/cache``, so only the first variant's time includes generating them); results are appended to ``--out`` (JSON and a Markdown table beside it).
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import argparse  # noqa: E402
import collections  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

SHAPES6 = ["circle", "square", "triangle", "star", "heart", "cross"]


def colour_prompt(colour: str, shape: str | None = None) -> str:
    """"a red shape" / "an orange circle": the shapes world's own plain caption."""
    from erasure.shapes import make_caption

    return make_caption(shape=shape, color=colour, fill=None)


def colours_seen(pipe, judge, colours) -> dict[str, dict[str, int]]:
    from shapes_erasure import judge_images

    from erasure import generate

    out = {}
    for col in colours:
        ps = [colour_prompt(col, s) for s in SHAPES6 for _ in range(4)]
        q = judge_images(judge, generate(pipe, ps, [1000 + i for i in range(len(ps))], steps=25, guidance=7.5,
                                         batch_size=24))
        out[col] = dict(collections.Counter(x["color"] for x in q))
    return out


def anchor_image_spec(concept: str, anchor: str, root: Path, base, paraphrases: list[str]):
    from erasure import ConceptSpec, generate
    from erasure.auto.text import swap_word

    forgets = [colour_prompt(concept)] + paraphrases
    anchors = [swap_word(p, concept, anchor) for p in forgets]
    folders = []
    for kind, ps in (("forget", forgets), ("anchor", anchors)):
        for i, p in enumerate(ps):
            d = root / "images" / f"{kind}{i}"
            if not d.is_dir():
                tmp = d.with_name(d.name + ".tmp")
                tmp.mkdir(parents=True, exist_ok=True)
                for k, im in enumerate(generate(base, [p] * 4, [7000 + k for k in range(4)], steps=25, guidance=7.5,
                                                batch_size=4)):
                    im.save(tmp / f"{k}.png")
                tmp.replace(d)
            folders.append(str(d))
    return ConceptSpec(name=concept, forget_prompts=forgets + forgets, anchor_prompts=anchors + anchors,
                       forget_images=folders)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--concept", default="red")
    ap.add_argument("--anchor", default="blue", help="anchor colour, or none ('a shape')")
    ap.add_argument("--tag", required=True)
    ap.add_argument("--override", default="{}", help="JSON of settings on top of the model defaults")
    ap.add_argument("--remap-anchor-images", action="store_true")
    ap.add_argument("--runs-dir", default=str(ROOT / "runs" / "bench-colour-shift"))
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "colour_shift.json"))
    args = ap.parse_args()
    import torch

    torch.set_num_threads(1)
    from erasure import ConceptSpec, erase, load_erased_pipeline, load_pipeline, read_run
    from erasure.auto.defaults import default_config
    from erasure.shapes import COLORS, load_judge

    out = Path(args.out)
    res = json.loads(out.read_text()) if out.is_file() else {"variants": {}}
    judge, base = load_judge(), load_pipeline("default")
    if "original" not in res:
        res["original"] = colours_seen(base, judge, COLORS)
    root = Path(args.runs_dir) / args.tag
    run = root / "run"
    override = json.loads(args.override)
    if args.remap_anchor_images:
        ref = Path(args.runs_dir) / "default" / "run"
        if not (ref / "run.json").is_file():
            raise SystemExit("run the 'default' variant first (its forget paraphrases are reused)")
        para = read_run(ref)["auto"]["concepts"][args.concept]["forget_paraphrases"]["prompts"]
        spec = anchor_image_spec(args.concept, args.anchor, root, base, para)
    else:
        anchor = "a shape" if args.anchor == "none" else colour_prompt(args.anchor)
        spec = ConceptSpec(name=args.concept, forget_prompts=[colour_prompt(args.concept)], anchor_prompts=[anchor])
    cfg, _ = default_config(concepts=[spec], cache_dir=str(Path(args.runs_dir) / "cache"), **override)
    if not (run / "run.json").is_file():
        erase(cfg, run, overwrite=True)
    seen = colours_seen(load_erased_pipeline(run), judge, COLORS)
    info = read_run(run)
    res["variants"][args.tag] = {"concept": args.concept, "anchor": args.anchor, "override": override,
                                 "remap_anchor_images": args.remap_anchor_images, "seen": seen,
                                 "timing_s": info["timing_s"]}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(res, indent=1))
    tmp.replace(out)
    out.with_suffix(".md").write_text(table(res))
    print(table(res))


def table(res: dict) -> str:
    cols = list(res["original"])
    lines = ["What the judge calls each colour's prompts (6 shapes x 4 seeds = 24 images per colour): images drawn in "
             "the prompt's colour, and where the rest went.", "",
             "| variant | erased -> anchor | " + " | ".join(cols) + " |", "|---" * (len(cols) + 2) + "|"]

    def cell(col, d):
        n = d.get(col, 0)
        rest = ", ".join(f"{k} {v}" for k, v in sorted(d.items(), key=lambda kv: -kv[1]) if k != col)
        return f"{n}/24" + (f" ({rest})" if rest else "")

    lines.append("| original | - | " + " | ".join(cell(c, res["original"][c]) for c in cols) + " |")
    for tag, v in res["variants"].items():
        lines.append(f"| {tag} | {v['concept']} -> {v['anchor']} | " + " | ".join(cell(c, v["seen"][c]) for c in cols) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
