"""Train the embedded shapes text-to-image model: ``python -m erasure.shapes.train_model --config cfg.json``.

Three resumable stages, all on CPU, outputs and checkpoints under ``work_dir`` (``models/_train/sd``):

1. **VAE** -- a small ``AutoencoderKL`` (downsample factor 4: 64x64x3 -> 16x16x4) trained on rendered images
   with MSE + L1 + a tiny KL term.
2. **Latents** -- the whole rendered training set encoded once (posterior mean); ``scaling_factor`` = 1/std.
3. **Diffusion** -- a small ``UNet2DConditionModel`` and a small ``CLIPTextModel`` (real CLIP BPE tokenizer)
   trained jointly from scratch with the epsilon-prediction DDPM loss (min-SNR weighting), random captions from
   :class:`~erasure.shapes.captions.CaptionSampler` (10% empty, for classifier-free guidance), and EMA weights.

The final pipeline (EMA weights, DDIM scheduler, no safety checker) is written to a temporary folder beside
``out_dir`` and renamed into place, so ``StableDiffusionPipeline.from_pretrained(out_dir)`` never sees a
half-written folder. Checkpoints are safetensors + JSON; a killed run continues from the last checkpoint.

Set ``OMP_WAIT_POLICY=PASSIVE`` in the environment when the CPU is shared (see ``models/shapes-sd/README.md``).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from erasure.jsonconfig import JsonConfig, add_config_arguments, config_from_args, field
from erasure.shapes.captions import CaptionSampler
from erasure.shapes.data import SEED_BASES, load_or_render_dataset
from erasure.shapes.render import COLORS, FILLS, SHAPES

logger = logging.getLogger(__name__)

__all__ = ["ShapesModelConfig", "build_vae", "build_unet", "build_text_encoder", "build_scheduler", "train", "main"]


@dataclass
class ShapesModelConfig(JsonConfig):
    """Settings of ``python -m erasure.shapes.train_model`` (every field is also a ``--flag``).

    Args:
        out_dir (`str`, defaults to `"models/shapes-sd"`): final pipeline folder.
        work_dir (`str`, defaults to `"models/_train/sd"`): checkpoints, latents and logs.
        seed (`int`, defaults to 0): seed of initialisation, batches, noise and captions.
        threads (`int`, defaults to 2): torch CPU threads.
        n_images (`int`, defaults to 48000): rendered training images (seeds 0..n_images-1).
        image_size (`int`, defaults to 64): image resolution in pixels.
        vae_channels (`list[int]`, defaults to `[16, 32, 64]`): VAE block widths (3 blocks = factor 4).
        vae_steps, vae_batch_size, vae_lr, vae_kl_weight: VAE optimisation.
        text_hidden_size, text_layers, text_heads: CLIP text encoder size (vocab 49408, 77 positions).
        unet_channels (`list[int]`, defaults to `[64, 96, 96]`): UNet block widths; cross-attention in all but
            the first block.
        unet_attention_heads (`int`, defaults to 8): attention heads in the UNet transformer blocks.
        steps, batch_size, lr, warmup_steps, ema_decay, snr_gamma: diffusion optimisation.
        beta_schedule, beta_start, beta_end: noise schedule (1000 training timesteps).
        p_empty, p_drop_shape, p_drop_color, p_drop_fill, p_color_first: caption sampling.
        checkpoint_every, log_every: checkpoint and log intervals (steps).
    """

    out_dir: str = field("models/shapes-sd", help="final pipeline folder")
    work_dir: str = field("models/_train/sd", help="checkpoints, latents and logs")
    seed: int = field(0, help="seed of initialisation, batches, noise and captions")
    threads: int = field(2, help="torch CPU threads")
    n_images: int = field(48000, help="rendered training images (seeds 0..n_images-1)")
    image_size: int = field(64, help="image resolution in pixels")
    vae_channels: list[int] = field(default_factory=lambda: [16, 32, 64], help="VAE block widths (3 = factor 4)")
    vae_steps: int = field(1500, help="VAE training steps")
    vae_batch_size: int = field(16, help="VAE batch size")
    vae_lr: float = field(1e-3, help="VAE peak learning rate (cosine decay)")
    vae_kl_weight: float = field(1e-6, help="weight of the KL term in the VAE loss")
    text_hidden_size: int = field(64, help="CLIP text encoder width (= UNet cross_attention_dim)")
    text_layers: int = field(2, help="CLIP text encoder layers")
    text_heads: int = field(4, help="CLIP text encoder attention heads")
    unet_channels: list[int] = field(default_factory=lambda: [64, 96, 96], help="UNet block widths")
    unet_attention_heads: int = field(8, help="attention heads in the UNet transformer blocks")
    steps: int = field(3000, help="diffusion training steps (UNet + text encoder)")
    batch_size: int = field(64, help="diffusion batch size")
    lr: float = field(6e-4, help="diffusion peak learning rate (linear warmup, cosine decay to 10%)")
    warmup_steps: int = field(150, help="learning-rate warmup steps")
    ema_decay: float = field(0.998, help="EMA decay of the saved weights (with warmup (1+s)/(10+s))")
    snr_gamma: float = field(5.0, help="min-SNR loss weighting gamma (0 = plain MSE)")
    beta_schedule: str = field("scaled_linear", help="noise schedule", choices=["linear", "scaled_linear"])
    beta_start: float = field(0.00085, help="first beta")
    beta_end: float = field(0.012, help="last beta")
    p_empty: float = field(0.1, help="probability of the empty caption (classifier-free guidance)")
    p_drop_shape: float = field(0.2, help="probability the shape word becomes 'shape'")
    p_drop_color: float = field(0.25, help="probability the colour word is dropped")
    p_drop_fill: float = field(0.4, help="probability the fill word is dropped")
    p_color_first: float = field(0.2, help="probability of '[color] [fill] noun' word order")
    shape_weights: dict[str, float] = field(
        default_factory=dict,
        help="diffusion sampling weight per shape, e.g. {\"square\": 2}; unnamed shapes weigh 1 (empty = uniform)",
    )
    checkpoint_every: int = field(250, help="checkpoint interval (steps) of both training stages")
    log_every: int = field(25, help="log interval (steps)")

    def __post_init__(self) -> None:
        for name in ("threads", "n_images", "vae_steps", "vae_batch_size", "text_hidden_size", "text_layers",
                     "text_heads", "unet_attention_heads", "steps", "batch_size", "checkpoint_every", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.image_size % 4 or self.image_size < 16:
            raise ValueError(f"image_size must be a multiple of 4 and >= 16, got {self.image_size}")
        if len(self.vae_channels) != 3:
            raise ValueError(f"vae_channels must have 3 entries (downsample factor 4), got {self.vae_channels}")
        if len(self.unet_channels) < 2:
            raise ValueError(f"unet_channels needs at least 2 entries, got {self.unet_channels}")
        if self.text_hidden_size % self.text_heads:
            raise ValueError("text_hidden_size must be divisible by text_heads")
        for name in ("lr", "vae_lr", "beta_start", "beta_end"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if not 0 <= self.ema_decay < 1:
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay}")
        if self.warmup_steps < 0 or self.snr_gamma < 0 or self.vae_kl_weight < 0:
            raise ValueError("warmup_steps, snr_gamma and vae_kl_weight must be >= 0")
        if self.beta_schedule not in ("linear", "scaled_linear"):
            raise ValueError(f"beta_schedule must be 'linear' or 'scaled_linear', got {self.beta_schedule!r}")
        for name, w in self.shape_weights.items():
            if name not in SHAPES:
                raise ValueError(f"shape_weights: unknown shape {name!r}; choose from {list(SHAPES)}")
            if not w > 0:
                raise ValueError(f"shape_weights[{name!r}] must be > 0, got {w}")
        CaptionSampler(self.p_drop_shape, self.p_drop_color, self.p_drop_fill, self.p_color_first, self.p_empty)


# ----------------------------------------------------------------------------------------------- components


def build_vae(cfg: ShapesModelConfig):
    """Small ``AutoencoderKL``: 3 blocks (factor 4), one resnet per block, no mid-block attention."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3, out_channels=3, block_out_channels=tuple(cfg.vae_channels),
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
        layers_per_block=1, latent_channels=4, norm_num_groups=8, sample_size=cfg.image_size,
        mid_block_add_attention=False,
    )


