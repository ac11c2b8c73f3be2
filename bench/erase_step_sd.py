"""One SalUn erase step at Stable Diffusion v1.4 size on this machine: time and peak memory.

Random weights with SD v1.4's UNet architecture (859,520,964 weights); a 0.5 saliency mask; one optimizer
step of remap loss (frozen-anchor forward + forward/backward) plus alpha x retain denoising loss, batch 1,
through the same code path as `erasure erase` (losses, MaskedUpdate, Adam).

    python bench/erase_step_sd.py --latent 32 --out bench/results/erase_step_sd.json
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--latent", type=int, default=32, help="Latent size (64 = 512 px, 32 = 256 px).")
    ap.add_argument("--steps", type=int, default=2, help="Steps to time (the first is reported separately).")
    ap.add_argument("--optimizer", default="adam")
    ap.add_argument("--gradient-checkpointing", action="store_true")
    ap.add_argument("--out", default="bench/results/erase_step_sd.json")
    args = ap.parse_args()
    from diffusers import DDPMScheduler

    from erasure.diffusion.losses import StepBatch, add_noise, denoise_loss, remap_loss
    from erasure.diffusion.tiny import build_sd_shaped_unet
    from erasure.masked import MaskedUpdate, make_optimizer, prepare_masked_params
    from erasure.saliency import threshold_mask

    torch.manual_seed(0)
    base = rss_gb()
    unet = build_sd_shaped_unet()
    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    unet.train()
    named = dict(unet.named_parameters())
    n = sum(p.numel() for p in named.values())
    g = torch.Generator().manual_seed(0)
    mask = threshold_mask({k: torch.rand(p.shape, generator=g) for k, p in named.items()}, 0.5)
    gc.collect()
    model_gb = rss_gb() - base
    trainable = prepare_masked_params(named, mask)
    opt, dec = make_optimizer(args.optimizer, trainable.values(), lr=1e-5)
    upd = MaskedUpdate(trainable, mask, decoupled_weight_decay=dec)
    sched = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    lat = torch.randn(1, 4, args.latent, args.latent, generator=g)
    cond = torch.randn(3, 77, 768, generator=g)
    times = []
    reset_peak()
    for step in range(args.steps):
        t0 = time.perf_counter()
        x, t, noise = add_noise(sched, lat, g)
        b = StepBatch(forget_x=x, forget_t=t, forget_noise=noise, forget_cond=cond[:1], anchor_cond=cond[1:2],
                      uncond=cond[2:3])
        loss = remap_loss(unet, b)
        rx, rt, rn = add_noise(sched, lat, g)
        loss = loss + 0.5 * denoise_loss(unet, rx, rt, rn, cond[1:2])
        loss.backward()
        upd.before_step(1e-5)
        opt.step()
        upd.after_step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
        print(f"step {step}: {times[-1]:.1f} s, peak RSS {peak_gb():.2f} GiB", flush=True)
    res = {
        "unet_weights": n, "latent": args.latent, "pixels": args.latent * 8, "optimizer": args.optimizer,
        "gradient_checkpointing": args.gradient_checkpointing, "threads": torch.get_num_threads(),
        "model_and_mask_gb": round(model_gb, 2), "step_s": [round(x, 2) for x in times],
        "peak_rss_gb": round(peak_gb(), 2), "load_avg": os.getloadavg(),
    }
    print(json.dumps(res, indent=2))
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump(res, fh, indent=2)


if __name__ == "__main__":
    main()
