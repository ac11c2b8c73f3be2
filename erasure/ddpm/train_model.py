"""Train a class-conditional pixel-space DDPM: ``python -m erasure.ddpm.train_model [--config cfg.json] [--flags]``.

Data (``--dataset``):
    ``shapes``   the embedded shapes world, one class per shape (colours and fills random), rendered at
                 ``image_size`` and cached as uint8 safetensors in ``work_dir``;
    ``cifar10`` / ``stl10``   torchvision's folder layout under ``--data-root`` (``download=False``: nothing is
                 fetched; STL-10 is resized to ``image_size``).

Training: epsilon-prediction DDPM loss on the 1000-step linear schedule of the DDPM paper, class dropout
(``p_uncond``, the null class is the last class id) for classifier-free guidance, AdamW with warmup and cosine
decay, optional min-SNR weighting, bf16 autocast on CPU (float32 master weights), EMA weights saved.

Checkpoints (``work_dir/ckpt.safetensors`` + ``ckpt.json``: weights, EMA, optimizer state, step, config) are
written every ``checkpoint_every`` steps; a killed run resumes from the last one. Batches and noise are drawn
from generators seeded by ``(seed, step)``, so a resumed run draws the same batches as an uninterrupted one.
The final folder (EMA weights, DDIM scheduler) is written beside ``out_dir`` and renamed into place.
The paper-size CIFAR-10 config is ``erasure/ddpm/configs/cifar10.json`` (a GPU job).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from erasure.jsonconfig import JsonConfig, add_config_arguments, config_from_args, field

logger = logging.getLogger(__name__)

__all__ = ["DDPMTrainConfig", "load_dataset", "train", "main"]

DATASETS = ("shapes", "cifar10", "stl10")


@dataclass
class DDPMTrainConfig(JsonConfig):
    """Settings of ``python -m erasure.ddpm.train_model`` (every field is also a ``--flag``)."""

    out_dir: str = field("models/shapes-ddpm", help="final model folder (diffusers layout)")
    work_dir: str = field("models/_train/ddpm", help="checkpoints, cached data and the training log")
    dataset: str = field("shapes", help="training data", choices=list(DATASETS))
    data_root: str = field("", help="torchvision dataset folder for cifar10/stl10 (nothing is downloaded)")
    exclude_classes: list[str] = field(default_factory=list, help="classes left out of training (Retrain)")
    seed: int = field(0, help="seed of initialisation, batches and noise")
    threads: int = field(1, help="torch CPU threads")
    n_images: int = field(24000, help="rendered shapes images (seeds 0..n_images-1)")
    image_size: int = field(32, help="image resolution in pixels", min=8)
    channels: list[int] = field(default_factory=lambda: [32, 64, 64], help="UNet block widths")
    attention: list[int] = field(default_factory=lambda: [0, 0, 1], help="1 = self-attention in that block")
    layers_per_block: int = field(1, help="resnet layers per UNet block", min=1)
    norm_groups: int = field(16, help="GroupNorm groups", min=1)
    dropout: float = field(0.0, help="UNet dropout", min=0.0, max=0.9)
    steps: int = field(4000, help="training steps", min=1)
    batch_size: int = field(64, help="batch size", min=1)
    lr: float = field(1e-3, help="peak learning rate", min=0.0, min_exclusive=True)
    warmup_steps: int = field(200, help="linear warmup steps", min=0)
    cosine: bool = field(True, help="cosine decay to 10% of lr after warmup (off: constant lr)")
    ema_decay: float = field(0.999, help="EMA decay (with warmup (1+s)/(10+s))", min=0.0, max=0.99999)
    snr_gamma: float = field(5.0, help="min-SNR loss weighting gamma (0 = plain MSE)", min=0.0)
    p_uncond: float = field(0.1, help="class dropout probability (null class) for classifier-free guidance", min=0.0, max=1.0)
    hflip: bool = field(True, help="random horizontal flips")
    bf16: bool = field(True, help="bf16 autocast on CPU/GPU (master weights stay float32)")
    device: str = field("cpu", help="torch device")
    guidance_scale: float = field(2.0, help="default CFG scale written into the model folder", min=1.0)
    num_inference_steps: int = field(50, help="default DDIM steps written into the model folder", min=1)
    checkpoint_every: int = field(250, help="checkpoint interval (steps)", min=1)
    log_every: int = field(25, help="log interval (steps)", min=1)

    def __post_init__(self) -> None:
        self.check_fields()
        if self.dataset not in DATASETS:
            raise ValueError(f"dataset must be one of {DATASETS}, got {self.dataset!r}")
        if self.dataset != "shapes" and not self.data_root:
            raise ValueError(f"--data-root is required for {self.dataset} (a torchvision dataset folder)")
        if len(self.channels) != len(self.attention):
            raise ValueError("channels and attention need the same number of entries")
        if any(c % self.norm_groups for c in self.channels):
            raise ValueError(f"every channel width must be divisible by norm_groups={self.norm_groups}")
        if self.image_size % (2 ** (len(self.channels) - 1)):
            raise ValueError(f"image_size must be divisible by {2 ** (len(self.channels) - 1)}")


def load_dataset(cfg: DDPMTrainConfig) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """``(uint8 images [n, 3, s, s], int64 class ids [n], class names)``."""
    if cfg.dataset == "shapes":
        from erasure.shapes.data import SEED_BASES, load_or_render_dataset
        from erasure.shapes.render import SHAPES

        path = Path(cfg.work_dir) / f"shapes_{cfg.n_images}_{cfg.image_size}.safetensors"
        imgs, labels = load_or_render_dataset(path, cfg.n_images, SEED_BASES["train"], cfg.image_size)
        return imgs, labels[:, 0].clone(), list(SHAPES)
    import numpy as np
    import torchvision

    root = Path(cfg.data_root)
    if not root.is_dir():
        raise FileNotFoundError(f"--data-root {root} is not a folder; point it at the torchvision {cfg.dataset} folder")
    if cfg.dataset == "cifar10":
        ds = torchvision.datasets.CIFAR10(str(root), train=True, download=False)
        arr, y, names = np.asarray(ds.data), np.asarray(ds.targets), list(ds.classes)
        imgs = torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous()
    else:
        ds = torchvision.datasets.STL10(str(root), split="train", download=False)
        imgs, y, names = torch.from_numpy(np.asarray(ds.data)), np.asarray(ds.labels), list(ds.classes)
    if imgs.shape[-1] != cfg.image_size:
        imgs = torch.nn.functional.interpolate(imgs.float(), size=cfg.image_size, mode="area").round().clamp(0, 255).to(torch.uint8)
    return imgs, torch.from_numpy(y).long(), names


def _lr_at(step: int, cfg: DDPMTrainConfig) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if not cfg.cosine:
        return cfg.lr
    p = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, p))))


def diffusion_loss(unet, sched, x0: torch.Tensor, labels: torch.Tensor, g: torch.Generator | None,
                   snr_gamma: float = 0.0, bf16: bool = False) -> torch.Tensor:
    """Per-sample epsilon-MSE ``[n]`` at random timesteps (min-SNR weighted when ``snr_gamma`` > 0)."""
    noise = torch.randn(x0.shape, generator=g).to(x0.device)
    t = torch.randint(0, sched.config.num_train_timesteps, (x0.shape[0],), generator=g).to(x0.device)
    xt = sched.add_noise(x0, noise, t)
    with torch.autocast(x0.device.type, dtype=torch.bfloat16, enabled=bf16):
        pred = unet(xt, t, class_labels=labels).sample
    per = ((pred.float() - noise) ** 2).mean(dim=(1, 2, 3))
    if snr_gamma > 0:
        ac = sched.alphas_cumprod.to(x0.device)[t]
        snr = ac / (1 - ac)
        per = per * torch.clamp(snr, max=snr_gamma) / snr
    return per


def _save_ckpt(work: Path, unet, ema: dict[str, torch.Tensor], opt, state: dict[str, Any]) -> None:
    from erasure.io import atomic_save_safetensors, atomic_write_json, optimizer_state_to_tensors

    tensors = {f"u.{k}": v for k, v in unet.state_dict().items()}
    tensors.update({f"e.{k}": v for k, v in ema.items()})
    ot, ometa = optimizer_state_to_tensors(opt)
    tensors.update({f"o.{k}": v for k, v in ot.items()})
    atomic_save_safetensors(tensors, work / "ckpt.safetensors")
    atomic_write_json(work / "ckpt.json", {**state, "optimizer": ometa})


def _load_ckpt(work: Path, unet, ema: dict[str, torch.Tensor], opt) -> dict[str, Any] | None:
    from erasure.io import load_optimizer_state, load_safetensors, read_json

    if not (work / "ckpt.json").is_file() or not (work / "ckpt.safetensors").is_file():
        return None
    state = read_json(work / "ckpt.json")
    tensors, _ = load_safetensors(work / "ckpt.safetensors")
    unet.load_state_dict({k[2:]: v for k, v in tensors.items() if k.startswith("u.")})
    for k, v in tensors.items():
        if k.startswith("e."):
            ema[k[2:]].copy_(v)
    load_optimizer_state(opt, {k[2:]: v for k, v in tensors.items() if k.startswith("o.")}, state.pop("optimizer"))
    return state


def train(cfg: DDPMTrainConfig, progress: Callable[[int, int, dict[str, Any]], None] | None = None):
    """Train (or resume) and publish ``cfg.out_dir``; returns the loaded :class:`~erasure.ddpm.model.ClassDDPM`."""
    from erasure.ddpm.model import ClassDDPM, build_scheduler, build_unet, load_class_ddpm
    from erasure.io import atomic_write_json, publish_dir, temp_prefix

    work = Path(cfg.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    dev = torch.device(cfg.device)
    imgs, labels, names = load_dataset(cfg)
    unknown = [c for c in cfg.exclude_classes if c not in names]
    if unknown:
        raise ValueError(f"exclude_classes: unknown {unknown}; classes are {names}")
    keep = ~torch.isin(labels, torch.tensor([names.index(c) for c in cfg.exclude_classes], dtype=torch.long))
    imgs, labels = imgs[keep], labels[keep]
    torch.manual_seed(cfg.seed)
    unet = build_unet(len(names), cfg.image_size, tuple(cfg.channels), tuple(bool(a) for a in cfg.attention),
                      cfg.layers_per_block, cfg.norm_groups, cfg.dropout).to(dev)
    sched = build_scheduler("ddpm")
    opt = torch.optim.AdamW(unet.parameters(), lr=cfg.lr, weight_decay=0.0)
    ema = {k: v.detach().clone() for k, v in unet.state_dict().items()}
    state = _load_ckpt(work, unet, ema, opt) or {"step": 0, "seconds": 0.0}
    if state.get("config", cfg.to_dict()) != cfg.to_dict():
        logger.warning("the checkpoint in %s was written with another config; resuming with the new one", work)
    start = int(state["step"])
    t0 = time.time() - float(state["seconds"])
    n, null = len(labels), len(names)
    run, run_n = 0.0, 0
    unet.train()
    with open(work / "train_log.jsonl", "a") as log:
        for step in range(start, cfg.steps):
            g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
            idx = torch.randint(n, (cfg.batch_size,), generator=g)
            x0 = imgs[idx].float().div(127.5).sub(1.0)
            if cfg.hflip:
                flip = torch.rand(cfg.batch_size, generator=g) < 0.5
                x0 = torch.where(flip[:, None, None, None], x0.flip(-1), x0)
            y = labels[idx].clone()
            y[torch.rand(cfg.batch_size, generator=g) < cfg.p_uncond] = null
            for pg in opt.param_groups:
                pg["lr"] = _lr_at(step, cfg)
            loss = diffusion_loss(unet, sched, x0.to(dev), y.to(dev), g, cfg.snr_gamma, cfg.bf16).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
            opt.step()
            d = min(cfg.ema_decay, (1 + step) / (10 + step))
            with torch.no_grad():
                for k, v in unet.state_dict().items():
                    ema[k].lerp_(v, 1 - d) if v.dtype.is_floating_point else ema[k].copy_(v)
            run += loss.item()
            run_n += 1
            done = step + 1
            if done % cfg.log_every == 0 or done == cfg.steps:
                rec = {"step": done, "loss": round(run / run_n, 5), "lr": _lr_at(step, cfg),
                       "seconds": round(time.time() - t0, 1)}
                log.write(json.dumps(rec) + "\n")
                log.flush()
                logger.info("step %d/%d loss %.4f %.0fs", done, cfg.steps, rec["loss"], rec["seconds"])
                if progress:
                    progress(done, cfg.steps, rec)
                run, run_n = 0.0, 0
            if done % cfg.checkpoint_every == 0 or done == cfg.steps:
                _save_ckpt(work, unet, ema, opt, {"step": done, "seconds": time.time() - t0, "config": cfg.to_dict()})
    seconds = time.time() - t0
    unet.load_state_dict(ema)
    unet.eval()
    out = Path(cfg.out_dir)
    part = out.parent / (temp_prefix(out.name) + "part")
    model = ClassDDPM(unet.cpu(), build_scheduler("ddim"), names, cfg.guidance_scale, cfg.num_inference_steps)
    model.scheduler.register_to_config(timestep_spacing="trailing")
    model.save(part, extra={"image_size": cfg.image_size, "dataset": cfg.dataset})
    atomic_write_json(part / "training_info.json", {"config": cfg.to_dict(), "train_seconds": round(seconds, 1),
                                                     "images": int(n), "parameters": sum(p.numel() for p in unet.parameters())})
    publish_dir(part, out)
    return load_class_ddpm(out)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="JSON file with DDPMTrainConfig fields (flags override it)")
    add_config_arguments(parser, DDPMTrainConfig)
    args = parser.parse_args(argv)
    base = json.loads(Path(args.config).read_text()) if args.config else None
    try:
        cfg = config_from_args(DDPMTrainConfig, args, base)
    except (ValueError, FileNotFoundError) as err:
        parser.error(str(err))
    torch.set_num_threads(cfg.threads)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stdout)
    os.makedirs(cfg.work_dir, exist_ok=True)
    train(cfg)


if __name__ == "__main__":
    main()
