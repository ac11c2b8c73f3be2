"""Diffusion erasure, in phases: set up the run folder and devices, load the model and Df/Dr, the saliency
mask, the trainable parameters and the optimizer, restore a checkpoint, fit (or run a closed-form edit), save.

Data flow: config -> pipeline -> Df/Dr latents -> (mask) -> fine-tune or edit -> ``RUN_DIR``. Batches,
timesteps and noise of step ``k`` come from a generator seeded by ``(seed, k)``, so a resumed run continues
exactly as an uninterrupted one would.
"""

from __future__ import annotations

import contextlib
import copy
import gc
import json
import logging
import os
import shutil
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from erasure.backbones import Backbone, check_method_family, get_backbone
from erasure.config import EraseConfig, MaskConfig
from erasure.diffusion.data import ForgetRetainData, build_forget_retain
from erasure.diffusion.losses import StepBatch
from erasure.diffusion.mask import (
    compute_mask_from_data,
    resolve_mask,
    save_run_mask,
    step_generator,
    trainable_filter,
)
from erasure.diffusion.pipeline import default_resolution, load_pipeline, model_fingerprint, resolve_model
from erasure.io import (
    atomic_save_safetensors,
    atomic_write_json,
    atomic_write_text,
    environment_info,
    load_optimizer_state,
    optimizer_state_to_tensors,
)
from erasure.masked import MaskedUpdate, make_optimizer, prepare_masked_params
from erasure.methods import MethodConfig, MethodSpec
from erasure.progress import Progress, ProgressEvent, emit
from erasure.runs import RUN_FORMAT, Checkpoint, RunDir, RunExistsError
from erasure.saliency import load_mask, mask_stats, save_mask

logger = logging.getLogger(__name__)

__all__ = ["Progress", "RunExistsError", "NonFiniteLossError", "EraseCancelled", "EraseContext", "trainable_filter",
           "compute_mask", "compute_mask_from_data", "erase", "RESUME_IGNORES"]

RESUME_IGNORES = ("device", "checkpoint_every", "cache_dir")
"""Config keys that may differ between an interrupted run and its resumption (they do not change the result)."""


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN or inf; the last good checkpoint is kept."""


class EraseCancelled(RuntimeError):
    """The run was cancelled; a checkpoint was written so it can resume."""


@dataclass
class EraseContext:
    """What a method sees: the config, its own args, the models, the data, the randomness and the listeners.

    ``unet`` is the denoiser being changed (the UNet, or the SD3/FLUX transformer; wrapped for data parallelism
    inside :func:`fit`); ``frozen_unet`` a frozen copy of the original when the method asked for one; ``data`` is
    None for methods that need no images. ``log`` collects metric dicts a ``run`` method wants in ``log.jsonl``.
    ``backbone`` is the model family (:mod:`erasure.backbones`): ``ctx.predict`` calls the denoiser.
    """

    config: EraseConfig
    args: MethodConfig
    pipe: Any
    unet: Any
    device: torch.device
    frozen_unet: Any = None
    data: ForgetRetainData | None = None
    generator: torch.Generator = field(default_factory=torch.Generator)
    progress: Progress | None = None
    cancel: threading.Event | None = None
    log: list[dict[str, Any]] = field(default_factory=list)
    run_info: dict[str, Any] | None = None  # extra run.json entries from the caller (settings_source, tuning)
    backbone: Backbone = field(default_factory=lambda: get_backbone("sd"))
    run: RunDir | None = None  # a ``run`` method with its own loop checkpoints into ``run.partial``
    mask: dict[str, torch.Tensor] | None = None  # the mask a masked ``run`` method trained in (it saves the file)
    prepared_concepts: list | None = None  # the concepts after erasure.auto (see ``concepts``)
    retain_weights: dict[str, float] | None = None  # weight of a retain prompt (neighbours); 1 when absent

    @property
    def scheduler_config(self) -> Any:
        return self.pipe.scheduler.config

    @property
    def predict(self) -> Any:
        return self.backbone.predict

    @property
    def text_encoder(self) -> Any:
        """The encoder whose token states the cross-attention K/V read (SDXL: both CLIPs as one)."""
        return self.backbone.token_encoder(self.pipe)[0]

    @property
    def tokenizer(self) -> Any:
        return self.backbone.token_encoder(self.pipe)[1]

    @property
    def concepts(self) -> list:
        """The run's concepts as the method should use them: with the automatic retain, neighbour and forget
        paraphrase prompts when ``config.auto`` added some (``prepared_concepts``), else the config's."""
        return self.prepared_concepts if self.prepared_concepts is not None else self.config.concepts

    def cancelled(self) -> bool:
        return self.cancel is not None and self.cancel.is_set()


