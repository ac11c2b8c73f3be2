"""Class-wise forgetting in a class-conditional DDPM: config, the masked training loop and the run directory.

``erase_class(cfg, out)`` writes a run directory (:class:`erasure.runs.RunDir` contract, format
``salun-erasure-ddpm-run-v1``): ``run.json``, ``weights.safetensors`` (the parameters the method may change,
under ``unet.state_dict()`` names), ``mask.safetensors`` (masked methods) and ``log.jsonl``. A killed or
cancelled run resumes from its last checkpoint when re-run with the same settings; batches, noise and anchors are
drawn from generators seeded by ``(seed, step)``, so a resumed run is the run it continues.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from erasure.ddpm.methods import ClassMethodConfig, get_class_method
from erasure.jsonconfig import JsonConfig, field
from erasure.progress import Progress, emit

logger = logging.getLogger(__name__)

__all__ = ["DDPM_RUN_FORMAT", "ClassEraseConfig", "ClassEraseCancelled", "erase_class", "load_class_run",
           "default_model_dir", "resolve_model_dir"]

from erasure.runs import DDPM_RUN_FORMAT  # noqa: E402  (one constant, defined with the run contract)


def default_model_dir() -> Path:
    from erasure.resources import model_path

    return model_path("shapes-ddpm")


def resolve_model_dir(model: str) -> Path:
    """``default`` -> the shipped ``models/shapes-ddpm``; a path must be a class-conditional DDPM folder."""
    from erasure.ddpm.model import is_class_ddpm_folder

    p = default_model_dir() if model in ("", "default") else Path(model)
    if not is_class_ddpm_folder(p):
        raise FileNotFoundError(f"{p} is not a class-conditional DDPM folder (model_index.json of a "
                                "ClassConditionalDDPMPipeline); pass e.g. --model models/shapes-ddpm")
    return p.resolve()


class ClassEraseCancelled(RuntimeError):
    """The run was cancelled after a checkpoint; re-run the same command to resume."""


@dataclass
class ClassEraseConfig(JsonConfig):
    """Settings of ``erasure erase --forget-class ...`` (every field is a flag)."""

    model: str = field("default", help="class-conditional DDPM folder ('default' = the shipped models/shapes-ddpm)")
    forget_class: str = field("", help="the class to forget (a class name of the model)", label="Forget class")
    anchor_class: str = field("random", help="remap target: a class name, or 'random' (a random other class per "
                              "sample, as in the paper)", label="Anchor class")
    method: str = field("salun", help="salun, rl, esd-class, ft or retrain", label="Method")
    method_args: Any = field(None, help="the method's own settings", cli=False)
    steps: int = field(240, help="optimizer steps (240 at lr 4e-4 forget a class of the shipped shapes model)",
                       label="Steps", min=1, max=100000)
    lr: float = field(4e-4, help="Adam learning rate", label="Learning rate", min=0.0, min_exclusive=True, max=1.0)
    batch_size: int = field(32, help="forget images and retain images per step (each)", label="Batch size", min=1, max=4096)
    mask_ratio: float = field(0.5, help="fraction of the UNet weights in the SalUn mask (official DDPM code: 0.5)",
                              label="Mask ratio", min=0.0, min_exclusive=True, max=1.0)
    mask_batches: int = field(8, help="forget batches the saliency gradient is accumulated over", min=1, max=10000)
    mask_path: str = field("", help="use this saved mask instead of computing one")
    guidance_scale: float = field(0.0, help="CFG scale of the saliency loss (0 = the model's default)", min=0.0)
    n_forget: int = field(256, help="forget-class images drawn", min=1)
    n_retain: int = field(128, help="images drawn per retain class", min=1)
    p_uncond: float = field(0.1, help="class dropout of the retain loss (keeps the unconditional prediction)", min=0.0, max=1.0)
    data: str = field("auto", help="image source: auto, render (shapes), dataset (--data-root), generate (the model)",
                      choices=["auto", "render", "dataset", "generate"])
    data_root: str = field("", help="torchvision CIFAR-10/STL-10 folder for --data dataset")
    seed: int = field(0, help="seed of data, noise, anchors and batches", min=0)
    bf16: bool = field(True, help="bf16 autocast for the training passes (float32 master weights)")
    device: str = field("cpu", help="torch device")
    checkpoint_every: int = field(50, help="checkpoint interval (steps)", min=1)

    def __post_init__(self) -> None:
        self.check_fields()
        if not self.forget_class:
            raise ValueError("--forget-class is required (a class name of the model)")
        spec = get_class_method(self.method)
        if self.method_args is None:
            self.method_args = spec.config_cls()
        elif isinstance(self.method_args, dict):
            self.method_args = spec.config_cls.from_dict(self.method_args)
        elif not isinstance(self.method_args, spec.config_cls):
            raise ValueError(f"method_args of {self.method!r} must be a {spec.config_cls.__name__}")

    def to_dict(self) -> dict[str, Any]:
        d = super().to_dict()
        if isinstance(self.method_args, ClassMethodConfig):
            d["method_args"] = self.method_args.to_dict()
        return d


def _draw(cfg: ClassEraseConfig, model, forget_idx: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from erasure.ddpm.data import class_images

    spec = get_class_method(cfg.method)
    fx = class_images(model, forget_idx, cfg.n_forget, cfg.seed, cfg.data, cfg.data_root)
    rx, ry = [], []
    if spec.run is None and cfg.method_args.uses_retain():
        for c in range(len(model.class_names)):
            if c != forget_idx:
                rx.append(class_images(model, c, cfg.n_retain, cfg.seed, cfg.data, cfg.data_root))
                ry.append(torch.full((cfg.n_retain,), c, dtype=torch.long))
    return fx, (torch.cat(rx) if rx else fx[:0]), (torch.cat(ry) if ry else torch.empty(0, dtype=torch.long))


def _batch(cfg, ctx, fx, rx, ry, step: int, stream: int = 0) -> SimpleNamespace:
    g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step * 7 + stream)
    dev, sched, n = ctx.device, ctx.sched, cfg.batch_size
    T = sched.config.num_train_timesteps
    b = SimpleNamespace()
    i = torch.randint(len(fx), (n,), generator=g)
    b.forget_x = fx[i]
    b.forget_noise = torch.randn(b.forget_x.shape, generator=g)
    b.forget_t = torch.randint(0, T, (n,), generator=g)
    b.forget_xt = sched.add_noise(b.forget_x, b.forget_noise, b.forget_t)
    b.forget_y = torch.full((n,), ctx.forget_idx, dtype=torch.long)
    others = [c for c in range(len(ctx.model.class_names)) if c != ctx.forget_idx]
    if ctx.anchor_idx is None:
        b.anchor_y = torch.tensor(others)[torch.randint(len(others), (n,), generator=g)]
    else:
        b.anchor_y = torch.full((n,), ctx.anchor_idx, dtype=torch.long)
    if len(rx):
        j = torch.randint(len(rx), (n,), generator=g)
        b.retain_x, b.retain_y = rx[j], ry[j].clone()
        b.retain_y[torch.rand(n, generator=g) < cfg.p_uncond] = ctx.null
        b.retain_noise = torch.randn(b.retain_x.shape, generator=g)
        b.retain_t = torch.randint(0, T, (n,), generator=g)
        b.retain_xt = sched.add_noise(b.retain_x, b.retain_noise, b.retain_t)
    for k, v in list(vars(b).items()):
        setattr(b, k, v.to(dev))
    return b


def _changed_names(unet, mask: dict[str, torch.Tensor] | None) -> list[str]:
    return [n for n, _ in unet.named_parameters() if mask is None or bool(mask[n].any())]


def erase_class(cfg: ClassEraseConfig, out: str | os.PathLike, overwrite: bool = False,
                progress: Progress | None = None, cancel=None) -> Path:
    """Run one class-forgetting method and write its run directory; returns its path."""
    import copy

    from erasure.ddpm.model import build_scheduler, load_class_ddpm
    from erasure.io import (
        atomic_save_safetensors,
        atomic_write_json,
        environment_info,
        load_optimizer_state,
        optimizer_state_to_tensors,
    )
    from erasure.masked import MaskedUpdate, make_optimizer, prepare_masked_params
    from erasure.runs import Checkpoint, RunDir
    from erasure.saliency import compute_mask, load_mask, mask_stats, save_mask

    t_start, cpu_start = time.time(), time.process_time()
    model_dir = resolve_model_dir(cfg.model)
    model = load_class_ddpm(model_dir, cfg.device)
    forget_idx = model.class_index(cfg.forget_class)
    if cfg.anchor_class == "random":
        anchor_idx = None
    else:
        anchor_idx = model.class_index(cfg.anchor_class)
        if anchor_idx == forget_idx:
            raise ValueError("--anchor-class must differ from --forget-class (or be 'random')")
    spec = get_class_method(cfg.method)
    run = RunDir(out)
    run.begin(overwrite)
    config = {**cfg.to_dict(), "model": str(model_dir)}
    ck = run.load_checkpoint(same_run=config, ignore=("device", "checkpoint_every"))
    unet = model.unet
    unet.train()
    ctx = SimpleNamespace(unet=unet, frozen_unet=None, model=model, model_dir=model_dir, forget_idx=forget_idx,
                          anchor_idx=anchor_idx, null=model.null_class, args=cfg.method_args, cfg=cfg, bf16=cfg.bf16,
                          guidance_scale=cfg.guidance_scale or model.guidance_scale, device=torch.device(cfg.device),
                          sched=build_scheduler("ddpm", model.scheduler.config.num_train_timesteps),
                          work_dir=run.partial, report=lambda stage, d, t, **i: emit(progress, stage, d, t, **i))
    timing: dict[str, float] = {}
    info: dict[str, Any] = {"format": DDPM_RUN_FORMAT, "method": cfg.method, "config": config, "base_model": str(model_dir),
                            "forget_class": model.class_names[forget_idx], "class_names": model.class_names,
                            "anchor_class": cfg.anchor_class, "needs_mask": spec.needs_mask, "seed": cfg.seed,
                            "environment": environment_info()}
    log_path = run.partial / "log.jsonl"
    if spec.run is not None:  # retrain: the method trains a whole model itself (it resumes from its own checkpoints)
        t0 = time.time()
        weights = spec.run(ctx)
        timing["train"] = time.time() - t0
        atomic_save_safetensors(weights, run.partial / "weights.safetensors")
        tlog = run.partial / "train" / "train_log.jsonl"
        log_path.write_text(tlog.read_text() if tlog.is_file() else
                            json.dumps({"step": 0, "changed_params": sum(v.numel() for v in weights.values())}) + "\n")
        import shutil

        shutil.rmtree(run.partial / "train", ignore_errors=True)
        shutil.rmtree(run.partial / "model", ignore_errors=True)
        info.update(changed_params=sum(v.numel() for v in weights.values()), steps=0)
    else:
        t0 = time.time()
        fx, rx, ry = _draw(cfg, model, forget_idx)
        timing["data"] = time.time() - t0
        if spec.loss is not None and cfg.method_args.needs_frozen_unet():
            ctx.frozen_unet = copy.deepcopy(unet).eval().requires_grad_(False)
        mask = None
        if spec.needs_mask:
            t0 = time.time()
            mpath = run.partial / "mask.safetensors"
            if mpath.is_file():
                mask = load_mask(mpath, cfg.device)
            elif cfg.mask_path:
                mask = load_mask(cfg.mask_path, cfg.device)
            else:
                batches = [_batch(cfg, ctx, fx, rx, ry, i, stream=3) for i in range(cfg.mask_batches)]
                params = dict(unet.named_parameters())
                mask = compute_mask(params, batches, lambda b: _mask_loss(ctx, b), cfg.mask_ratio,
                                    progress=lambda d, t: emit(progress, "mask", d, t))
            save_mask(mask, mpath)
            info["mask"] = {k: v for k, v in mask_stats(mask).items() if k != "per_layer"}
            timing["mask"] = time.time() - t0
        named = prepare_masked_params(dict(unet.named_parameters()), mask)
        opt, decoupled = make_optimizer("adam", named.values(), lr=cfg.lr)
        upd = MaskedUpdate(named, mask, decoupled_weight_decay=decoupled)
        start = 0
        if ck is not None:
            state = unet.state_dict()
            with torch.no_grad():
                for k, v in ck.params.items():
                    state[k].copy_(v)
            load_optimizer_state(opt, ck.optimizer, ck.optimizer_meta)
            start = ck.step
            lines = log_path.read_text().splitlines() if log_path.is_file() else []
            log_path.write_text("".join(ln + "\n" for ln in lines if json.loads(ln)["step"] <= start))
            logger.info("resuming %s at step %d", out, start)
        elif log_path.exists():
            log_path.unlink()
        t0 = time.time()
        with open(log_path, "a") as log:
            for step in range(start, cfg.steps):
                b = _batch(cfg, ctx, fx, rx, ry, step)
                losses = spec.loss(ctx, b)
                loss = losses["loss"]
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"loss is {loss.item()} at step {step}; lower --lr")
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(list(named.values()), 1.0)
                upd.before_step(cfg.lr)
                opt.step()
                upd.after_step()
                rec = {"step": step + 1, **{k: round(float(v.detach()), 6) for k, v in losses.items()}}
                log.write(json.dumps(rec) + "\n")
                log.flush()
                emit(progress, "erase", step + 1, cfg.steps, **rec)
                done = step + 1
                stop = cancel is not None and cancel.is_set() and done < cfg.steps
                if done % cfg.checkpoint_every == 0 or stop:
                    ot, ometa = optimizer_state_to_tensors(opt)
                    run.save_checkpoint(Checkpoint(done, {n: p.detach() for n, p in named.items()}, ot, ometa, config))
                if stop:
                    raise ClassEraseCancelled(f"cancelled at step {done}; re-run the same command to resume")
        timing["train"] = time.time() - t0
        weights = {n: unet.state_dict()[n] for n in _changed_names(unet, mask)}
        atomic_save_safetensors(weights, run.partial / "weights.safetensors")
        info.update(changed_params=sum(v.numel() for v in weights.values()), steps=cfg.steps)
    timing["total"] = time.time() - t_start
    timing["cpu"] = time.process_time() - cpu_start  # this process's CPU seconds: the time on an idle core
    info["timing_s"] = {k: round(v, 2) for k, v in timing.items()}
    info["created"] = time.strftime("%Y-%m-%dT%H:%M:%S")
    atomic_write_json(run.partial / "run.json", info)
    return run.publish()


def _mask_loss(ctx, b) -> torch.Tensor:
    from erasure.ddpm.methods import guided_forget_loss

    return guided_forget_loss(ctx, b)


def load_class_run(run_dir: str | os.PathLike, device: str | torch.device = "cpu", base_model: str | None = None):
    """The run's base model with the erased weights overlaid (a :class:`~erasure.ddpm.model.ClassDDPM`)."""
    from erasure.ddpm.model import load_class_ddpm
    from erasure.runs import RunDirError, apply_run_weights, load_run_weights, read_run

    info = read_run(run_dir)
    if info.get("format") != DDPM_RUN_FORMAT:
        raise RunDirError(f"{run_dir} is not a class-conditional DDPM run (format {info.get('format')})")
    base = base_model or info["base_model"]
    if not Path(base).is_dir():
        raise FileNotFoundError(f"the run's base model {base} is missing; pass --model with the same model folder")
    model = load_class_ddpm(base, device)
    apply_run_weights(model.unet, load_run_weights(run_dir), run_dir)
    model.unet.eval()
    model.extra["run"] = dict(info, run_dir=str(Path(run_dir).resolve()))
    return model
