"""Peak memory of a saliency mask on an SDXL-shaped pipeline with random weights (CPU).

Builds, in code, a StableDiffusionXLPipeline folder with SDXL's architecture (UNet 2,567,463,684 weights,
CLIP-L and OpenCLIP-bigG text encoders, the SDXL VAE; random weights, float32, on disk under /tmp), then
in a fresh child process computes the mask at 256 px with one forget image and two sampling steps and
reports the child's peak RSS (VmHWM: the whole process, prompt encoding and Df generation included).

Two engine paths:
- ``--path cli``: ``erasure mask --model FOLDER ...`` (needs the SDXL family of the backbone layer);
- ``--path lowlevel``: the same phases written out here against :func:`erasure.saliency.accumulate_gradients`
  and :func:`erasure.saliency.threshold_mask` (encode with both CLIPs, free them; generate Df with 2 DDIM
  steps, decode/encode through the VAE, free it; score the UNet with bf16 buffers; threshold; save).

Full size needs about 20 GB: run it alone, under the machine-wide lock::

    flock /tmp/bigmem.lock python bench/mask_memory.py --folder /tmp/fmt-sdxl --out bench/results/mask_memory.json

``--scale 0.5`` halves every width (about a quarter of the weights) to check the script on a busy machine.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(__file__))
from _mem import peak_gb, rss_gb  # noqa: E402

SDXL_UNET_PARAMS = 2_567_463_684


def _w(c: int, scale: float, q: int) -> int:
    return max(q, int(round(c * scale / q)) * q)


def sdxl_unet_config(scale: float = 1.0) -> dict:
    """SDXL base 1.0's UNet configuration; ``scale`` multiplies the widths (multiples of 160 stay valid)."""
    ch = tuple(_w(c, scale, 160) for c in (320, 640, 1280))
    return dict(
        sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=ch,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20),
        cross_attention_dim=_w(768, scale, 64) + _w(1280, scale, 64), use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=_w(1280, scale, 64) + 6 * 256,
    )