@dataclass
class _Inputs:
    model: str
    pipe: Any
    data: ForgetRetainData | None
    resolution: int
    auto: dict | None = None  # what erasure.auto added (run.json "auto")
    concepts: list | None = None  # the config's concepts with what erasure.auto added
    retain_weights: dict[str, float] | None = None  # retain prompt -> weight (neighbours)
    backbone: Backbone = field(default_factory=lambda: get_backbone("sd"))


# ------------------------------------------------------------------------------------------------ phases
def load_inputs(cfg: EraseConfig, spec: MethodSpec, device, progress: Progress | None = None) -> _Inputs:
    """Load the base pipeline and build Df (and Dr when the method's args use retain data)."""
    model = resolve_model(cfg.model)  # a wrong model fails before any progress is drawn
    backbone = check_method_family(cfg, spec)
    emit(progress, "loading", 0, 1)
    pipe = load_pipeline(model, device=device, drop_t5=cfg.drop_t5)
    res = cfg.resolution or default_resolution(pipe)
    emit(progress, "loading", 1, 1)
    data, concepts, weights, auto = None, cfg.concepts, None, None
    from erasure.auto.prepare import anchor_missing, auto_active, prepare_concepts

    if auto_active(cfg) and (spec.needs_images or cfg.method_args.uses_retain_prompts() or anchor_missing(cfg)):
        # closed-form edits (UCE) get the automatic retain and neighbour sets as their preserve prompts
        concepts, weights, auto = prepare_concepts(cfg, pipe, model, cfg.method_args.uses_retain_prompts(),
                                                   retain_required=cfg.method_args.uses_retain())
    if spec.needs_images:
        key = model_fingerprint(model) + ("|drop_t5" if cfg.drop_t5 else "")  # Df/Dr cache key
        data_seed = cfg.seed if cfg.data_seed is None else cfg.data_seed
        data = build_forget_retain(
            pipe, concepts, key, cfg.forget_images_per_prompt, cfg.retain_images_per_prompt,
            cfg.data_steps, cfg.data_guidance, res, data_seed, cfg.cache_dir, need_retain=cfg.method_args.uses_retain(),
            progress=progress, latent_std=cfg.image_latents == "sample", retain_weights=weights,
        )
    for module in backbone.frozen_modules(pipe):
        module.requires_grad_(False)
    return _Inputs(model, pipe, data, res, auto=auto, backbone=backbone, concepts=concepts, retain_weights=weights)


def select_parameters(unet, mode: str, mask: dict[str, torch.Tensor] | None,
                      backbone: Backbone | None = None) -> dict[str, torch.nn.Parameter]:
    """Set ``requires_grad`` on the parameters that may train (filter, then mask) and return them by name."""
    named = dict(unet.named_parameters())
    for n, p in named.items():
        p.requires_grad_(trainable_filter(n, mode, backbone))
    trainable = prepare_masked_params({n: p for n, p in named.items() if p.requires_grad}, mask)
    for n, p in named.items():
        if n not in trainable:
            p.requires_grad_(False)
    return trainable


def build_optimizer(cfg: EraseConfig, trainable: dict, mask: dict | None) -> tuple[torch.optim.Optimizer, MaskedUpdate]:
    optimizer, decoupled = make_optimizer(cfg.optimizer, trainable.values(), lr=cfg.lr, momentum=cfg.momentum,
                                          weight_decay=cfg.weight_decay)
    upd = MaskedUpdate(trainable, mask, weight_decay=cfg.weight_decay, decoupled_weight_decay=decoupled,
                       restore_frozen=cfg.optimizer == "adam8bit")
    return optimizer, upd


