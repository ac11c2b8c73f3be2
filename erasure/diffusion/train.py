"""Saliency masks and masked fine-tuning for Stable Diffusion UNets; writes the run directory.

Data flow: config -> pipeline -> Df/Dr latents -> (mask) -> fine-tune -> ``RUN_DIR``. Batches, timesteps
and noise of step ``k`` come from a generator seeded by ``(seed, k)``, so a resumed run continues exactly as
an uninterrupted one would.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import os
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from erasure.config import EraseConfig, MaskConfig
from erasure.diffusion.data import ForgetRetainData, build_forget_retain
from erasure.diffusion.losses import StepBatch, add_noise, mask_loss
from erasure.diffusion.pipeline import default_resolution, load_pipeline, model_fingerprint, resolve_model
from erasure.io import (
    atomic_save_safetensors,
    atomic_write_json,
    atomic_write_text,
    environment_info,
    load_optimizer_state,
    load_safetensors,
    optimizer_state_to_tensors,
    read_json,
)
from erasure.masked import MaskedUpdate, make_optimizer, prepare_masked_params
from erasure.methods import get_method
from erasure.runs import RUN_FORMAT, partial_dir
from erasure.saliency import accumulate_gradients, load_mask, mask_stats, save_mask, threshold_mask

logger = logging.getLogger(__name__)

__all__ = [
    "Progress",
    "RunExistsError",
    "NonFiniteLossError",
    "EraseCancelled",
    "trainable_filter",
    "compute_mask",
    "compute_mask_from_data",
    "erase",
]

Progress = Callable[[str, int, int, dict], None]
"""``progress(stage, done, total, info)``; stages: loading, generating Df/Dr, encoding images, mask, fine-tuning, saving."""


class RunExistsError(FileExistsError):
    """The output directory already holds a run."""


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN or inf; the last good checkpoint is kept."""


class EraseCancelled(RuntimeError):
    """The run was cancelled; a checkpoint was written so it can resume."""


def trainable_filter(name: str, mode: str) -> bool:
    """Which UNet parameters may train: ``full``, ``xattn`` (cross-attention ``attn2``), ``noxattn`` (the rest, as ESD-u)."""
    is_xattn = ".attn2." in name
    if mode == "full":
        return True
    if mode == "xattn":
        return is_xattn
    if mode == "noxattn":
        return not (is_xattn or name.startswith(("time_embedding", "conv_out", "conv_norm_out")))
    raise ValueError(f"trainable must be full, xattn or noxattn, got {mode!r}")


def _emit(progress: Progress | None, stage: str, done: int, total: int, **info: Any) -> None:
    if progress is not None:
        progress(stage, done, total, info)


def _step_generator(seed: int, step: int, rank: int = 0, salt: int = 0) -> torch.Generator:
    return torch.Generator("cpu").manual_seed((seed * 1_000_003 + step * 7919 + rank * 104_729 + salt) % (2**63))


def _sample(data: ForgetRetainData, cfg: EraseConfig, g: torch.Generator, scheduler, device, with_retain: bool) -> StepBatch:
    nf = data.forget_latents.shape[0]
    fi = torch.randint(0, nf, (cfg.batch_size,), generator=g)
    fx = data.forget_latents[fi].to(device)
    x_t, t, noise = add_noise(scheduler, fx, g)
    b = StepBatch(
        forget_x=x_t, forget_t=t, forget_noise=noise,
        forget_cond=data.embeddings[data.forget_prompt[fi]].to(device),
        anchor_cond=data.embeddings[data.anchor_prompt[fi]].to(device),
        uncond=data.uncond.to(device),
    )
    if with_retain and data.retain_latents is not None:
        ri = torch.randint(0, data.retain_latents.shape[0], (cfg.batch_size,), generator=g)
        rx, rt, rn = add_noise(scheduler, data.retain_latents[ri].to(device), g)
        b.retain_x, b.retain_t, b.retain_noise = rx, rt, rn
        b.retain_cond = data.embeddings[data.retain_prompt[ri]].to(device)
    return b