def build_unet(cfg: ShapesModelConfig):
    """Small ``UNet2DConditionModel`` on ``image_size/4`` latents; cross-attention in all blocks but the first."""
    from diffusers import UNet2DConditionModel

    n = len(cfg.unet_channels)
    return UNet2DConditionModel(
        sample_size=cfg.image_size // 4, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=tuple(cfg.unet_channels),
        down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (n - 1),
        up_block_types=("CrossAttnUpBlock2D",) * (n - 1) + ("UpBlock2D",),
        cross_attention_dim=cfg.text_hidden_size, attention_head_dim=cfg.unet_attention_heads, norm_num_groups=16,
    )


def build_text_encoder(cfg: ShapesModelConfig):
    """Small ``CLIPTextModel`` with SD's vocabulary (49408 tokens), 77 positions and special token ids."""
    from transformers import CLIPTextConfig, CLIPTextModel

    return CLIPTextModel(
        CLIPTextConfig(
            vocab_size=49408, hidden_size=cfg.text_hidden_size, intermediate_size=4 * cfg.text_hidden_size,
            num_hidden_layers=cfg.text_layers, num_attention_heads=cfg.text_heads, max_position_embeddings=77,
            projection_dim=cfg.text_hidden_size, hidden_act="quick_gelu", layer_norm_eps=1e-5,
            bos_token_id=49406, eos_token_id=49407, pad_token_id=49407,
        )
    )


