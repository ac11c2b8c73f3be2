"""Class-conditional pixel-space DDPM: a diffusers ``UNet2DModel`` with class embeddings + a DDPM/DDIM scheduler.

A model folder is a diffusers layout::

    model_index.json   {"_class_name": "ClassConditionalDDPMPipeline", "unet": [...], "scheduler": [...],
                        "class_names": [...], "guidance_scale": 2.0, "num_inference_steps": 50, ...}
    unet/              UNet2DModel (num_class_embeds = len(class_names) + 1; the last id is the null class)
    scheduler/         DDIMScheduler config (the training schedule: 1000 steps, epsilon prediction)

Classifier-free guidance: ``eps = eps(x, null) + w * (eps(x, c) - eps(x, null))``; the null class is trained by
class dropout. Each image's starting noise comes from its own ``torch.Generator`` seeded with its seed, so an
image depends only on (model, class, seed, sampler settings), never on the batch it was drawn in (up to float
rounding).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "PIPELINE_CLASS",
    "is_class_ddpm_folder",
    "build_unet",
    "build_scheduler",
    "ClassDDPM",
    "load_class_ddpm",
]

PIPELINE_CLASS = "ClassConditionalDDPMPipeline"


def is_class_ddpm_folder(path: str | os.PathLike) -> bool:
    """True when ``path`` is a folder holding a class-conditional DDPM (``model_index.json`` names our pipeline)."""
    p = Path(path) / "model_index.json"
    if not p.is_file():
        return False
    try:
        return json.loads(p.read_text()).get("_class_name") == PIPELINE_CLASS
    except (OSError, ValueError):
        return False


def build_unet(
    n_classes: int,
    image_size: int = 32,
    channels: tuple[int, ...] = (32, 64, 64),
    attention: tuple[bool, ...] = (False, False, True),
    layers_per_block: int = 1,
    norm_num_groups: int = 16,
    dropout: float = 0.0,
):
    """A fresh ``UNet2DModel`` with ``n_classes + 1`` class embeddings (the last one is the null class)."""
    from diffusers import UNet2DModel

    if len(channels) != len(attention):
        raise ValueError("channels and attention must have the same length")
    down = tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in attention)
    up = tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention))
    return UNet2DModel(
        sample_size=image_size,
        in_channels=3,
        out_channels=3,
        block_out_channels=tuple(channels),
        down_block_types=down,
        up_block_types=up,
        layers_per_block=layers_per_block,
        norm_num_groups=norm_num_groups,
        attention_head_dim=None if norm_num_groups else 8,
        dropout=dropout,
        num_class_embeds=n_classes + 1,
    )


def build_scheduler(kind: str = "ddpm", num_train_timesteps: int = 1000, beta_schedule: str = "linear"):
    """The DDPM paper's schedule (linear betas 1e-4..0.02 over 1000 steps, epsilon prediction)."""
    from diffusers import DDIMScheduler, DDPMScheduler

    cls = {"ddpm": DDPMScheduler, "ddim": DDIMScheduler}[kind]
    kw: dict[str, Any] = dict(
        num_train_timesteps=num_train_timesteps,
        beta_start=1e-4,
        beta_end=0.02,
        beta_schedule=beta_schedule,
        prediction_type="epsilon",
        clip_sample=True,
    )
    if kind == "ddim":
        kw["set_alpha_to_one"] = True
    return cls(**kw)