def save_checkpoint(run: RunDir, cfg: EraseConfig, done: int, params: dict, optimizer) -> None:
    """Checkpoint ``done`` steps: the tensors ``params`` (the trainable ones, by run-file name, and any extra state),
    the optimizer and the whole config (a resume must be the same run); :func:`restore` reads it back."""
    tens, meta = optimizer_state_to_tensors(optimizer)
    run.save_checkpoint(Checkpoint(done, {n: p.detach() for n, p in params.items()}, tens, meta, cfg.to_dict()))


def restore(run: RunDir, cfg: EraseConfig, trainable: dict, optimizer, is_main: bool = True) -> int:
    """Load the latest checkpoint of an interrupted run with the same settings; returns the step to start at.

    Every rank loads the checkpoint; only the main process trims ``log.jsonl`` to it."""
    ck = run.load_checkpoint(same_run=cfg.to_dict(), ignore=RESUME_IGNORES)
    log_path = run.partial / "log.jsonl"
    if ck is None:
        if is_main and log_path.is_file():
            log_path.unlink()
        return 0
    with torch.no_grad():
        for n, p in trainable.items():
            p.copy_(ck.params[n].to(p.device))
    load_optimizer_state(optimizer, ck.optimizer, ck.optimizer_meta)
    if is_main:
        lines = log_path.read_text(encoding="utf-8").splitlines()[: ck.step] if log_path.is_file() else []
        atomic_write_text(log_path, "".join(line + "\n" for line in lines))
    logger.info("resuming %s from step %d", run.partial, ck.step)
    return ck.step


def sample_batch(data: ForgetRetainData, cfg: EraseConfig, g: torch.Generator, scheduler, device,
                 with_retain: bool, backbone: Backbone | None = None) -> StepBatch:
    """One micro-batch of Df (and Dr) at random timesteps, drawn from ``g``."""
    backbone = backbone or get_backbone("sd")
    nf = data.forget_latents.shape[0]
    fi = torch.randint(0, nf, (cfg.batch_size,), generator=g)
    x_t, t, noise = backbone.noise(scheduler, data.latents("forget", fi, g).to(device), g)
    b = StepBatch(
        forget_x=x_t, forget_t=t, forget_noise=noise,
        forget_cond=data.embeddings[data.forget_prompt[fi]].to(device),
        anchor_cond=data.embeddings[data.anchor_prompt[fi]].to(device),
        uncond=data.uncond.to(device),
    )
    if with_retain and data.retain_latents is not None:
        ri = torch.randint(0, data.retain_latents.shape[0], (cfg.batch_size,), generator=g)
        rx, rt, rn = backbone.noise(scheduler, data.latents("retain", ri, g).to(device), g)
        b.retain_x, b.retain_t, b.retain_noise = rx, rt, rn
        b.retain_cond = data.embeddings[data.retain_prompt[ri]].to(device)
        if data.retain_weight is not None:
            b.retain_weight = data.retain_weight[ri].to(device)
    return b


def _any_rank(accelerator, flag: bool) -> bool:
    """True on every rank if ``flag`` is True on any (one rank's cancel or NaN ends them all together)."""
    if accelerator.num_processes == 1:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=accelerator.device)
    return bool(accelerator.reduce(t, reduction="sum").item() > 0)


