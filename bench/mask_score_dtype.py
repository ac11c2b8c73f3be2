"""Does accumulating saliency scores in 16 bits change the mask? Compared with the plain p.grad sum.

For the tiny random pipeline and the embedded shapes model (``shape_circle`` preset, its Df), computes the
scores once the old way (sum ``p.grad`` over the forget batches in float32, no hooks) and with the
post-accumulate-grad hooks of :func:`erasure.saliency.accumulate_gradients` in float32, bfloat16 and float16,
thresholds each at several ratios and counts the mask entries that differ from the old mask.

    python bench/mask_score_dtype.py --out bench/results/mask_score_dtype.json
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile

import torch

import erasure.diffusion.mask as mask_mod
from erasure.presets import config_from_preset
from erasure.saliency import accumulate_gradients, threshold_mask


def reference_accumulate(params, batches, loss_fn, progress=None, mode="abs_of_sum", total=None, score_dtype=None):
    """The accumulation before the hooks: backward into p.grad for every batch, then |sum| in float32."""
    assert mode == "abs_of_sum"
    for p in params.values():
        p.grad = None
    for b in batches:
        loss_fn(b).backward()
    out = {}
    for n, p in params.items():
        out[n] = p.grad.detach().float().abs() if p.grad is not None else torch.zeros(p.shape)
        p.grad = None
    return out


def scores_with(inputs, cfg, fn, **kw):
    captured = {}

    def capture(*a, **k):
        k.update(kw)
        s = fn(*a, **k)
        captured.update(s)
        return s

    old = mask_mod.accumulate_gradients
    mask_mod.accumulate_gradients = capture
    try:
        mask_mod.compute_mask_from_data(inputs.pipe.unet, inputs.pipe.scheduler, inputs.data, cfg, cfg.seed,
                                        cfg.batch_size, "full")
    finally:
        mask_mod.accumulate_gradients = old
    return captured


def compare(name: str, cfg, ratios) -> dict:
    from erasure.diffusion.train import _with_images, load_inputs

    inputs = load_inputs(cfg, _with_images(cfg.spec), "cpu")
    ref = scores_with(inputs, cfg, reference_accumulate)
    total = sum(s.numel() for s in ref.values())
    row = {"model": name, "scored_weights": total, "forget_images": int(inputs.data.forget_latents.shape[0]),
           "batches": -(-int(inputs.data.forget_latents.shape[0]) // cfg.batch_size), "results": []}
    ref_masks = {r: threshold_mask(ref, r) for r in ratios}
    for dt in ("float32", "bfloat16", "float16"):
        s = scores_with(inputs, cfg, accumulate_gradients, score_dtype=dt)
        exact = all(torch.equal(s[n].float(), ref[n]) for n in ref)
        for r in ratios:
            m = threshold_mask(s, r)
            diff = sum(int((m[n] != ref_masks[r][n]).sum()) for n in ref)
            kept = sum(int(ref_masks[r][n].sum()) for n in ref)
            row["results"].append({"score_dtype": dt, "ratio": r, "scores_bit_identical": exact,
                                   "entries_differing": diff, "kept": kept, "differing_over_kept": diff / kept})
            print(name, dt, r, "identical scores" if exact else "", f"{diff} differ of {kept} kept", flush=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench/results/mask_score_dtype.json")
    ap.add_argument("--ratios", type=float, nargs="+", default=[0.1, 0.5])
    ap.add_argument("--images", type=int, default=2, help="Df images per forget prompt (embedded model)")
    args = ap.parse_args()
    from erasure.diffusion.tiny import build_tiny_pipeline

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        build_tiny_pipeline(os.path.join(tmp, "tiny"))
        cache = os.path.join(tmp, "cache")
        tiny = config_from_preset("shape_circle", model=os.path.join(tmp, "tiny"), forget_images_per_prompt=1,
                                  data_steps=2, cache_dir=cache)
        rows.append(compare("tiny", tiny, args.ratios))
        emb = config_from_preset("shape_circle", forget_images_per_prompt=args.images, cache_dir=cache)
        rows.append(compare("shapes (embedded)", emb, args.ratios))
    with open(args.out, "w") as f:
        json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