@dataclass
class ClassDDPM:
    """A loaded class-conditional DDPM: ``unet``, ``scheduler`` (DDIM), class names and sampler defaults."""

    unet: Any
    scheduler: Any
    class_names: list[str]
    guidance_scale: float = 2.0
    num_inference_steps: int = 50
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def null_class(self) -> int:
        return len(self.class_names)

    @property
    def image_size(self) -> int:
        return int(self.unet.config.sample_size)

    def class_index(self, name: str | int) -> int:
        """A class name (or index) -> its index; an unknown name raises a one-line ValueError."""
        if isinstance(name, int) and not isinstance(name, bool):
            if 0 <= name < len(self.class_names):
                return name
        elif name in self.class_names:
            return self.class_names.index(name)
        raise ValueError(f"unknown class {name!r}; choose one of {', '.join(self.class_names)}")

    def predict_eps(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.unet(x, t, class_labels=labels).sample

    @torch.no_grad()
    def sample(
        self,
        classes: list[str | int | None],
        seeds: list[int],
        guidance_scale: float | None = None,
        num_inference_steps: int | None = None,
        batch_size: int = 64,
        output: str = "pil",
    ):
        """Draw one image per ``(class, seed)``.

        Args:
            classes: class names or indices, one per image; ``None`` draws from the null class (the model's
                unconditional distribution, no guidance).
            seeds: per-image seeds of the starting noise.
            guidance_scale: classifier-free guidance weight (1 = no guidance); defaults to the model's.
            num_inference_steps: DDIM steps (eta 0); defaults to the model's.
            batch_size: images per UNet call.
            output: ``"pil"`` (list of PIL images) or ``"tensor"`` (float ``[n, 3, H, W]`` in [0, 1]).
        """
        if len(classes) != len(seeds):
            raise ValueError("classes and seeds must have the same length")
        w = self.guidance_scale if guidance_scale is None else float(guidance_scale)
        steps = self.num_inference_steps if num_inference_steps is None else int(num_inference_steps)
        labels = [self.null_class if c is None else self.class_index(c) for c in classes]
        dev = next(self.unet.parameters()).device
        size = self.image_size
        outs = []
        for i in range(0, len(labels), batch_size):
            lab = torch.tensor(labels[i : i + batch_size], device=dev)
            x = torch.stack(
                [torch.randn(3, size, size, generator=torch.Generator().manual_seed(int(s))) for s in seeds[i : i + batch_size]]
            ).to(dev)
            outs.append(self._denoise(x, lab, w, steps))
        img = (torch.cat(outs) / 2 + 0.5).clamp(0, 1) if outs else torch.empty(0, 3, size, size)
        if output == "tensor":
            return img
        from erasure.shapes.data import to_pil

        return to_pil(img)

    def _denoise(self, x: torch.Tensor, lab: torch.Tensor, w: float, steps: int) -> torch.Tensor:
        sched = self.scheduler
        sched.set_timesteps(steps)
        null = torch.full_like(lab, self.null_class)
        for t in sched.timesteps:
            tt = t.expand(x.shape[0]).to(x.device)
            if w == 1.0:
                eps = self.predict_eps(x, tt, lab)
            else:
                e = self.predict_eps(torch.cat([x, x]), torch.cat([tt, tt]), torch.cat([lab, null]))
                ec, eu = e.chunk(2)
                eps = eu + w * (ec - eu)
            x = sched.step(eps, t, x, eta=0.0).prev_sample
        return x

    def save(self, path: str | os.PathLike, extra: dict[str, Any] | None = None) -> None:
        """Write the diffusers folder (not atomic: write into a temp folder and publish it with erasure.io)."""
        import diffusers

        p = Path(path)
        p.mkdir(parents=True, exist_ok=True)
        self.unet.save_pretrained(p / "unet", safe_serialization=True)
        self.scheduler.save_pretrained(p / "scheduler")
        index = {
            "_class_name": PIPELINE_CLASS,
            "_diffusers_version": diffusers.__version__,
            "unet": ["diffusers", "UNet2DModel"],
            "scheduler": ["diffusers", type(self.scheduler).__name__],
            "class_names": list(self.class_names),
            "null_class": self.null_class,
            "guidance_scale": self.guidance_scale,
            "num_inference_steps": self.num_inference_steps,
            **self.extra,
            **(extra or {}),
        }
        (p / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")


def load_class_ddpm(path: str | os.PathLike, device: str | torch.device = "cpu") -> ClassDDPM:
    """Load a class-conditional DDPM folder; a folder of another kind raises a one-line ValueError."""
    from diffusers import DDIMScheduler, UNet2DModel

    p = Path(path)
    if not (p / "model_index.json").is_file():
        raise FileNotFoundError(f"{p} has no model_index.json; pass a class-conditional DDPM folder (e.g. models/shapes-ddpm)")
    index = json.loads((p / "model_index.json").read_text())
    if index.get("_class_name") != PIPELINE_CLASS:
        raise ValueError(f"{p} is a {index.get('_class_name')} folder, not a {PIPELINE_CLASS}; pass a class-conditional DDPM")
    unet = UNet2DModel.from_pretrained(str(p / "unet")).to(device).eval()
    scheduler = DDIMScheduler.from_pretrained(str(p / "scheduler"))
    names = list(index["class_names"])
    if unet.config.num_class_embeds != len(names) + 1:
        raise ValueError(f"{p}: the UNet has {unet.config.num_class_embeds} class embeddings, expected {len(names) + 1}")
    known = {"_class_name", "_diffusers_version", "unet", "scheduler", "class_names", "null_class", "guidance_scale", "num_inference_steps"}
    return ClassDDPM(
        unet,
        scheduler,
        names,
        float(index.get("guidance_scale", 2.0)),
        int(index.get("num_inference_steps", 50)),
        {k: v for k, v in index.items() if k not in known},
    )