def fit(ctx: EraseContext, spec: MethodSpec, accelerator, run: RunDir, trainable: dict, optimizer, upd: MaskedUpdate,
        start: int) -> dict[str, Any]:
    """The training loop of a per-step (``loss``) method; returns the last step's metrics."""
    cfg = ctx.config
    with_retain = ctx.args.uses_retain()
    scaler = getattr(accelerator, "scaler", None)
    last: dict[str, Any] = {}
    main = accelerator.is_main_process
    with open(run.partial / "log.jsonl", "a", encoding="utf-8") if main else contextlib.nullcontext() as log:
        for step in range(start, cfg.steps):
            g = step_generator(cfg.seed, step, accelerator.process_index)
            ctx.generator = g
            sums: dict[str, float] = {}
            for _ in range(cfg.grad_accum):
                b = sample_batch(ctx.data, cfg, g, ctx.pipe.scheduler, ctx.device, with_retain, ctx.backbone)
                with accelerator.autocast():
                    parts = spec.loss(ctx, b)
                loss = parts["loss"]
                if _any_rank(accelerator, not bool(torch.isfinite(loss))):
                    raise NonFiniteLossError(
                        f"loss is {loss.item()} at step {step}; the last good checkpoint is kept in {run.partial}, but a "
                        "resume repeats the same steps: start again with a lower --lr (or --mixed-precision no) and "
                        "--overwrite"
                    )
                accelerator.backward(loss / cfg.grad_accum)
                for k, v in parts.items():
                    sums[k] = sums.get(k, 0.0) + float(v.detach()) / cfg.grad_accum
            # zero what lies outside the mask before the grad scaler looks for inf: an overflow there must not
            # skip a step, and decoupled weight decay must not apply on a step the scaler skips
            upd.mask_gradients()
            if scaler is not None:
                accelerator.unscale_gradients()
            finite = scaler is None or all(bool(torch.isfinite(p.grad).all()) for p in trainable.values()
                                           if p.grad is not None)
            if cfg.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(list(trainable.values()), cfg.max_grad_norm)
            if finite:
                upd.apply_weight_decay(cfg.lr)
            optimizer.step()
            upd.after_step()
            optimizer.zero_grad(set_to_none=True)
            last = {"step": step + 1, **{k: round(v, 6) for k, v in sums.items()}}
            if not finite:
                last["skipped"] = True
            if main:
                log.write(json.dumps(last) + "\n")
                log.flush()
            emit(ctx.progress, "fine-tuning", step + 1, cfg.steps, **last)
            done = step + 1
            stop = done < cfg.steps and _any_rank(accelerator, ctx.cancelled())
            if main and done < cfg.steps and (
                (cfg.checkpoint_every and done % cfg.checkpoint_every == 0) or stop
            ):
                log.flush()
                save_checkpoint(run, cfg, done, trainable, optimizer)
            if stop:
                accelerator.wait_for_everyone()
                raise EraseCancelled(f"erasure cancelled at step {done}; re-run with the same output folder to resume")
    return last


def _mask_summary(mask: dict[str, torch.Tensor]) -> dict[str, Any]:
    """run.json's mask entry: kept/total/ratio over every weight, and per module when the mask covers the text
    encoder too (``modules``: ``denoiser`` / ``text_encoder``), so "keeps 1.2% of weights" can say of which."""
    from erasure.runs import TE_PREFIX

    stats = mask_stats(mask)
    out = {k: v for k, v in stats.items() if k != "per_layer"}
    if any(n.startswith(TE_PREFIX) for n in mask):
        mods: dict[str, dict[str, Any]] = {}
        for n, s in stats["per_layer"].items():
            m = mods.setdefault("text_encoder" if n.startswith(TE_PREFIX) else "denoiser", {"total": 0, "kept": 0})
            m["total"] += s["numel"]
            m["kept"] += s["kept"]
        out["modules"] = {k: {**m, "ratio": m["kept"] / m["total"] if m["total"] else 0.0} for k, m in mods.items()}
    return out


