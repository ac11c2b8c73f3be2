"""Concept specs and the erasure config: the single source of every knob of an erasure run."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from erasure.jsonconfig import JsonConfig, field

__all__ = ["ConceptSpec", "EraseConfig", "MaskConfig", "TRAINABLE_CHOICES"]

TRAINABLE_CHOICES = ("full", "xattn", "noxattn")


def _check_prompts(name: str, prompts: list[str], allow_empty: bool = False) -> list[str]:
    if isinstance(prompts, str):
        prompts = [prompts]
    if not isinstance(prompts, (list, tuple)):
        raise ValueError(f"{name} must be a list of strings")
    if not prompts and not allow_empty:
        raise ValueError(f"{name} is empty: give at least one prompt")
    for p in prompts:
        if not isinstance(p, str) or not p.strip():
            raise ValueError(f"{name} contains an empty prompt: every prompt must contain text")
    return [p.strip() for p in prompts]


@dataclass
class ConceptSpec(JsonConfig):
    """One concept to erase: what to forget, what to map it to, and what to keep."""

    name: str = field(help="Short name of the concept, e.g. 'nudity' or 'circle'.")
    forget_prompts: list[str] = field(default_factory=list, help="Prompts that produce the concept (Df is generated from them).")
    anchor_prompts: list[str] = field(
        default_factory=list,
        help="Remap targets: one prompt for all forget prompts, or one per forget prompt (paired by position).",
    )
    retain_prompts: list[str] = field(default_factory=list, help="Prompts whose outputs must not change (Dr).")
    forget_images: str | None = field(default=None, help="Folder of user images to use as Df instead of generating.")
    retain_images: str | None = field(default=None, help="Folder of user images to use as Dr instead of generating.")

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.strip():
            raise ValueError("concept name must be a non-empty string")
        self.forget_prompts = _check_prompts("forget prompts", self.forget_prompts)
        self.anchor_prompts = _check_prompts("anchor prompts", self.anchor_prompts)
        self.retain_prompts = _check_prompts("retain prompts", self.retain_prompts, allow_empty=True)
        if len(self.anchor_prompts) not in (1, len(self.forget_prompts)):
            raise ValueError(
                f"concept {self.name!r}: give 1 anchor prompt or one per forget prompt "
                f"({len(self.forget_prompts)}), got {len(self.anchor_prompts)}"
            )

    def anchor_for(self, i: int) -> str:
        """The anchor prompt paired with forget prompt ``i``."""
        return self.anchor_prompts[0] if len(self.anchor_prompts) == 1 else self.anchor_prompts[i]


@dataclass
class MaskConfig(JsonConfig):
    """How the saliency mask is computed (used by ``erasure mask`` and by masked methods)."""

    mask_ratio: float = field(0.5, help="Fraction of all UNet weights kept trainable, in (0, 1].")
    mask_guidance: float = field(7.5, help="CFG scale w in the mask loss eps_cfg = (1+w) eps(x_t,c) - w eps(x_t,'').")
    mask_batches: int = field(0, help="Forget batches to accumulate over (0 = one pass over Df).")
    mask_score: Literal["abs_of_sum", "sum_of_abs"] = field(
        "abs_of_sum", help="Saliency score: |sum of gradients| (reference) or sum of |gradients|."
    )

    def __post_init__(self) -> None:
        if isinstance(self.mask_ratio, bool) or not isinstance(self.mask_ratio, (int, float)) or math.isnan(self.mask_ratio):
            raise ValueError(f"mask ratio must be a number in (0, 1], got {self.mask_ratio!r}")
        if not 0.0 < float(self.mask_ratio) <= 1.0:
            raise ValueError(f"mask ratio must be in (0, 1], got {self.mask_ratio}")
        if self.mask_guidance < 0:
            raise ValueError(f"mask guidance must be >= 0, got {self.mask_guidance}")
        if self.mask_batches < 0:
            raise ValueError("mask batches must be >= 0")
        if self.mask_score not in ("abs_of_sum", "sum_of_abs"):
            raise ValueError("mask score must be 'abs_of_sum' or 'sum_of_abs'")


@dataclass
class EraseConfig(MaskConfig):
    """Everything an erasure run needs; saved as ``run.json["config"]``."""

    model: str = field("default", help="Base model: a local diffusers SD folder, a hub id, or 'default' (embedded shapes model).")
    concepts: list[ConceptSpec] = field(default_factory=list, help="Concepts to erase.", cli=False)
    method: str = field("salun", help="Erasure method: salun, rl, esd-x or esd-u (see `erasure methods`).")
    mask_path: str | None = field(None, help="Use this precomputed mask (from `erasure mask`) instead of computing one.")
    # data
    forget_images_per_prompt: int = field(8, help="Images generated per forget prompt for Df.")
    retain_images_per_prompt: int = field(4, help="Images generated per retain prompt for Dr.")
    data_steps: int = field(25, help="Sampling steps used to generate Df/Dr.")
    data_guidance: float = field(7.5, help="CFG scale used to generate Df/Dr.")
    resolution: int = field(0, help="Training/generation resolution in pixels (0 = the model's native size).")
    # training
    steps: int = field(100, help="Optimizer steps.")
    batch_size: int = field(4, help="Forget (and retain) images per step.")
    lr: float = field(1e-5, help="Learning rate.")
    alpha: float = field(0.5, help="Weight of the retain loss on Dr (reference: 0.5 objects, 0.1 nudity).")
    retain_loss: Literal["denoise", "distill"] = field(
        "denoise",
        help="Retain term on Dr: denoise (the paper's MSE to the added noise) or distill (MSE to the frozen "
        "original UNet's conditional and unconditional predictions on Dr; lower-variance, keeps a second UNet "
        "in memory).",
    )
    trainable: Literal["full", "xattn", "noxattn"] = field(
        "full", help="UNet parameters that may train: full, xattn (cross-attention only), noxattn (all but cross-attention)."
    )
    optimizer: Literal["adam", "adamw", "sgd", "adam8bit"] = field("adam", help="Optimizer.")
    weight_decay: float = field(0.0, help="Weight decay (applied inside the mask only).")
    momentum: float = field(0.9, help="SGD momentum.")
    max_grad_norm: float = field(0.0, help="Clip the gradient norm to this value (0 = off).")
    grad_accum: int = field(1, help="Gradient accumulation steps per optimizer step.")
    mixed_precision: Literal["no", "fp16", "bf16"] = field("no", help="Autocast precision; master weights stay float32.")
    gradient_checkpointing: bool = field(False, help="Trade compute for memory in the UNet.")
    esd_negative_guidance: float = field(1.0, help="ESD: negative guidance eta in the target eps_u - eta (eps_c - eps_u).")
    esd_sample_steps: int = field(50, help="ESD: DDIM steps of the trajectory x_t is drawn from.")
    checkpoint_every: int = field(50, help="Save a resumable checkpoint every N steps (0 = never).")
    seed: int = field(0, help="Seed for data generation, timesteps, noise and batch order.")
    device: str = field("auto", help="auto, cpu, cuda or cuda:N.")
    cache_dir: str | None = field(None, help="Where generated Df/Dr images are cached (default ~/.cache/salun-erasure).")

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.model, str) or not self.model.strip():
            raise ValueError("model must be a path, a hub id or 'default'")
        if not self.concepts:
            raise ValueError("no concept to erase: give at least one forget prompt")
        self.concepts = [c if isinstance(c, ConceptSpec) else ConceptSpec.from_dict(c) for c in self.concepts]
        names = [c.name for c in self.concepts]
        if len(set(names)) != len(names):
            raise ValueError(f"concept names must be unique, got {names}")
        from erasure.methods import METHODS

        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; choose one of {sorted(METHODS)}")
        for name in ("forget_images_per_prompt", "data_steps", "steps", "batch_size", "grad_accum", "esd_sample_steps"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name.replace('_', ' ')} must be an integer >= 1, got {v!r}")
        for name in ("retain_images_per_prompt", "checkpoint_every", "resolution", "seed"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"{name.replace('_', ' ')} must be an integer >= 0, got {v!r}")
        if self.resolution and self.resolution % 8:
            raise ValueError(f"resolution must be a multiple of 8, got {self.resolution}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"learning rate must be > 0, got {self.lr}")
        for name in ("alpha", "weight_decay", "max_grad_norm", "data_guidance", "esd_negative_guidance"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or v < 0 or not math.isfinite(v):
                raise ValueError(f"{name.replace('_', ' ')} must be a finite number >= 0, got {v!r}")
        if not 0 <= self.momentum < 1:
            raise ValueError(f"momentum must be in [0, 1), got {self.momentum}")
        if self.trainable not in ("full", "xattn", "noxattn"):
            raise ValueError(f"trainable must be full, xattn or noxattn, got {self.trainable!r}")
        if self.retain_loss not in ("denoise", "distill"):
            raise ValueError(f"retain loss must be denoise or distill, got {self.retain_loss!r}")
        if self.optimizer not in ("adam", "adamw", "sgd", "adam8bit"):
            raise ValueError(f"optimizer must be adam, adamw, sgd or adam8bit, got {self.optimizer!r}")
        if self.mixed_precision not in ("no", "fp16", "bf16"):
            raise ValueError("mixed precision must be no, fp16 or bf16")
        if self.mixed_precision == "fp16" and self.device == "cpu":
            raise ValueError("fp16 mixed precision needs a CUDA GPU; use --mixed-precision bf16 or no on CPU")
        if METHODS[self.method].uses_retain and self.alpha > 0 and not any(
            c.retain_prompts or c.retain_images for c in self.concepts
        ):
            raise ValueError("alpha > 0 needs retain prompts (or a retain image folder); add --retain-prompt or set --alpha 0")