def build_scheduler(cfg: ShapesModelConfig, kind: str = "ddpm"):
    """``DDPMScheduler`` (training) or ``DDIMScheduler`` (shipped for inference), 1000 timesteps."""
    from diffusers import DDIMScheduler, DDPMScheduler

    common = dict(num_train_timesteps=1000, beta_start=cfg.beta_start, beta_end=cfg.beta_end,
                  beta_schedule=cfg.beta_schedule, clip_sample=False, prediction_type="epsilon")
    if kind == "ddpm":
        return DDPMScheduler(**common)
    return DDIMScheduler(**common, set_alpha_to_one=False, steps_offset=1, timestep_spacing="trailing")


# ----------------------------------------------------------------------------------------------- checkpoints


def _save_ckpt(path: Path, modules: dict[str, Any], opt: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    from erasure.io import atomic_save_safetensors, atomic_write_json

    tensors: dict[str, torch.Tensor] = {}
    for prefix, mod in modules.items():
        sd = mod.state_dict() if hasattr(mod, "state_dict") else mod
        for k, v in sd.items():
            tensors[f"{prefix}.{k}"] = v
    opt_sd = opt.state_dict()
    for pid, st in opt_sd["state"].items():
        for k, v in st.items():
            tensors[f"opt.{pid}.{k}"] = v if torch.is_tensor(v) else torch.tensor(v)
    atomic_save_safetensors(tensors, path.with_suffix(".safetensors"))
    atomic_write_json(path.with_suffix(".json"), {**state, "param_groups": opt_sd["param_groups"]})


def _load_ckpt(path: Path, modules: dict[str, Any], opt: torch.optim.Optimizer) -> dict[str, Any] | None:
    from erasure.io import load_safetensors, read_json

    if not (path.with_suffix(".json").is_file() and path.with_suffix(".safetensors").is_file()):
        return None
    state = read_json(path.with_suffix(".json"))
    tensors, _ = load_safetensors(path.with_suffix(".safetensors"))
    for prefix, mod in modules.items():
        sub = {k[len(prefix) + 1 :]: v for k, v in tensors.items() if k.startswith(prefix + ".")}
        if hasattr(mod, "load_state_dict"):
            mod.load_state_dict(sub, strict=True)
        else:
            for k in mod:
                mod[k].copy_(sub[k])
    opt_state: dict[int, dict[str, torch.Tensor]] = {}
    for k, v in tensors.items():
        if k.startswith("opt."):
            _, pid, name = k.split(".", 2)
            opt_state.setdefault(int(pid), {})[name] = v
    opt.load_state_dict({"state": opt_state, "param_groups": state.pop("param_groups")})
    return state


def _lr_at(step: int, total: int, warmup: int, peak: float) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    prog = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, prog))))