def save_run(run: RunDir, ctx: EraseContext, spec: MethodSpec, inputs: _Inputs, weights: dict[str, torch.Tensor],
             mask: dict | None, trainable_mode: str, unet_params: int, last: dict, timing: dict, start: int) -> Path:
    """Write weights and run.json into the partial folder and publish it (main process only)."""
    cfg = ctx.config
    atomic_save_safetensors(weights, run.partial / "weights.safetensors",
                            metadata={"format": RUN_FORMAT, "base_model": inputs.model})
    if not (run.partial / "log.jsonl").is_file():
        atomic_write_text(run.partial / "log.jsonl", "".join(json.dumps(r) + "\n" for r in ctx.log))
    data = inputs.data
    info = {
        "format": RUN_FORMAT,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "method": cfg.method,
        "method_shape": spec.shape,
        "needs_mask": spec.needs_mask,
        "base_model": inputs.model,
        "family": inputs.backbone.name,
        "denoiser": inputs.backbone.denoiser_attr,
        "base_model_fingerprint": model_fingerprint(inputs.model),
        "concepts": [c.name for c in cfg.concepts],
        "config": cfg.to_dict(),
        "seed": cfg.seed,
        "resolution": inputs.resolution,
        "trainable": trainable_mode,
        "unet_params": unet_params,
        "changed_params": sum(t.numel() for t in weights.values()),
        "mask": None if mask is None else _mask_summary(mask),
        "data": None if data is None else {"forget_images": len(data.forget_files),
                                           "retain_images": len(data.retain_files), "prompts": data.prompts},
        "final": last,
        "timing_s": timing,
        "resumed_from_step": start or None,
        "environment": environment_info(),
    }
    if inputs.auto is not None:
        info["auto"] = inputs.auto
    info.update(ctx.run_info or {})
    atomic_write_json(run.partial / "run.json", info)
    return run.publish()


# ------------------------------------------------------------------------------------------------ entry points
def compute_mask(
    cfg: EraseConfig, out: str | os.PathLike | None = None, progress: Progress | None = None, overwrite: bool = False
) -> dict[str, torch.Tensor]:
    """Generate Df with the original model and compute the SalUn saliency mask; save it to ``out`` if given.

    The mask covers the parameters the method may train (``cfg.trainable``, or the method's own filter).
    """
    if out is not None:
        p = Path(out)
        if p.is_dir():
            raise RunExistsError(f"{out} is a directory; give a .safetensors file path")
        if p.exists() and not overwrite:
            raise RunExistsError(f"{out} already exists; pass --overwrite or choose another --out")
    spec = cfg.spec
    mode = spec.trainable or cfg.trainable
    inputs = load_inputs(cfg, _with_images(spec), cfg.device, progress)
    bb = inputs.backbone
    for name in (*bb.text_modules, "vae"):  # Df is encoded: the mask needs only the denoiser (SDXL: frees ~3.6 GB)
        if getattr(inputs.pipe, name, None) is not None:
            setattr(inputs.pipe, name, None)
    gc.collect()
    mask = compute_mask_from_data(bb.denoiser(inputs.pipe), inputs.pipe.scheduler, inputs.data, cfg, cfg.seed,
                                  cfg.batch_size, mode, progress, bb)
    if out is not None:
        stats = mask_stats(mask)
        save_mask(mask, out, metadata={"base_model": inputs.model, "mask_config": MaskConfig(
            mask_ratio=cfg.mask_ratio, mask_guidance=cfg.mask_guidance, mask_batches=cfg.mask_batches,
            mask_score=cfg.mask_score, mask_score_dtype=cfg.mask_score_dtype).to_dict(), "concepts": [c.to_dict() for c in cfg.concepts],
            "trainable": mode, "seed": cfg.seed, "kept": stats["kept"], "total": stats["total"]})
    return mask


def _with_images(spec: MethodSpec) -> MethodSpec:
    import dataclasses

    return spec if spec.needs_images else dataclasses.replace(spec, needs_images=True)


def _accelerator(cfg: EraseConfig):
    from accelerate import Accelerator

    cpu = str(cfg.device) == "cpu" or not torch.cuda.is_available()
    if not cpu and str(cfg.device).startswith("cuda:") and int(os.environ.get("WORLD_SIZE", "1")) == 1:
        torch.cuda.set_device(torch.device(cfg.device))  # the accelerator's "cuda" is the current device
    return Accelerator(cpu=cpu, mixed_precision=cfg.mixed_precision)