def compute_mask_from_data(
    unet, scheduler, data: ForgetRetainData, cfg: MaskConfig, seed: int, batch_size: int, trainable: str = "full",
    progress: Progress | None = None,
) -> dict[str, torch.Tensor]:
    """Saliency mask over the UNet parameters selected by ``trainable``; the others get all-False masks."""
    named = dict(unet.named_parameters())
    scored = {n: p for n, p in named.items() if trainable_filter(n, trainable)}
    req = {n: p.requires_grad for n, p in named.items()}
    for n, p in named.items():
        p.requires_grad_(n in scored)
    nf = data.forget_latents.shape[0]
    n_batches = cfg.mask_batches or math.ceil(nf / batch_size)
    device = next(unet.parameters()).device

    def batches():
        for i in range(n_batches):
            g = _step_generator(seed, i, salt=17)
            idx = torch.arange(i * batch_size, (i + 1) * batch_size) % nf
            x_t, t, noise = add_noise(scheduler, data.forget_latents[idx].to(device), g)
            yield StepBatch(
                forget_x=x_t, forget_t=t, forget_noise=noise,
                forget_cond=data.embeddings[data.forget_prompt[idx]].to(device),
                anchor_cond=data.embeddings[data.anchor_prompt[idx]].to(device),
                uncond=data.uncond.to(device),
            )

    try:
        scores = accumulate_gradients(
            scored, batches(), lambda b: mask_loss(unet, b, cfg.mask_guidance), mode=cfg.mask_score, total=n_batches,
            progress=(lambda d, t: _emit(progress, "mask", d, t)),
        )
    finally:
        for n, p in named.items():
            p.requires_grad_(req[n])
            p.grad = None
    mask = threshold_mask(scores, cfg.mask_ratio)
    del scores
    for n, p in named.items():
        if n not in mask:
            mask[n] = torch.zeros(p.shape, dtype=torch.bool, device=p.device)
    return {n: mask[n] for n in named}


def _prepare(cfg: EraseConfig, progress: Progress | None, need_retain: bool, device=None):
    _emit(progress, "loading", 0, 1)
    model = resolve_model(cfg.model)
    pipe = load_pipeline(model, device=device if device is not None else cfg.device)
    res = cfg.resolution or default_resolution(pipe)
    _emit(progress, "loading", 1, 1)
    data = build_forget_retain(
        pipe, cfg.concepts, model_fingerprint(model), cfg.forget_images_per_prompt, cfg.retain_images_per_prompt,
        cfg.data_steps, cfg.data_guidance, res, cfg.seed, cfg.cache_dir, need_retain=need_retain,
        progress=(lambda s, d, t: _emit(progress, s, d, t)) if progress else None,
    )
    return model, pipe, data, res


def compute_mask(
    cfg: EraseConfig, out: str | os.PathLike | None = None, progress: Progress | None = None, overwrite: bool = False
) -> dict[str, torch.Tensor]:
    """Generate Df with the original model and compute the SalUn saliency mask; save it to ``out`` if given."""
    if out is not None and Path(out).exists() and not overwrite:
        raise RunExistsError(f"{out} already exists; pass --overwrite or choose another --out")
    model, pipe, data, _ = _prepare(cfg, progress, need_retain=False)
    mask = compute_mask_from_data(pipe.unet, pipe.scheduler, data, cfg, cfg.seed, cfg.batch_size, cfg.trainable, progress)
    if out is not None:
        stats = mask_stats(mask)
        save_mask(mask, out, metadata={"base_model": model, "mask_config": MaskConfig(
            mask_ratio=cfg.mask_ratio, mask_guidance=cfg.mask_guidance, mask_batches=cfg.mask_batches,
            mask_score=cfg.mask_score).to_dict(), "concepts": [c.to_dict() for c in cfg.concepts],
            "trainable": cfg.trainable, "seed": cfg.seed, "kept": stats["kept"], "total": stats["total"]})
    return mask


