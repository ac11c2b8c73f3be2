"""Saliency-mask thresholding at SD v1.4 UNet size: time and peak memory, against the reference argsort.

The reference SalUn code concatenates all gradients, argsorts them twice and builds int64 masks. We run
both on the same random scores at ``1/--reduce`` of the size (the reference needs ~37 GB at full size),
check they keep the same weights, and then time our histogram selection alone at full size.

    python bench/mask_threshold.py --reduce 16 --out bench/results/mask_threshold.json
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from _mem import peak_gb, reset_peak, rss_gb  # noqa: E402

from erasure.saliency import threshold_mask  # noqa: E402


def sd14_shapes() -> dict[str, tuple[int, ...]]:
    from diffusers import UNet2DConditionModel

    from erasure.diffusion.tiny import SD14_UNET_CONFIG

    with torch.device("meta"):
        unet = UNet2DConditionModel(**SD14_UNET_CONFIG)
    return {n: tuple(p.shape) for n, p in unet.named_parameters()}


def reference_threshold(gradients: dict[str, torch.Tensor], ratio: float) -> dict[str, torch.Tensor]:
    """The reference implementation (OPTML-Group/Unlearn-Saliency, generate_mask.py), verbatim in logic."""
    all_elements = -torch.cat([t.flatten() for t in gradients.values()])
    threshold_index = int(len(all_elements) * ratio)
    positions = torch.argsort(all_elements)
    ranks = torch.argsort(positions)
    out, start = {}, 0
    for key, tensor in gradients.items():
        n = tensor.numel()
        tr = ranks[start : start + n]
        m = torch.zeros_like(tr)
        m[tr < threshold_index] = 1
        out[key] = m.reshape(tensor.shape)
        start += n
    return out


def make_scores(shapes, reduce: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for n, s in shapes.items():
        numel = max(1, int(torch.tensor(s).prod()) // reduce)
        out[n] = torch.randn(numel, generator=g).abs_()
    return out


def measure(fn, *args):
    gc.collect()
    base = rss_gb()
    reset_peak()
    t = time.perf_counter()
    res = fn(*args)
    dt = time.perf_counter() - t
    return res, dt, peak_gb() - base


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reduce", type=int, default=16, help="Size divisor for the side-by-side comparison.")
    ap.add_argument("--ratio", type=float, default=0.5, help="Mask ratio.")
    ap.add_argument("--skip-full", action="store_true", help="Skip the full-size run.")
    ap.add_argument("--out", default="bench/results/mask_threshold.json")
    args = ap.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    shapes = sd14_shapes()
    total = sum(int(torch.tensor(s).prod()) for s in shapes.values())
    res = {"unet_weights": total, "ratio": args.ratio, "threads": torch.get_num_threads(),
           "load_avg_start": os.getloadavg()}

    small = make_scores(shapes, args.reduce)
    n_small = sum(v.numel() for v in small.values())
    ours, t_ours, m_ours = measure(threshold_mask, small, args.ratio)
    ref, t_ref, m_ref = measure(reference_threshold, small, args.ratio)
    same = all(torch.equal(ours[k], ref[k].bool()) for k in small)
    res["reduced"] = {
        "weights": n_small, "ours_s": round(t_ours, 3), "ours_peak_extra_gb": round(m_ours, 3),
        "reference_s": round(t_ref, 3), "reference_peak_extra_gb": round(m_ref, 3),
        "speedup": round(t_ref / t_ours, 2), "memory_ratio": round(m_ref / max(m_ours, 1e-6), 1),
        "same_mask": same,
    }
    print(json.dumps(res["reduced"], indent=2))
    del small, ours, ref
    gc.collect()
    if not args.skip_full:
        full = make_scores(shapes, 1)
        scores_gb = sum(v.numel() * 4 for v in full.values()) / 1024**3
        mask, t_full, m_full = measure(threshold_mask, full, args.ratio)
        kept = sum(int(m.sum()) for m in mask.values())
        res["full"] = {"weights": total, "scores_gb": round(scores_gb, 3), "ours_s": round(t_full, 2),
                       "ours_peak_extra_gb": round(m_full, 3), "mask_bool_gb": round(total / 1024**3, 3),
                       "kept": kept, "kept_exact": kept == round(args.ratio * total),
                       "reference_extrapolated_gb": round(m_ref * args.reduce, 1)}
        print(json.dumps(res["full"], indent=2))
    res["load_avg_end"] = os.getloadavg()
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump(res, fh, indent=2)


if __name__ == "__main__":
    main()