def erase(
    cfg: EraseConfig,
    out_dir: str | os.PathLike,
    overwrite: bool = False,
    progress: Progress | None = None,
    cancel: threading.Event | None = None,
    mask: dict[str, torch.Tensor] | None = None,
    run_info: dict[str, Any] | None = None,
) -> Path:
    """Run one erasure and write ``out_dir`` (see :mod:`erasure.runs`). Resumes from ``out_dir.partial`` if present.

    Args:
        cfg (`EraseConfig`): what to erase and how.
        out_dir (`str`): the run directory to create.
        overwrite (`bool`, defaults to False): replace an existing run (and any interrupted one).
        progress (`Progress`, *optional*): called with a :class:`erasure.progress.ProgressEvent` per unit of work.
        cancel (`threading.Event`, *optional*): when set, the run checkpoints and raises :class:`EraseCancelled`.
        mask (`dict[str, BoolTensor]`, *optional*): a precomputed mask (else ``cfg.mask_path`` or computed).
        run_info (`dict`, *optional*): extra top-level run.json entries (``settings_source``, ``tuning``).

    Returns:
        `Path` of the finished run directory.
    """
    from accelerate.state import AcceleratorState

    t0 = time.time()
    run = RunDir(out_dir)
    run.check_target(overwrite)
    spec = cfg.spec
    progress = _stop_between_units(progress, cancel)
    if spec.needs_mask and mask is None and cfg.mask_path:  # a bad mask file fails before anything is written
        load_mask(cfg.mask_path)
    check_method_family(cfg, spec)  # before anything is written or generated
    accelerator = _accelerator(cfg)
    fresh = overwrite or not run.partial.exists()
    try:
        if accelerator.is_main_process:  # only the main process touches the partial folder
            run.begin(overwrite)
        accelerator.wait_for_everyone()
        if spec.run is not None:
            return _erase_by_edit(cfg, spec, run, accelerator, progress, cancel, t0, run_info)
        return _erase_by_training(cfg, spec, run, accelerator, progress, cancel, mask, t0, run_info)
    except (EraseCancelled, NonFiniteLossError):
        raise
    except BaseException:
        # nothing to resume from: do not leave an empty or half-made partial folder that a rerun would trip on
        if fresh and accelerator.is_main_process and not (run.partial / "latest_checkpoint").is_file():
            shutil.rmtree(run.partial, ignore_errors=True)
        raise
    finally:
        if accelerator.num_processes == 1:
            AcceleratorState._reset_state(True)  # noqa: SLF001 - allow another erase() with other settings


def _stop_between_units(progress: Progress | None, cancel: threading.Event | None) -> Progress | None:
    """Stop a cancelled run between units of the stages before training (image generation, encoding, the mask
    pass); from fine-tuning on, :func:`fit` checks the event itself after each step and checkpoints first."""
    if cancel is None:
        return progress

    def listener(event: ProgressEvent) -> None:
        if progress is not None:
            progress(event)
        if cancel.is_set() and event.stage in ("loading", "generating Df/Dr", "encoding images", "mask"):
            raise EraseCancelled(f"erasure cancelled while {event.stage}; generated images stay cached, so re-running "
                                 "continues from them")

    return listener


def _erase_by_edit(cfg, spec, run, accelerator, progress, cancel, t0, run_info=None) -> Path:
    inputs = load_inputs(cfg, spec, accelerator.device, progress)
    t_data = time.time()
    unet = inputs.backbone.denoiser(inputs.pipe)
    unet.requires_grad_(False)
    ctx = EraseContext(config=cfg, args=cfg.method_args, pipe=inputs.pipe, unet=unet, device=accelerator.device,
                       data=inputs.data, generator=step_generator(cfg.seed, 0), progress=progress, cancel=cancel,
                       backbone=inputs.backbone, run=run, run_info=run_info, prepared_concepts=inputs.concepts,
                       retain_weights=inputs.retain_weights)
    if cfg.method_args.needs_frozen_unet():
        ctx.frozen_unet = copy.deepcopy(unet).requires_grad_(False).eval()
    emit(progress, "editing", 0, 1)
    weights = spec.run(ctx)
    if ctx.cancelled():
        raise EraseCancelled("erasure cancelled; nothing was saved (a closed-form edit restarts from the beginning)")
    from erasure.runs import TE_PREFIX

    state = unet.state_dict()
    te_state = {TE_PREFIX + n for n in inputs.pipe.text_encoder.state_dict()}
    bad = sorted(set(weights) - set(state) - te_state)
    if bad:
        raise ValueError(f"method {spec.name!r} returned {bad[0]!r}, which is not a parameter of the denoiser or the text encoder")
    if spec.needs_mask and ctx.mask is None:
        raise ValueError(f"method {spec.name!r} needs a mask but left ctx.mask unset")
    weights = {n: t.detach().float().cpu().contiguous() for n, t in weights.items()}
    emit(progress, "editing", 1, 1)
    t_edit = time.time()
    emit(progress, "saving", 0, 1)
    accelerator.wait_for_everyone()
    out = run.path
    if accelerator.is_main_process:
        timing = {"data": round(t_data - t0, 2), "mask": 0.0, "train": round(t_edit - t_data, 2),
                  "total": round(time.time() - t0, 2)}
        out = save_run(run, ctx, spec, inputs, weights, ctx.mask, "edit", sum(p.numel() for p in unet.parameters()),
                       ctx.log[-1] if ctx.log else {}, timing, 0)
    emit(progress, "saving", 1, 1)
    return out