class _JsonlLog:
    def __init__(self, path: Path):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, rec: dict[str, Any]) -> None:
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(rec) + "\n")


def _progress(total: int, initial: int, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, disable=not sys.stderr.isatty(), dynamic_ncols=True)


# ----------------------------------------------------------------------------------------------- stages


def train_vae(cfg: ShapesModelConfig, images: torch.Tensor, work: Path) -> tuple[Any, dict[str, float]]:
    """Stage 1: train (or resume, or load the finished) VAE. Returns the VAE and its final losses."""
    from erasure.io import atomic_save_safetensors, load_safetensors, read_json

    vae = build_vae(cfg)
    final = work / "vae_final.safetensors"
    if final.is_file():
        vae.load_state_dict(load_safetensors(final)[0])
        logger.info("VAE: loaded finished weights from %s", final)
        return vae.eval(), read_json(work / "vae_final.json")
    torch.manual_seed(cfg.seed)
    vae = build_vae(cfg)
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
    ckpt = work / "vae_ckpt"
    state = _load_ckpt(ckpt, {"vae": vae}, opt) or {"step": 0, "seconds": 0.0}
    start = int(state["step"])
    if start:
        logger.info("VAE: resuming at step %d", start)
    log = _JsonlLog(work / "train_log.jsonl")
    t0 = time.time() - float(state["seconds"])
    n = len(images)
    acc = {"mse": 0.0, "kl": 0.0}
    bar = _progress(cfg.vae_steps, start, "vae")
    vae.train()
    for step in range(start, cfg.vae_steps):
        g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
        x = images[torch.randint(n, (cfg.vae_batch_size,), generator=g)].float() / 127.5 - 1.0
        for pg in opt.param_groups:
            pg["lr"] = _lr_at(step, cfg.vae_steps, 50, cfg.vae_lr)
        post = vae.encode(x).latent_dist
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=g)
        rec = vae.decode(z).sample
        mse = F.mse_loss(rec, x)
        kl = post.kl().mean() / x[0].numel()
        loss = mse + 0.5 * F.l1_loss(rec, x) + cfg.vae_kl_weight * kl * x[0].numel()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        acc["mse"] += mse.item()
        acc["kl"] += kl.item()
        bar.update(1)
        done = step + 1
        if done % cfg.log_every == 0:
            rec_ = {"stage": "vae", "step": done, "mse": acc["mse"] / cfg.log_every, "kl": acc["kl"] / cfg.log_every,
                    "lr": opt.param_groups[0]["lr"], "seconds": round(time.time() - t0, 1)}
            log.write(rec_)
            logger.info("vae step %d/%d mse %.5f kl %.3f (%.0fs)", done, cfg.vae_steps, rec_["mse"], rec_["kl"],
                        rec_["seconds"])
            last = rec_
            acc = {"mse": 0.0, "kl": 0.0}
        if done % cfg.checkpoint_every == 0 and done < cfg.vae_steps:
            _save_ckpt(ckpt, {"vae": vae}, opt, {"step": done, "seconds": time.time() - t0})
    bar.close()
    info = {"mse": last["mse"], "kl": last["kl"], "seconds": round(time.time() - t0, 1), "steps": cfg.vae_steps}
    atomic_save_safetensors(vae.state_dict(), final)
    from erasure.io import atomic_write_json

    atomic_write_json(work / "vae_final.json", info)
    return vae.eval(), info


