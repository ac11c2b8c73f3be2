"""Concept specs and the erasure config: the single source of every knob of an erasure run."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from erasure.auto.config import AutoConfig
from erasure.jsonconfig import JsonConfig, field

__all__ = ["ConceptSpec", "EraseConfig", "MaskConfig", "TRAINABLE_CHOICES"]

TRAINABLE_CHOICES = ("full", "xattn", "noxattn")
MAX_NAME_CHARS = 200


def _check_prompts(name: str, prompts: list[str], allow_empty: bool = False, allow_blank: bool = False) -> list[str]:
    """``allow_empty``: the list may be empty; ``allow_blank``: a prompt may be ``""`` (the unconditional prompt)."""
    if isinstance(prompts, str):
        prompts = [prompts]
    if not isinstance(prompts, (list, tuple)):
        raise ValueError(f"{name} must be a list of strings")
    if not prompts and not allow_empty:
        raise ValueError(f"{name} is empty: give at least one prompt")
    for p in prompts:
        if not isinstance(p, str) or not (p.strip() or allow_blank):
            raise ValueError(f"{name} contains an empty prompt: every prompt must contain text")
    return [p.strip() for p in prompts]


@dataclass
class ConceptSpec(JsonConfig):
    """One concept to erase: what to forget, what to map it to, and what to keep."""

    name: str = field(help="Short name of the concept, e.g. 'nudity' or 'circle'.")
    forget_prompts: list[str] = field(default_factory=list, help="Prompts that produce the concept (Df is generated from them).")
    anchor_prompts: list[str] = field(
        default_factory=list,
        help="Remap targets: one prompt for all forget prompts, or one per forget prompt (paired by position); "" is the "
        "empty prompt; none: chosen by auto.anchor_rule.",
    )
    retain_prompts: list[str] = field(default_factory=list, help="Prompts whose outputs must not change (Dr).")
    forget_images: str | list[str] | None = field(
        default=None, help="Folder of user images to use as Df instead of generating (a list: one folder per forget "
        "prompt, paired by position).")
    retain_images: str | list[str] | None = field(
        default=None, help="Folder of user images to use as Dr instead of generating (a list: one folder per retain "
        "prompt, paired by position).")

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.strip():
            raise ValueError("concept name must be a non-empty string")
        if len(self.name) > MAX_NAME_CHARS:
            raise ValueError(f"concept name is {len(self.name)} characters long; keep it under {MAX_NAME_CHARS}")
        for key in ("forget_images", "retain_images"):
            v = getattr(self, key)
            items = v if isinstance(v, list) else [v]
            if v is not None and (not items or not all(isinstance(x, str) and x.strip() for x in items)):
                raise ValueError(f"concept {self.name!r}: {key.replace('_', ' ')} must be a folder path or a list of "
                                 f"them, got {v!r}")
        self.forget_prompts = _check_prompts("forget prompts", self.forget_prompts)
        # "" is the empty (unconditional) prompt, ESD's and UCE's default target
        self.anchor_prompts = _check_prompts("anchor prompts", self.anchor_prompts, allow_empty=True, allow_blank=True)
        self.retain_prompts = _check_prompts("retain prompts", self.retain_prompts, allow_empty=True)
        for key, prompts in (("forget_images", self.forget_prompts), ("retain_images", self.retain_prompts)):
            v = getattr(self, key)
            if isinstance(v, list) and len(v) != len(prompts):
                raise ValueError(f"concept {self.name!r}: {key.replace('_', ' ')} lists {len(v)} folders for "
                                 f"{len(prompts)} {key.split('_')[0]} prompts; give one folder per prompt (or one folder)")
        if len(self.anchor_prompts) not in (0, 1, len(self.forget_prompts)):
            raise ValueError(
                f"concept {self.name!r}: give 1 anchor prompt or one per forget prompt "
                f"({len(self.forget_prompts)}), got {len(self.anchor_prompts)}"
            )

    def anchor_for(self, i: int) -> str:
        """The anchor prompt paired with forget prompt ``i``."""
        if not self.anchor_prompts:
            raise ValueError(f"concept {self.name!r} has no anchor prompt: give one (--anchor-prompt) or let the "
                             "erasure choose it (--anchor-rule nearest)")
        return self.anchor_prompts[0] if len(self.anchor_prompts) == 1 else self.anchor_prompts[i]


@dataclass
class MaskConfig(JsonConfig):
    """How the saliency mask is computed (used by ``erasure mask`` and by masked methods)."""

    mask_ratio: float = field(
        0.5, help="Fraction of the trainable weights (the UNet's that the trainable-parameter setting or the method selects; "
        "the text encoder's for text-remap) kept in the saliency mask, in (0, 1].", label="Mask ratio", min=0.0, max=1.0, min_exclusive=True,
    )
    mask_guidance: float = field(7.5, help="CFG scale w in the mask loss eps_cfg = (1+w) eps(x_t,c) - w eps(x_t,'').",
                                 label="Mask guidance", min=0.0, max=100.0)
    mask_batches: int = field(0, help="Forget batches to accumulate over (0 = one pass over Df).", min=0, max=100_000)
    mask_score: Literal["abs_of_sum", "sum_of_abs"] = field(
        "abs_of_sum", help="Saliency score: |sum of gradients| (reference) or sum of |gradients|."
    )
    mask_score_dtype: Literal["auto", "float32", "bfloat16", "float16"] = field(
        "auto", help="Dtype the saliency scores accumulate in (gradients are freed as they arrive): float32 is exact, "
        "bfloat16 halves the memory (about one 16-bit copy of the weights) and may flip ties at the threshold; auto = "
        "float32 up to 1.5B scored weights (SD v1/v2), bfloat16 above (SDXL, SD3, FLUX)."
    )

    def __post_init__(self) -> None:
        self.check_fields()


@dataclass
class EraseConfig(MaskConfig):
    """Everything an erasure run needs; saved as ``run.json["config"]``.

    Generic knobs are fields of this class; the method's own knobs (SalUn's ``alpha`` and ``retain_loss``,
    ESD's negative guidance, UCE's regulariser, ...) are ``method_args``, an instance of the method's config
    class (see :mod:`erasure.methods`). Older files with those knobs at the top level still load.
    """

    model: str = field("default", help="Base model: a local diffusers folder (SD v1/v2, SDXL, SD3 or FLUX), a hub id, or 'default' "
                       "(embedded shapes model).")
    drop_t5: bool = field(False, help="SD3 only: load the pipeline without its T5 text encoder (CLIP only, far less memory).")
    concepts: list[ConceptSpec] = field(default_factory=list, help="Concepts to erase.", cli=False)
    method: str = field("salun", help="Erasure method (see `erasure methods`).")
    method_args: Any = field(None, help="The method's own settings (its config class; defaults when omitted).", cli=False)
    mask_path: str | None = field(None, help="Use this precomputed mask (from `erasure mask`) instead of computing one.")
    # data
    forget_images_per_prompt: int = field(8, help="Images generated per forget prompt for Df.", label="Df images per prompt",
                                          min=1, max=100_000)
    retain_images_per_prompt: int = field(4, help="Images generated per retain prompt for Dr.", label="Dr images per prompt",
                                          min=0, max=100_000)
    data_steps: int = field(25, help="Sampling steps used to generate Df/Dr.", label="Sampling steps (Df/Dr)", min=1, max=1000)
    data_guidance: float = field(7.5, help="CFG scale used to generate Df/Dr.", min=0.0, max=100.0)
    resolution: int = field(0, help="Training/generation resolution in pixels (0 = the model's native size).", min=0,
                            max=4096)
    image_latents: Literal["mean", "sample"] = field(
        "mean", help="VAE latents of the Df/Dr images: the posterior mean, or a fresh posterior sample at every "
        "training step and mask batch (as the SalUn/LDM reference code encodes real images).",
        label="Image latents")
    # training
    steps: int = field(100, help="Optimizer steps.", label="Steps", min=1, max=1_000_000)
    batch_size: int = field(4, help="Forget (and retain) images per step.", label="Batch size", min=1, max=4096)
    lr: float = field(1e-5, help="Learning rate.", label="Learning rate", min=0.0, max=1.0, min_exclusive=True)
    trainable: Literal["full", "xattn", "noxattn"] = field(
        "full", help="UNet parameters that may train: full, xattn (cross-attention only), noxattn (all but cross-attention)."
    )
    optimizer: Literal["adam", "adamw", "sgd", "adam8bit"] = field("adam", help="Optimizer.")
    weight_decay: float = field(0.0, help="Weight decay (applied inside the mask only).", min=0.0, max=10.0)
    momentum: float = field(0.9, help="SGD momentum, in [0, 1).", min=0.0, max=0.999999)
    max_grad_norm: float = field(0.0, help="Clip the gradient norm to this value (0 = off).", min=0.0, max=1e9)
    grad_accum: int = field(1, help="Gradient accumulation steps per optimizer step.", min=1, max=4096)
    mixed_precision: Literal["no", "fp16", "bf16"] = field("no", help="Autocast precision; master weights stay float32.")
    gradient_checkpointing: bool = field(False, help="Trade compute for memory in the UNet.")
    checkpoint_every: int = field(50, help="Save a resumable checkpoint every N steps (0 = never).", min=0, max=1_000_000)
    seed: int = field(0, help="Seed for data generation, timesteps, noise and batch order.", min=0, max=2**63 - 1)
    data_seed: int | None = field(None, help="Seed for generating Df/Dr only (default: --seed); fix it to train several seeds on the same data.", min=0, max=2**63 - 1)
    device: str = field("auto", help="auto, cpu, cuda or cuda:N.")
    cache_dir: str | None = field(None, help="Where generated Df/Dr images are cached (default ~/.cache/salun-erasure).")
    auto: AutoConfig = field(default_factory=AutoConfig, help="Automatic retain and neighbour sets (erasure.auto).",
                             cli=False, ui=False)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EraseConfig:
        """Also reads files written before ``method_args`` (method knobs at the top level)."""
        from erasure.methods import LEGACY_KEYS

        if isinstance(data, dict) and any(k in data for k in LEGACY_KEYS):
            data = dict(data)
            method = data.get("method", "salun")
            args = dict(data.get("method_args") or {})
            fields = _method_fields(method)
            for old, new in LEGACY_KEYS.items():
                if old in data:
                    value = data.pop(old)
                    if new in fields:
                        args[new] = value
            data["method_args"] = args
        return super().from_dict(data)

    def __post_init__(self) -> None:
        self.check_fields()
        if not isinstance(self.model, str) or not self.model.strip():
            raise ValueError("model must be a path, a hub id or 'default'")
        if not self.concepts:
            raise ValueError("no concept to erase: give at least one forget prompt")
        if not isinstance(self.concepts, list):
            raise ValueError("concepts must be a list of concept specs")
        self.concepts = [c if isinstance(c, ConceptSpec) else ConceptSpec.from_dict(c) for c in self.concepts]
        names = [c.name for c in self.concepts]
        if len(set(names)) != len(names):
            raise ValueError(f"concept names must be unique, got {names}")
        from erasure.methods import MethodConfig, get_method

        spec = get_method(self.method)
        if self.method_args is None:
            self.method_args = spec.config_cls()
        elif isinstance(self.method_args, dict):
            self.method_args = spec.config_cls.from_dict(self.method_args)
        elif not isinstance(self.method_args, spec.config_cls):
            got = type(self.method_args).__name__ if isinstance(self.method_args, MethodConfig) else repr(self.method_args)
            raise ValueError(f"method_args of method {self.method!r} must be a {spec.config_cls.__name__} or a JSON object, "
                             f"got {got}")
        if self.resolution and self.resolution % 8:
            raise ValueError(f"resolution must be a multiple of 8, got {self.resolution}")
        if self.mixed_precision == "fp16" and self.device == "cpu":
            raise ValueError("fp16 mixed precision needs a CUDA GPU; use --mixed-precision bf16 or no on CPU")
        if self.auto is None:
            self.auto = AutoConfig()
        elif isinstance(self.auto, dict):
            self.auto = AutoConfig.from_dict(self.auto)
        missing = [c.name for c in self.concepts if not c.anchor_prompts]
        if missing and self.auto.anchor_rule == "none":
            raise ValueError(f"concept {missing[0]!r} has no anchor prompt (what it is remapped to): give one "
                             "(--anchor-prompt) or let the erasure choose it (--anchor-rule nearest or empty)")
        if spec.needs_images and self.method_args.uses_retain() and not self.auto.min_retain and not any(
            c.retain_prompts or c.retain_images for c in self.concepts
        ):
            raise ValueError("this method's retain loss needs retain prompts (or a retain image folder): add "
                             "--retain-prompt, set --min-retain above 0 for an automatic retain set, or set --alpha 0 "
                             "to train without one")

    @property
    def spec(self):
        """The registered :class:`erasure.methods.MethodSpec` of ``method``."""
        from erasure.methods import get_method

        return get_method(self.method)


def _method_fields(method: str) -> set[str]:
    import dataclasses

    from erasure.methods import METHODS

    spec = METHODS.get(method)
    return {f.name for f in dataclasses.fields(spec.config_cls)} if spec is not None else set()