@dataclass
class _Ctx:
    """What a method's loss sees."""

    unet: Any
    frozen_unet: Any
    scheduler_config: Any
    config: EraseConfig
    generator: torch.Generator


def _resume_key(cfg: EraseConfig) -> dict:
    d = cfg.to_dict()
    for k in ("device", "checkpoint_every", "cache_dir"):
        d.pop(k, None)
    return d


def _save_checkpoint(part: Path, step: int, trainable: dict, optimizer, cfg: EraseConfig) -> None:
    ck = part / f"checkpoint-{step}"
    tmp = part / f".checkpoint-{step}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    atomic_save_safetensors({n: p.detach() for n, p in trainable.items()}, tmp / "params.safetensors")
    tens, meta = optimizer_state_to_tensors(optimizer)
    atomic_save_safetensors(tens, tmp / "optimizer.safetensors")
    atomic_write_json(tmp / "state.json", {"step": step, "optimizer": meta, "resume_key": _resume_key(cfg)})
    shutil.rmtree(ck, ignore_errors=True)
    os.replace(tmp, ck)
    atomic_write_text(part / "latest_checkpoint", ck.name)
    for old in part.glob("checkpoint-*"):
        if old != ck:
            shutil.rmtree(old, ignore_errors=True)


def _load_checkpoint(part: Path, cfg: EraseConfig) -> tuple[int, dict, dict, dict] | None:
    latest = part / "latest_checkpoint"
    if not latest.is_file():
        return None
    ck = part / latest.read_text().strip()
    state = read_json(ck / "state.json")
    if state.get("resume_key") != _resume_key(cfg):
        raise RunExistsError(
            f"{part} holds an interrupted run with a different config; delete it or pass --overwrite to start over"
        )
    params, _ = load_safetensors(ck / "params.safetensors")
    opt_t, _ = load_safetensors(ck / "optimizer.safetensors")
    return int(state["step"]), params, opt_t, state["optimizer"]


def _check_out(out: Path, overwrite: bool) -> None:
    if out.exists():
        if not out.is_dir():
            raise RunExistsError(f"{out} exists and is not a directory; choose another --out")
        if any(out.iterdir()) and not overwrite:
            raise RunExistsError(f"{out} already holds a run; pass --overwrite to replace it or choose another --out")