@torch.no_grad()
def encode_latents(cfg: ShapesModelConfig, vae, images: torch.Tensor, work: Path) -> tuple[torch.Tensor, float]:
    """Stage 2: posterior means of all training images (cached) and the latent scaling factor (1/std)."""
    from erasure.io import atomic_save_safetensors, load_safetensors

    path = work / "latents.safetensors"
    if path.is_file():
        t, meta = load_safetensors(path)
        if int(meta.get("n", -1)) == len(images):
            return t["latents"], float(meta["scaling_factor"])
    t0 = time.time()
    out = []
    for i in range(0, len(images), 500):
        x = images[i : i + 500].float() / 127.5 - 1.0
        out.append(vae.encode(x).latent_dist.mean)
    lat = torch.cat(out)
    sf = float(1.0 / lat.std())
    logger.info("encoded %d latents in %.0fs: mean %.3f std %.3f -> scaling_factor %.5f", len(lat), time.time() - t0,
                float(lat.mean()), float(lat.std()), sf)
    atomic_save_safetensors({"latents": lat}, path, metadata={"n": str(len(images)), "scaling_factor": repr(sf)})
    return lat, sf


class _TokenCache:
    def __init__(self, tokenizer):
        self.tok = tokenizer
        self.cache: dict[str, torch.Tensor] = {}

    def __call__(self, captions: list[str]) -> torch.Tensor:
        missing = [c for c in dict.fromkeys(captions) if c not in self.cache]
        if missing:
            ids = self.tok(missing, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
            self.cache.update(zip(missing, ids))
        return torch.stack([self.cache[c] for c in captions])


def shape_sampling_weights(labels: torch.Tensor, shape_weights: dict[str, float]) -> torch.Tensor | None:
    """Per-image sampling weights from the shape label (column 0 of ``labels``); ``None`` means uniform.

    Uniform sampling keeps the original ``randint`` draw, so runs without ``shape_weights`` are bit-identical.
    """
    if not shape_weights:
        return None
    per_shape = torch.tensor([float(shape_weights.get(s, 1.0)) for s in SHAPES])
    return per_shape[labels[:, 0].long()]


def train_diffusion(
    cfg: ShapesModelConfig, latents: torch.Tensor, labels: torch.Tensor, sf: float, tokenizer, work: Path
) -> tuple[Any, Any, dict[str, float]]:
    """Stage 3: train the UNet and text encoder jointly. Returns the EMA UNet, EMA text encoder and final losses."""
    torch.manual_seed(cfg.seed + 1)
    unet = build_unet(cfg)
    te = build_text_encoder(cfg)
    params = list(unet.parameters()) + list(te.parameters())
    ema = {f"u.{k}": v.detach().clone() for k, v in unet.state_dict().items()}
    ema.update({f"t.{k}": v.detach().clone() for k, v in te.state_dict().items()})
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    ckpt = work / "diffusion_ckpt"
    state = _load_ckpt(ckpt, {"unet": unet, "te": te, "ema": ema}, opt) or {"step": 0, "seconds": 0.0}
    start = int(state["step"])
    if start:
        logger.info("diffusion: resuming at step %d", start)
    sched = build_scheduler(cfg, "ddpm")
    alphas = sched.alphas_cumprod
    snr_all = alphas / (1 - alphas)
    sampler = CaptionSampler(cfg.p_drop_shape, cfg.p_drop_color, cfg.p_drop_fill, cfg.p_color_first, cfg.p_empty)
    tokens = _TokenCache(tokenizer)
    log = _JsonlLog(work / "train_log.jsonl")
    t0 = time.time() - float(state["seconds"])
    n = len(latents)
    sample_w = shape_sampling_weights(labels, cfg.shape_weights)
    run_loss, run_n = 0.0, 0
    last: dict[str, Any] = {}
    unet_keys = [(f"u.{k}", v) for k, v in unet.state_dict().items()]
    te_keys = [(f"t.{k}", v) for k, v in te.state_dict().items()]
    bar = _progress(cfg.steps, start, "diffusion")
    unet.train()
    te.train()
    for step in range(start, cfg.steps):
        g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + 7919 + step)
        rng = np.random.default_rng([cfg.seed, step, 11])
        if sample_w is None:
            idx = torch.randint(n, (cfg.batch_size,), generator=g)
        else:
            idx = torch.multinomial(sample_w, cfg.batch_size, replacement=True, generator=g)
        x0 = latents[idx] * sf
        noise = torch.randn(x0.shape, generator=g)
        t = torch.randint(0, 1000, (cfg.batch_size,), generator=g)
        xt = sched.add_noise(x0, noise, t)
        caps = [sampler(SHAPES[int(s)], COLORS[int(c)], FILLS[int(f)], rng) for s, c, f in labels[idx].tolist()]
        ids = tokens(caps)
        for pg in opt.param_groups:
            pg["lr"] = _lr_at(step, cfg.steps, cfg.warmup_steps, cfg.lr)
        enc = te(ids)[0]
        pred = unet(xt, t, enc).sample
        per = ((pred - noise) ** 2).mean(dim=(1, 2, 3))
        if cfg.snr_gamma > 0:
            snr = snr_all[t]
            w = torch.clamp(snr, max=cfg.snr_gamma) / snr
            loss = (per * w).mean()
        else:
            loss = per.mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        d = min(cfg.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for k, v in unet_keys + te_keys:
                if v.dtype.is_floating_point:
                    ema[k].lerp_(v, 1 - d)
                else:
                    ema[k].copy_(v)
        run_loss += per.mean().item()
        run_n += 1
        bar.update(1)
        done = step + 1
        if done % cfg.log_every == 0:
            secs = time.time() - t0
            last = {"stage": "diffusion", "step": done, "mse": run_loss / run_n, "lr": opt.param_groups[0]["lr"],
                    "seconds": round(secs, 1)}
            log.write(last)
            rate = (done - start) / max(1e-6, secs - float(state["seconds"]))
            logger.info("diffusion step %d/%d eps-mse %.4f lr %.2e (%.0fs, %.2f it/s, eta %.0fs)", done, cfg.steps,
                        last["mse"], last["lr"], secs, rate, (cfg.steps - done) / max(rate, 1e-6))
            run_loss, run_n = 0.0, 0
        if done % cfg.checkpoint_every == 0 or done == cfg.steps:
            _save_ckpt(ckpt, {"unet": unet, "te": te, "ema": ema}, opt, {"step": done, "seconds": time.time() - t0})
    bar.close()
    # final eps-MSE of the EMA weights on a fixed held-in batch, over all timesteps
    unet.load_state_dict({k[2:]: v for k, v in ema.items() if k.startswith("u.")})
    te.load_state_dict({k[2:]: v for k, v in ema.items() if k.startswith("t.")})
    unet.eval()
    te.eval()
    info = {"mse_last_window": last.get("mse"), "seconds": round(time.time() - t0, 1), "steps": cfg.steps,
            "ema_eval_mse": _eval_mse(cfg, unet, te, latents, labels, sf, sched, sampler, tokens)}
    return unet, te, info


@torch.no_grad()
def _eval_mse(cfg, unet, te, latents, labels, sf, sched, sampler, tokens, n: int = 512) -> float:
    g = torch.Generator().manual_seed(12345)
    rng = np.random.default_rng(12345)
    tot = 0.0
    for _ in range(0, n, 128):
        idx = torch.randint(len(latents), (128,), generator=g)
        x0 = latents[idx] * sf
        noise = torch.randn(x0.shape, generator=g)
        t = torch.randint(0, 1000, (128,), generator=g)
        caps = [sampler(SHAPES[int(s)], COLORS[int(c)], FILLS[int(f)], rng) for s, c, f in labels[idx].tolist()]
        pred = unet(sched.add_noise(x0, noise, t), t, te(tokens(caps))[0]).sample
        tot += float(((pred - noise) ** 2).mean()) * 128
    return tot / n


def save_pipeline(cfg: ShapesModelConfig, vae, unet, te, sf: float, info: dict[str, Any]) -> Path:
    """Write the pipeline folder atomically: temp folder beside ``out_dir``, then rename (keeps README.md)."""
    from diffusers import StableDiffusionPipeline

    from erasure.io import atomic_write_json, environment_info
    from erasure.tokenizer import write_clip_tokenizer_files

    out = Path(cfg.out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    vae.register_to_config(scaling_factor=sf)
    from transformers import CLIPTokenizer

    write_clip_tokenizer_files(tmp / "_tok")
    tokenizer = CLIPTokenizer.from_pretrained(str(tmp / "_tok"))
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=te, tokenizer=tokenizer, unet=unet, scheduler=build_scheduler(cfg, "ddim"),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.save_pretrained(str(tmp), safe_serialization=True)
    shutil.rmtree(tmp / "_tok")
    atomic_write_json(tmp / "training_info.json", {"config": cfg.to_dict(), **info, **environment_info()})
    if (out / "README.md").is_file():
        shutil.copy2(out / "README.md", tmp / "README.md")
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    if out.exists():
        os.replace(out, old)
    os.replace(tmp, out)
    if old.exists():
        shutil.rmtree(old)
    for f in out.rglob("*"):
        f.chmod(0o755 if f.is_dir() else 0o644)
    out.chmod(0o755)
    return out


def train(cfg: ShapesModelConfig) -> Path:
    """Run (or resume) all stages and write the pipeline folder; returns its path."""
    from erasure.io import atomic_write_json

    torch.set_num_threads(cfg.threads)
    work = Path(cfg.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    atomic_write_json(work / "config.json", cfg.to_dict())
    t_start = time.time()
    images, labels = load_or_render_dataset(
        work.parent / f"shapes_train_{cfg.n_images}.safetensors", cfg.n_images, SEED_BASES["train"], cfg.image_size,
        workers=cfg.threads,
    )
    t_data = time.time() - t_start
    vae, vae_info = train_vae(cfg, images, work)
    for p in vae.parameters():
        p.requires_grad_(False)
    latents, sf = encode_latents(cfg, vae, images, work)
    del images
    from transformers import CLIPTokenizer

    from erasure.tokenizer import write_clip_tokenizer_files

    write_clip_tokenizer_files(work / "tokenizer")
    tokenizer = CLIPTokenizer.from_pretrained(str(work / "tokenizer"))
    unet, te, diff_info = train_diffusion(cfg, latents, labels, sf, tokenizer, work)
    info = {"vae": vae_info, "diffusion": diff_info, "scaling_factor": sf, "data_seconds_this_run": round(t_data, 1),
            "wall_seconds_this_run": round(time.time() - t_start, 1)}
    atomic_write_json(work / "final_info.json", info)
    out = save_pipeline(cfg, vae, unet, te, sf, info)
    logger.info("wrote %s (%s)", out, json.dumps(info))
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="JSON file with ShapesModelConfig fields (flags override it)")
    add_config_arguments(parser, ShapesModelConfig)
    args = parser.parse_args(argv)
    base = json.loads(Path(args.config).read_text()) if args.config else None
    cfg = config_from_args(ShapesModelConfig, args, base)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    train(cfg)


if __name__ == "__main__":
    main()
