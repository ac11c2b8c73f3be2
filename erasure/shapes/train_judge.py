"""Train the shapes judge: ``python -m erasure.shapes.train_judge [--flags]``.

Renders a training set (seeds ``SEED_BASES["train"]``...) and a fresh validation set
(``SEED_BASES["judge_val"]``...), trains :class:`~erasure.shapes.judge.JudgeNet` with augmentation (flips,
blur, noise, brightness) so it also judges slightly blurry generated images, and writes
``models/shapes-judge.safetensors`` + ``models/shapes-judge.json`` (config and validation accuracy).
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch: 2 OpenMP threads on a shared 2-core CPU

import argparse
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from erasure.jsonconfig import JsonConfig, add_config_arguments, config_from_args, field
from erasure.shapes.data import SEED_BASES, load_or_render_dataset
from erasure.shapes.judge import HEADS, JudgeNet, default_judge_path, judge_config

logger = logging.getLogger(__name__)

__all__ = ["JudgeTrainConfig", "train_judge", "augment", "evaluate_judge_net", "main"]


@dataclass
class JudgeTrainConfig(JsonConfig):
    """Settings of ``python -m erasure.shapes.train_judge``.

    Args:
        n_train (`int`, defaults to 48000): rendered training images.
        n_val (`int`, defaults to 3000): rendered validation images (fresh seeds).
        epochs (`int`, defaults to 2): passes over the training set.
        batch_size (`int`, defaults to 128): batch size.
        lr (`float`, defaults to 3e-3): peak AdamW learning rate (one-cycle cosine).
        seed (`int`, defaults to 0): torch seed (init, shuffling, augmentation).
        out (`str`, defaults to the shipped path): output weights file.
        cache_dir (`str`, defaults to `"models/_train"`): where rendered datasets are cached.
        threads (`int`, defaults to 2): torch CPU threads.
    """

    n_train: int = field(48000, help="rendered training images")
    n_val: int = field(3000, help="rendered validation images (fresh seeds)")
    epochs: int = field(2, help="passes over the training set")
    batch_size: int = field(128, help="batch size")
    lr: float = field(3e-3, help="peak AdamW learning rate (one-cycle cosine)")
    seed: int = field(0, help="torch seed (init, shuffling, augmentation)")
    out: str = field(str(default_judge_path()), help="output weights file (.safetensors)")
    cache_dir: str = field("models/_train", help="where rendered datasets are cached")
    threads: int = field(2, help="torch CPU threads")

    def __post_init__(self) -> None:
        for name in ("n_train", "n_val", "epochs", "batch_size", "threads"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if not self.out.endswith(".safetensors"):
            raise ValueError(f"out must end with .safetensors, got {self.out!r}")


def _gaussian_blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Per-image gaussian blur (5x5 kernel), ``sigma`` of shape ``[n]`` (0 = identity)."""
    r = torch.arange(-2, 3, dtype=x.dtype)
    s = sigma.clamp(min=1e-3).view(-1, 1)
    k1 = torch.exp(-(r.view(1, -1) ** 2) / (2 * s**2))
    k1 = k1 / k1.sum(1, keepdim=True)  # [n, 5]
    n, c, h, w = x.shape
    xp = F.pad(x.reshape(1, n * c, h, w), (2, 2, 2, 2), mode="replicate")
    kh = k1.repeat_interleave(c, 0).view(n * c, 1, 1, 5)
    kv = k1.repeat_interleave(c, 0).view(n * c, 1, 5, 1)
    y = F.conv2d(F.conv2d(xp, kh, groups=n * c), kv, groups=n * c)
    return y.view(n, c, h, w)


def augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Label-preserving augmentation of a float batch in ``[0, 1]``: flips, 90-degree turns, blur, noise,
    brightness/contrast."""
    n = x.shape[0]
    if torch.rand((), generator=g) < 0.5:
        x = x.flip(3)
    if torch.rand((), generator=g) < 0.5:
        x = x.flip(2)
    if torch.rand((), generator=g) < 0.5:
        x = x.transpose(2, 3)
    sigma = torch.rand(n, generator=g) * 1.1 * (torch.rand(n, generator=g) < 0.6)
    x = _gaussian_blur(x, sigma)
    x = x * (1 + 0.1 * (torch.rand(n, 1, 1, 1, generator=g) - 0.5)) + 0.06 * (torch.rand(n, 1, 1, 1, generator=g) - 0.5)
    x = x + torch.randn(x.shape, generator=g) * (torch.rand(n, 1, 1, 1, generator=g) * 0.03)
    return x.clamp(0, 1)


@torch.no_grad()
def evaluate_judge_net(net: JudgeNet, images: torch.Tensor, labels: torch.Tensor, batch: int = 500) -> dict[str, float]:
    """Per-head accuracy of ``net`` on uint8 ``images`` with int ``labels`` ``[n, 3]``."""
    net.eval()
    correct = torch.zeros(3)
    for i in range(0, len(images), batch):
        x = images[i : i + batch].float() / 255.0
        for k, logits in enumerate(net(x)):
            correct[k] += (logits.argmax(-1) == labels[i : i + batch, k]).sum()
    return {h: float(correct[k] / len(images)) for k, h in enumerate(HEADS)}


def train_judge(cfg: JudgeTrainConfig) -> dict[str, float]:
    """Train and save the judge; returns the validation accuracy per head."""
    from erasure.io import atomic_save_safetensors, atomic_write_json, environment_info

    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    cache = Path(cfg.cache_dir)
    xtr, ytr = load_or_render_dataset(cache / f"shapes_train_{cfg.n_train}.safetensors", cfg.n_train,
                                      SEED_BASES["train"], workers=cfg.threads)
    xva, yva = load_or_render_dataset(cache / f"shapes_judgeval_{cfg.n_val}.safetensors", cfg.n_val,
                                      SEED_BASES["judge_val"], workers=cfg.threads)
    net = JudgeNet()
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=1e-4)
    steps_per_epoch = math.ceil(cfg.n_train / cfg.batch_size)
    total = cfg.epochs * steps_per_epoch
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=total, pct_start=0.15)
    g = torch.Generator().manual_seed(cfg.seed)
    t0 = time.time()
    step = 0
    for epoch in range(cfg.epochs):
        net.train()
        perm = torch.randperm(cfg.n_train, generator=g)
        run_loss = 0.0
        for i in range(0, cfg.n_train, cfg.batch_size):
            idx = perm[i : i + cfg.batch_size]
            x = augment(xtr[idx].float() / 255.0, g)
            logits = net(x)
            loss = sum(F.cross_entropy(lg, ytr[idx, k], label_smoothing=0.05) for k, lg in enumerate(logits))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            run_loss += loss.item()
            if step % 50 == 0:
                logger.info("epoch %d step %d/%d loss %.4f (%.0fs)", epoch, step, total, run_loss / 50, time.time() - t0)
                run_loss = 0.0
        acc = evaluate_judge_net(net, xva, yva)
        logger.info("epoch %d val acc %s", epoch, {k: round(v, 4) for k, v in acc.items()})
    config = judge_config()
    atomic_save_safetensors(net.state_dict(), cfg.out, metadata={"config": json.dumps(config)})
    report = {**config, "val_accuracy": acc, "n_val": cfg.n_val, "val_seed_base": SEED_BASES["judge_val"],
              "train_config": cfg.to_dict(), "train_seconds": round(time.time() - t0, 1), **environment_info()}
    report["train_config"]["out"] = Path(cfg.out).name
    atomic_write_json(Path(cfg.out).with_suffix(".json"), report)
    for f in (Path(cfg.out), Path(cfg.out).with_suffix(".json")):
        f.chmod(0o644)
    logger.info("saved %s (val acc %s) in %.0fs", cfg.out, acc, time.time() - t0)
    return acc


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="JSON file with JudgeTrainConfig fields (flags override it)")
    add_config_arguments(parser, JudgeTrainConfig)
    args = parser.parse_args(argv)
    base = json.loads(Path(args.config).read_text()) if args.config else None
    cfg = config_from_args(JudgeTrainConfig, args, base)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    train_judge(cfg)


if __name__ == "__main__":
    main()