def erase(
    cfg: EraseConfig,
    out_dir: str | os.PathLike,
    overwrite: bool = False,
    progress: Progress | None = None,
    cancel: threading.Event | None = None,
    mask: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Run one erasure and write ``out_dir`` (see :mod:`erasure.runs`). Resumes from ``out_dir.partial`` if present.

    Args:
        cfg (`EraseConfig`): what to erase and how.
        out_dir (`str`): the run directory to create.
        overwrite (`bool`, defaults to False): replace an existing run (and any interrupted one).
        progress (`Progress`, *optional*): ``progress(stage, done, total, info)``.
        cancel (`threading.Event`, *optional*): when set, the run checkpoints and raises :class:`EraseCancelled`.
        mask (`dict[str, BoolTensor]`, *optional*): a precomputed mask (else ``cfg.mask_path`` or computed).

    Returns:
        `Path` of the finished run directory.
    """
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    t0 = time.time()
    out = Path(out_dir)
    _check_out(out, overwrite)
    part = partial_dir(out)
    if overwrite:
        shutil.rmtree(part, ignore_errors=True)
    method = get_method(cfg.method)
    trainable_mode = method.trainable or cfg.trainable
    part.mkdir(parents=True, exist_ok=True)
    resume = _load_checkpoint(part, cfg)

    accelerator = Accelerator(
        cpu=str(cfg.device) == "cpu" or not torch.cuda.is_available(),
        mixed_precision=cfg.mixed_precision,
    )
    device = accelerator.device
    try:
        return _erase(cfg, out, part, method, trainable_mode, resume, accelerator, device, progress, cancel, mask, t0)
    finally:
        if accelerator.num_processes == 1:
            AcceleratorState._reset_state(True)  # noqa: SLF001 - allow another erase() with other settings


def _erase(cfg, out, part, method, trainable_mode, resume, accelerator, device, progress, cancel, mask, t0) -> Path:
    # the main process generates (and caches) Df/Dr first; the others then read the cache
    with accelerator.main_process_first():
        model, pipe, data, res = _prepare(cfg, progress, need_retain=method.uses_retain and cfg.alpha > 0,
                                          device=device)
    t_data = time.time()
    unet = pipe.unet
    pipe.text_encoder.requires_grad_(False)
    pipe.vae.requires_grad_(False)
    named = dict(unet.named_parameters())

    # mask
    if method.needs_mask:
        if mask is None and cfg.mask_path:
            mask = load_mask(cfg.mask_path)
        if mask is None and (part / "mask.safetensors").is_file():
            mask = load_mask(part / "mask.safetensors")
        if mask is None:
            mask = compute_mask_from_data(unet, pipe.scheduler, data, cfg, cfg.seed, cfg.batch_size, trainable_mode, progress)
            if accelerator.num_processes > 1:  # every rank trains rank 0's mask (GPU gradients are not bitwise equal)
                from accelerate.utils import broadcast

                mask = {n: broadcast(m.to(device, torch.uint8)).bool() for n, m in mask.items()}
            if accelerator.is_main_process:
                save_mask(mask, part / "mask.safetensors", metadata={"base_model": model, "mask_ratio": cfg.mask_ratio})
        elif accelerator.is_main_process and not (part / "mask.safetensors").is_file():
            save_mask(mask, part / "mask.safetensors", metadata={"base_model": model, "mask_ratio": cfg.mask_ratio})
        missing = sorted(set(named) - set(mask))
        if missing:
            raise ValueError(f"the mask does not match this UNet (no entry for {missing[0]}); recompute it for this model")
        mask = {n: m.to(named[n].device) & trainable_filter(n, trainable_mode) for n, m in mask.items() if n in named}
    else:
        mask = None
    t_mask = time.time()

    for n, p in named.items():
        p.requires_grad_(trainable_filter(n, trainable_mode))
    trainable = prepare_masked_params({n: p for n, p in named.items() if p.requires_grad}, mask)
    for n, p in named.items():
        if n not in trainable:
            p.requires_grad_(False)
    with_retain = method.uses_retain and cfg.alpha > 0
    frozen = None
    if method.needs_frozen_unet or (with_retain and cfg.retain_loss == "distill"):
        frozen = copy.deepcopy(unet).requires_grad_(False).eval()
    if cfg.gradient_checkpointing:
        unet.enable_gradient_checkpointing()

    unet.to(device)
    if frozen is not None:
        frozen.to(device)
    optimizer, decoupled = make_optimizer(
        cfg.optimizer, trainable.values(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
    )
    upd = MaskedUpdate(trainable, mask, weight_decay=cfg.weight_decay, decoupled_weight_decay=decoupled,
                       restore_frozen=cfg.optimizer == "adam8bit")
    start = 0
    log_path = part / "log.jsonl"
    if resume is not None:
        start, params, opt_t, opt_meta = resume
        with torch.no_grad():
            for n, p in trainable.items():
                p.copy_(params[n].to(p.device))
        load_optimizer_state(optimizer, opt_t, opt_meta)
        lines = log_path.read_text().splitlines()[:start] if log_path.is_file() else []
        atomic_write_text(log_path, "".join(line + "\n" for line in lines))
        logger.info("resuming %s from step %d", part, start)
    elif log_path.is_file():
        log_path.unlink()
    model_dp, optimizer = accelerator.prepare(unet, optimizer)
    model_dp.train()
    ctx = _Ctx(unet=model_dp, frozen_unet=frozen, scheduler_config=pipe.scheduler.config, config=cfg,
               generator=torch.Generator())
    last = {}
    with open(log_path, "a", encoding="utf-8") as log:
        for step in range(start, cfg.steps):
            g = _step_generator(cfg.seed, step, accelerator.process_index)
            ctx.generator = g
            parts_sum: dict[str, float] = {}
            for _ in range(cfg.grad_accum):
                b = _sample(data, cfg, g, pipe.scheduler, device, with_retain)
                with accelerator.autocast():
                    parts = method.loss(ctx, b)
                loss = parts["loss"]
                if not torch.isfinite(loss):
                    raise NonFiniteLossError(
                        f"loss is {loss.item()} at step {step}; the last good checkpoint is kept in {part}. "
                        "Lower --lr (or use --mixed-precision no) and re-run with the same --out to resume"
                    )
                accelerator.backward(loss / cfg.grad_accum)
                for k, v in parts.items():
                    parts_sum[k] = parts_sum.get(k, 0.0) + float(v.detach()) / cfg.grad_accum
            if getattr(accelerator, "scaler", None) is not None:
                accelerator.unscale_gradients()
            upd.mask_gradients()
            if cfg.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(list(trainable.values()), cfg.max_grad_norm)
            upd.apply_weight_decay(cfg.lr)
            optimizer.step()
            upd.after_step()
            optimizer.zero_grad(set_to_none=True)
            last = {"step": step + 1, **{k: round(v, 6) for k, v in parts_sum.items()}}
            if accelerator.is_main_process:
                log.write(json.dumps(last) + "\n")
                log.flush()
            _emit(progress, "fine-tuning", step + 1, cfg.steps, **last)
            done = step + 1
            if accelerator.is_main_process and done < cfg.steps and (
                (cfg.checkpoint_every and done % cfg.checkpoint_every == 0) or (cancel is not None and cancel.is_set())
            ):
                log.flush()
                _save_checkpoint(part, done, trainable, optimizer, cfg)
            if cancel is not None and cancel.is_set() and done < cfg.steps:
                raise EraseCancelled(f"erasure cancelled at step {done}; re-run with the same --out to resume")
    t_train = time.time()
    _emit(progress, "saving", 0, 1)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        raw = accelerator.unwrap_model(model_dp)
        state = raw.state_dict()
        weights = {n: state[n].detach().float() if state[n].is_floating_point() else state[n] for n in trainable}
        atomic_save_safetensors(weights, part / "weights.safetensors", metadata={"format": RUN_FORMAT, "base_model": model})
        info = {
            "format": RUN_FORMAT,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "method": cfg.method,
            "needs_mask": method.needs_mask,
            "base_model": model,
            "base_model_fingerprint": model_fingerprint(model),
            "concepts": [c.name for c in cfg.concepts],
            "config": cfg.to_dict(),
            "seed": cfg.seed,
            "resolution": res,
            "trainable": trainable_mode,
            "unet_params": sum(p.numel() for p in named.values()),
            "changed_params": sum(p.numel() for p in trainable.values()),
            "mask": None if mask is None else {k: v for k, v in mask_stats(mask).items() if k != "per_layer"},
            "data": {"forget_images": len(data.forget_files), "retain_images": len(data.retain_files),
                     "prompts": data.prompts},
            "final": last,
            "timing_s": {"data": round(t_data - t0, 2), "mask": round(t_mask - t_data, 2),
                         "train": round(t_train - t_mask, 2), "total": round(time.time() - t0, 2)},
            "resumed_from_step": start or None,
            "environment": environment_info(),
        }
        atomic_write_json(part / "run.json", info)
        for ck in part.glob("checkpoint-*"):
            shutil.rmtree(ck, ignore_errors=True)
        with contextlib.suppress(FileNotFoundError):
            (part / "latest_checkpoint").unlink()
        _publish(part, out)
    _emit(progress, "saving", 1, 1)
    return out


def _publish(part: Path, out: Path) -> None:
    """Move the finished ``part`` onto ``out``; an existing ``out`` is replaced only after the new run is complete."""
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
    os.replace(part, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