def build_folder(folder: Path, scale: float) -> None:
    """Write an SDXL-shaped pipeline folder, one component at a time (peak about one component)."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from erasure.tokenizer import build_clip_tokenizer

    folder.mkdir(parents=True, exist_ok=True)
    index = {"_class_name": "StableDiffusionXLPipeline", "_diffusers_version": "0.30.0",
             "force_zeros_for_empty_prompt": True, "feature_extractor": [None, None], "image_encoder": [None, None],
             "scheduler": ["diffusers", "DDIMScheduler"], "text_encoder": ["transformers", "CLIPTextModel"],
             "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
             "tokenizer": ["transformers", "CLIPTokenizer"], "tokenizer_2": ["transformers", "CLIPTokenizer"],
             "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"]}
    (folder / "model_index.json").write_text(json.dumps(index, indent=1))
    DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                  set_alpha_to_one=False, steps_offset=1, timestep_spacing="leading").save_pretrained(folder / "scheduler")
    for name in ("tokenizer", "tokenizer_2"):
        build_clip_tokenizer(folder / name)
    torch.manual_seed(0)
    common = dict(bos_token_id=49406, eos_token_id=49407, pad_token_id=49407, vocab_size=49408,
                  max_position_embeddings=77, layer_norm_eps=1e-5)
    h1, h2 = _w(768, scale, 64), _w(1280, scale, 64)
    te = CLIPTextModel(CLIPTextConfig(hidden_size=h1, intermediate_size=4 * h1, num_attention_heads=max(1, h1 // 64),
                                      num_hidden_layers=12, hidden_act="quick_gelu", projection_dim=h1, **common))
    te.save_pretrained(folder / "text_encoder", max_shard_size="2GB")
    del te
    te2 = CLIPTextModelWithProjection(CLIPTextConfig(
        hidden_size=h2, intermediate_size=4 * h2, num_attention_heads=max(1, h2 // 64), num_hidden_layers=32,
        hidden_act="gelu", projection_dim=h2, **common))
    te2.save_pretrained(folder / "text_encoder_2", max_shard_size="2GB")
    del te2
    gc.collect()
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, sample_size=1024, scaling_factor=0.13025,
                        block_out_channels=tuple(_w(c, scale, 32) for c in (128, 256, 512, 512)),
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        layers_per_block=2, force_upcast=True)
    vae.save_pretrained(folder / "vae", max_shard_size="2GB")
    del vae
    unet = UNet2DConditionModel(**sdxl_unet_config(scale))
    n = sum(p.numel() for p in unet.parameters())
    if scale == 1.0 and n != SDXL_UNET_PARAMS:
        raise RuntimeError(f"SDXL-shaped UNet has {n:,} weights, expected {SDXL_UNET_PARAMS:,}")
    unet.save_pretrained(folder / "unet", max_shard_size="2GB")
    (folder / "bench_build.json").write_text(json.dumps({"scale": scale, "unet_params": n}))


def _stage(log: list, name: str, t0: float) -> None:
    log.append({"stage": name, "rss_gb": round(rss_gb(), 2), "peak_gb": round(peak_gb(), 2),
                "seconds": round(time.time() - t0, 1)})
    print(json.dumps(log[-1]), flush=True)


def lowlevel(folder: Path, prompt: str, resolution: int, steps: int, ratio: float, out: Path) -> list:
    """The mask phases, written out (prompt encoding, Df generation, scoring, thresholding, saving)."""
    import torch.nn.functional as F
    from diffusers import DDIMScheduler, StableDiffusionXLPipeline

    from erasure.saliency import accumulate_gradients, save_mask, threshold_mask

    log: list = []
    t0 = time.time()
    pipe = StableDiffusionXLPipeline.from_pretrained(folder, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    _stage(log, "loaded", t0)
    with torch.no_grad():
        pe, npe, pooled, npooled = pipe.encode_prompt(prompt, negative_prompt="", do_classifier_free_guidance=True)
    pipe.text_encoder = pipe.text_encoder_2 = None  # the encoders are done: free them before generating
    gc.collect()
    _stage(log, "prompts encoded, text encoders freed", t0)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        lat = pipe(prompt_embeds=pe, negative_prompt_embeds=npe, pooled_prompt_embeds=pooled,
                   negative_pooled_prompt_embeds=npooled, height=resolution, width=resolution,
                   num_inference_steps=steps, generator=g, output_type="latent").images
        sf = pipe.vae.config.scaling_factor
        img = pipe.vae.decode(lat / sf).sample.clamp(-1, 1)  # Df image, then back to latents as the engine does
        latents = pipe.vae.encode(img).latent_dist.sample(g) * sf
    pipe.vae = None
    gc.collect()
    _stage(log, "Df generated, VAE freed", t0)
    unet, sched = pipe.unet, pipe.scheduler
    del pipe
    params = dict(unet.named_parameters())
    time_ids = torch.tensor([[resolution, resolution, 0, 0, resolution, resolution]] * 2, dtype=torch.float32)
    cond = {"text_embeds": torch.cat([pooled, npooled]), "time_ids": time_ids}

    def loss(_):
        t = torch.randint(0, sched.config.num_train_timesteps, (1,), generator=g)
        noise = torch.randn(latents.shape, generator=g)
        x = sched.add_noise(latents, noise, t)
        eps = unet(torch.cat([x, x]), torch.cat([t, t]), encoder_hidden_states=torch.cat([pe, npe]),
                   added_cond_kwargs=cond).sample
        ec, eu = eps.chunk(2)
        return -F.mse_loss((1 + 7.5) * ec - 7.5 * eu, noise)

    scores = accumulate_gradients(params, [0], loss, score_dtype="auto")
    _stage(log, f"scores accumulated ({next(iter(scores.values())).dtype})", t0)
    mask = threshold_mask(scores, ratio)
    del scores
    gc.collect()
    _stage(log, "thresholded, scores freed", t0)
    save_mask(mask, out)
    _stage(log, "mask saved", t0)
    return log


def cli_with_phases(folder: Path, prompt: str, args, mask_out: Path) -> list:
    """``erasure mask`` on the folder, with the peak RSS of each phase (VmHWM read, then reset, between phases)."""
    import shutil

    from _mem import reset_peak

    import erasure.diffusion.mask as mm
    from erasure.cli import main as cli

    log: list = []
    t0 = time.time()

    def wrap(name: str, before: str | None, after: str) -> None:
        fn = getattr(mm, name)

        def wrapped(*a, **k):
            if before:
                _stage(log, before, t0)
                reset_peak()
            out = fn(*a, **k)
            _stage(log, after, t0)
            reset_peak()
            return out

        setattr(mm, name, wrapped)

    wrap("accumulate_gradients", "load, prompt encoding, Df generation (text encoders and VAE then freed)",
         "scores: forward + backward with hooks")
    wrap("threshold_mask", None, "threshold")
    cache = folder.parent / (folder.name + "-cache")
    shutil.rmtree(cache, ignore_errors=True)  # Df generation is part of the measurement
    rc = cli(["mask", "--model", str(folder), "--forget-prompt", prompt, "--forget-images-per-prompt", "1",
              "--data-steps", str(args.steps), "--resolution", str(args.resolution), "--mask-ratio", str(args.ratio),
              "--mask-score-dtype", args.score_dtype, "--batch-size", str(args.batch_size), "--out", str(mask_out), "--overwrite", "--device", "cpu",
              "--cache-dir", str(cache)])
    _stage(log, f"save mask, exit (rc={rc})", t0)
    if rc:
        raise SystemExit(f"erasure mask failed (rc={rc})")
    return log


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--folder", default="/tmp/fmt-sdxl", help="where the SDXL-shaped pipeline is built (reused)")
    ap.add_argument("--scale", type=float, default=1.0, help="width multiplier (1.0 = SDXL size)")
    ap.add_argument("--path", choices=("cli", "lowlevel"), default="cli")
    ap.add_argument("--resolution", type=int, default=256)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--ratio", type=float, default=0.5)
    ap.add_argument("--batch-size", type=int, default=1, help="mask batch (the engine's default 8 repeats the one "
                    "forget image 8 times with other noise: 8x the activations)")
    ap.add_argument("--score-dtype", default="auto", help="--mask-score-dtype (auto = bfloat16 at SDXL size)")
    ap.add_argument("--out", default=None, help="JSON results file")
    ap.add_argument("--build-only", action="store_true", help="build the folder and stop")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    folder = Path(args.folder)
    prompt = "a photo of a cat"
    mask_out = folder.parent / (folder.name + "-mask.safetensors")
    if args.child:  # the measured process
        if args.path == "lowlevel":
            log = lowlevel(folder, prompt, args.resolution, args.steps, args.ratio, mask_out)
        else:
            log = cli_with_phases(folder, prompt, args, mask_out)
        print("RESULT " + json.dumps({"peak_rss_gb": max(s["peak_gb"] for s in log), "stages": log}), flush=True)
        return
    meta = folder / "bench_build.json"
    if not (meta.is_file() and json.loads(meta.read_text())["scale"] == args.scale):
        t = time.time()
        subprocess.run([sys.executable, "-c", f"import sys; sys.path.insert(0, {os.path.dirname(__file__)!r}); "
                        f"from mask_memory import build_folder; from pathlib import Path; "
                        f"build_folder(Path({str(folder)!r}), {args.scale})"], check=True)
        print(f"built {folder} in {time.time() - t:.0f} s", flush=True)
    built = json.loads(meta.read_text())
    if args.build_only:
        return
    t = time.time()
    cmd = [sys.executable, __file__, "--child", "--folder", str(folder), "--scale", str(args.scale), "--path",
           args.path, "--resolution", str(args.resolution), "--steps", str(args.steps), "--ratio", str(args.ratio),
           "--score-dtype", args.score_dtype, "--batch-size", str(args.batch_size)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    sys.stderr.write(proc.stderr[-3000:])
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode or not lines:
        print(proc.stdout[-3000:])
        raise SystemExit(f"measured process failed (rc={proc.returncode})")
    res = json.loads(lines[-1][7:])
    res.update({"path": args.path, "scale": args.scale, "score_dtype": args.score_dtype, "batch_size": args.batch_size, "unet_params": built["unet_params"],
                "resolution": args.resolution, "steps": args.steps, "ratio": args.ratio,
                "wall_s": round(time.time() - t, 1), "loadavg": open("/proc/loadavg").read().split()[:3],
                "torch": torch.__version__})
    print(json.dumps(res, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=1) + "\n")


if __name__ == "__main__":
    main()
