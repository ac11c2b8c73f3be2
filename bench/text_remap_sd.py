"""text-remap at Stable Diffusion v1.4 size: time and peak memory of the mask pass and of one iteration.

Random weights with SD v1.4's text encoder architecture (CLIP ViT-L/14 text tower: 12 layers, 768 wide, 123 M
weights), SD's tokenizer (built offline), the prompt counts of an automatic run (9 forget prompts with their anchors,
the empty prompt + 32 retain + 36 neighbour prompts preserved), mask ratio 0.5; the method's own functions
(``remap_targets``, ``text_saliency_mask``, the loss) and the engine's masked Adam. Beside it, for scale, the
SalUn step at the same size is ``bench/erase_step_sd.py`` (the UNet, batch 1).

    python bench/text_remap_sd.py --out bench/results/text_remap_sd.json            # CPU
    python bench/text_remap_sd.py --device cuda --iterations 20 --out ...            # a GPU
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
from _mem import peak_gb, reset_peak  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--iterations", type=int, default=2, help="Iterations to time (the first is reported apart).")
    ap.add_argument("--forget", type=int, default=9)
    ap.add_argument("--preserve", type=int, default=69, help="Preserve prompts (the empty prompt included).")
    ap.add_argument("--mask-ratio", type=float, default=0.5)
    ap.add_argument("--out", default="bench/results/text_remap_sd.json")
    args = ap.parse_args()
    from transformers import CLIPTextConfig, CLIPTextModel

    from erasure.diffusion.methods.text_remap import TextRemapConfig, _losses, remap_targets, text_saliency_mask
    from erasure.masked import MaskedUpdate, make_optimizer, prepare_masked_params
    from erasure.shapes import all_captions
    from erasure.tokenizer import build_clip_tokenizer

    torch.manual_seed(0)
    dev = torch.device(args.device)
    cfg = CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                         num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu",
                         projection_dim=768)
    te = CLIPTextModel(cfg).to(dev).eval().requires_grad_(False)
    tok = build_clip_tokenizer()
    from erasure.shapes import COLORS, FILLS, SHAPES

    pool = [c for s in SHAPES for col in COLORS if (s, col) != ("star", "blue") for c in all_captions(s, col, None)]
    forget = [c for f in (None, *FILLS) for c in all_captions("star", "blue", f)][: args.forget]
    guide = [f.replace("star", "heart") for f in forget]
    preserve = [""] + pool[: args.preserve - 1]
    margs = TextRemapConfig()
    reset_peak()
    t0 = time.time()
    e_ids, span, targets, p_ids, keep = remap_targets(te, tok, forget, guide, preserve, dev)
    t_targets = time.time() - t0
    t0 = time.time()
    mask = text_saliency_mask(te, e_ids, span, targets, args.mask_ratio)
    t_mask = time.time() - t0
    named = {n: p for n, p in te.named_parameters() if n in mask}
    te.requires_grad_(False)
    trainable = prepare_masked_params(named, {n: mask[n].to(dev) for n in named})
    opt, _ = make_optimizer("adam", trainable.values(), lr=margs.learning_rate)
    upd = MaskedUpdate(trainable, {n: mask[n].to(dev) for n in trainable})
    weights = torch.ones(len(preserve))
    idx = torch.arange(len(preserve))
    te.train()
    times = []
    for _ in range(args.iterations):
        t0 = time.time()
        parts = _losses(te, e_ids, span, targets, p_ids, keep, weights, idx, margs)
        parts["loss"].backward()
        upd.mask_gradients()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        times.append(round(time.time() - t0, 2))
    rec = {
        "text_encoder_weights": sum(p.numel() for p in te.parameters()),
        "trainable_weights": sum(p.numel() for p in named.values()),
        "mask_ratio": args.mask_ratio, "device": str(dev), "threads": torch.get_num_threads(),
        "forget_prompts": len(forget), "preserve_prompts": len(preserve), "span_tokens": int(span.sum()),
        "targets_s": round(t_targets, 2), "mask_s": round(t_mask, 2), "iteration_s": times,
        "peak_rss_gb": round(peak_gb(), 2), "load_avg": list(os.getloadavg()),
    }
    if dev.type == "cuda":
        rec["peak_cuda_gb"] = round(torch.cuda.max_memory_allocated() / 1024**3, 2)
    rec["estimate_1000_iterations_s"] = round(1000 * times[-1] + t_mask + t_targets)
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    tmp = args.out + ".tmp"
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(rec, fh, indent=1)
    os.replace(tmp, args.out)
    print(json.dumps(rec, indent=1))


if __name__ == "__main__":
    main()
