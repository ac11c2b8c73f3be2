"""Memory model of the saliency mask and the masked fine-tune, per backbone family (computed, no model loaded).

Bytes per weight: fp32 weights 4, bf16 weights 2; saliency scores accumulated in post-accumulate-grad hooks in
bf16 2 (fp32 4; before the hooks: a full fp32 gradient set, 4); the boolean mask 1 while thresholding (1/8 on disk);
gradients while training 4 (fp32); optimizer state per trained weight: AdamW fp32 8 (two moments), AdamW bf16 4,
8-bit Adam 2. The optimizer columns count states for the masked weights only (ratio x P); torch optimizers as used
today allocate dense states for every tensor the mask touches, which at ratios 0.1-0.5 is ~all of them (99.1% of
the weights on the SDXL-shaped mask at 0.5), so today's cost is the ratio-1.0 column.

    python bench/memory_model.py [--measured bench/results/mask_memory.json] > bench/results/memory_model.md
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

GIB = 1024**3
FAMILIES = {  # denoiser parameters (counted from the diffusers configs on the meta device)
    "SD v1.4 UNet": 859_520_964,
    "SDXL UNet": 2_567_463_684,
    "SD3-medium transformer": 2_028_328_000,
    "FLUX.1 transformer": 11_901_408_320,
}
RATIOS = (0.1, 0.5, 1.0)
OPTIMIZERS = {"AdamW fp32": 8, "AdamW bf16": 4, "8-bit Adam": 2}
CARDS = (24, 48, 80)
HEADROOM_GIB = 3.0  # activations at 256-512 px batch 1 + CUDA context, a rough allowance (see the measured row)


def g(x: float) -> str:
    return f"{x / GIB:.1f}"


def fits(total: float) -> str:
    return " ".join(f"{c}" for c in CARDS if total / GIB + HEADROOM_GIB <= c * 1e9 / GIB) or "none"


def table() -> str:
    lines = ["| denoiser | params | weights fp32 / bf16 | scores bf16 (fp32) | full fp32 grads (before) | bool mask | "
             + " | ".join(f"{o} r={r}" for o in OPTIMIZERS for r in RATIOS) + " |",
             "|---|---|---|---|---|---|" + "---|" * (len(OPTIMIZERS) * len(RATIOS))]
    for name, p in FAMILIES.items():
        lines.append(f"| {name} | {p / 1e9:.2f} B | {g(4 * p)} / {g(2 * p)} | {g(2 * p)} ({g(4 * p)}) | {g(4 * p)} | "
                     f"{g(p)} | " + " | ".join(g(b * r * p) for b in OPTIMIZERS.values() for r in RATIOS) + " |")
    lines += ["", "All figures GiB. What fits (denoiser only; text encoders freed or offloaded after encoding; "
              f"{HEADROOM_GIB:.0f} GiB allowed for activations and the CUDA context), cards in GB:", "",
              "| denoiser | mask, fp32 weights + bf16 scores | mask, bf16 weights + bf16 scores | "
              "train fp32 + AdamW fp32 (r=0.5 / dense) | train fp32 + 8-bit Adam (r=0.5 / dense) | "
              "train bf16 + AdamW bf16 (r=0.5 / dense) |", "|---|---|---|---|---|---|"]
    for name, p in FAMILIES.items():
        m32, m16 = 4 * p + 2 * p, 2 * p + 2 * p  # the bool mask replaces the scores tensor by tensor
        tr = {o: [w * p + w * p + b * r * p for r in (0.5, 1.0)] for o, b, w in
              (("a", 8, 4), ("8", 2, 4), ("b", 4, 2))}
        cell = lambda t: f"{g(t)} GiB: {fits(t)}"  # noqa: E731
        lines.append(f"| {name} | {cell(m32)} | {cell(m16)} | "
                     + " | ".join(f"{g(v[0])} / {g(v[1])} GiB: {fits(v[0])} / {fits(v[1])}" for v in tr.values()) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--measured", default=None, help="mask_memory.json to set beside the model")
    args = ap.parse_args()
    print(table())
    if args.measured and Path(args.measured).is_file():
        m = json.loads(Path(args.measured).read_text())
        p = m["unet_params"]
        model = (4 * p + 2 * p) / GIB
        print(f"\nMeasured (bench/mask_memory.py, CPU, `erasure mask`, {p:,} UNet weights, {m['resolution']} px, batch "
              f"{m.get('batch_size', 8)}, {m.get('score_dtype', 'auto')} scores): peak RSS {m['peak_rss_gb']:.2f} GiB; "
              f"the model's fp32 weights + 16-bit scores = {model:.2f} GiB, so activations, the Python process and "
              f"allocator slack add {m['peak_rss_gb'] - model:.2f} GiB.")


if __name__ == "__main__":
    main()