def _erase_by_training(cfg, spec, run, accelerator, progress, cancel, given_mask, t0, run_info=None) -> Path:
    device = accelerator.device
    with accelerator.main_process_first():  # the main process generates (and caches) Df/Dr; the others read it
        inputs = load_inputs(cfg, spec, device, progress)
    t_data = time.time()
    unet = inputs.backbone.denoiser(inputs.pipe)
    named = dict(unet.named_parameters())
    mode = spec.trainable or cfg.trainable

    mask = None
    if spec.needs_mask:
        mask, computed = resolve_mask(cfg, unet, inputs.pipe.scheduler, inputs.data, mode, run.partial, given_mask,
                                      progress, inputs.backbone)
        if computed and accelerator.num_processes > 1:  # every rank trains rank 0's mask (GPU sums differ bitwise)
            from accelerate.utils import broadcast

            mask = {n: broadcast(m.to(device, torch.uint8)).bool() for n, m in mask.items()}
        if accelerator.is_main_process:
            save_run_mask(mask, run.partial / "mask.safetensors", cfg, mode, inputs.model)
    t_mask = time.time()

    trainable = select_parameters(unet, mode, mask, inputs.backbone)
    args = cfg.method_args
    frozen = copy.deepcopy(unet).requires_grad_(False).eval() if args.needs_frozen_unet() else None
    if cfg.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    unet.to(device)
    if frozen is not None:
        frozen.to(device)
    optimizer, upd = build_optimizer(cfg, trainable, mask)
    accelerator.wait_for_everyone()
    start = restore(run, cfg, trainable, optimizer, accelerator.is_main_process)
    model_dp, optimizer = accelerator.prepare(unet, optimizer)
    model_dp.train()
    ctx = EraseContext(config=cfg, args=args, pipe=inputs.pipe, unet=model_dp, device=device, frozen_unet=frozen,
                       data=inputs.data, progress=progress, cancel=cancel, backbone=inputs.backbone,
                       run_info=run_info, prepared_concepts=inputs.concepts, retain_weights=inputs.retain_weights)
    last = fit(ctx, spec, accelerator, run, trainable, optimizer, upd, start)
    t_train = time.time()
    emit(progress, "saving", 0, 1)
    accelerator.wait_for_everyone()
    out = run.path
    if accelerator.is_main_process:
        state = accelerator.unwrap_model(model_dp).state_dict()
        weights = {n: state[n].detach().float() if state[n].is_floating_point() else state[n] for n in trainable}
        timing = {"data": round(t_data - t0, 2), "mask": round(t_mask - t_data, 2), "train": round(t_train - t_mask, 2),
                  "total": round(time.time() - t0, 2)}
        out = save_run(run, ctx, spec, inputs, weights, mask, mode, sum(p.numel() for p in named.values()), last, timing,
                       start)
    accelerator.wait_for_everyone()
    emit(progress, "saving", 1, 1)
    return out
