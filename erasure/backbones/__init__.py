"""Backbones: what the engine needs to know about one family of text-to-image diffusion models.

One module per family, each registering one :class:`Backbone` in :data:`BACKBONES`:

========  ==============================  =============  ==========================================================
family    pipeline (model_index.json)     denoiser       prediction / training target
========  ==============================  =============  ==========================================================
``sd``    StableDiffusionPipeline         ``unet``       epsilon, or v (SD 2.x 768: scheduler ``prediction_type``)
``sdxl``  StableDiffusionXLPipeline       ``unet``       epsilon / v; two CLIPs, pooled embedding, size/crop ids
``sd3``   StableDiffusion3Pipeline        ``transformer``  flow matching (target noise - x0); CLIP-L + CLIP-G (+ T5)
``flux``  FluxPipeline                    ``transformer``  flow matching; CLIP pooled + T5, packed latents, guidance
========  ==============================  =============  ==========================================================

A backbone turns prompts into a :class:`Cond` (every tensor the denoiser needs, one row per prompt), noises a
clean latent and gives the training target, calls the denoiser (``predict(denoiser, x_t, t, cond)``, in the
target's space), says which parameters are "cross-attention" for ``--trainable xattn``, and generates images
through the diffusers pipeline's own ``__call__`` with seeded starting latents. The family of a folder is read
from its ``model_index.json`` ``_class_name``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from erasure.registry import Registry

__all__ = ["Cond", "Backbone", "BACKBONES", "UnsupportedPipelineError", "supported_pipelines", "family_of_class",
           "detect_family", "get_backbone", "backbone_of", "check_method_family", "ALL_FAMILIES", "cat_cond",
           "expand_cond"]

ALL_FAMILIES = ("sd", "sdxl", "sd3", "flux")


class UnsupportedPipelineError(ValueError):
    """A pipeline class no backbone handles."""


@dataclass
class Cond:
    """Prompt conditioning: named tensors with one row per prompt (batch dimension first).

    ``cond[idx]`` with an index tensor/list/slice selects rows; ``cond["prompt_embeds"]`` returns one tensor.
    """

    tensors: dict[str, torch.Tensor]

    def __getitem__(self, idx: Any) -> Any:
        if isinstance(idx, str):
            return self.tensors[idx]
        return Cond({k: v[idx] for k, v in self.tensors.items()})

    def get(self, key: str, default: Any = None) -> Any:
        return self.tensors.get(key, default)

    def __len__(self) -> int:
        return next(iter(self.tensors.values())).shape[0]

    @property
    def device(self) -> torch.device:
        return next(iter(self.tensors.values())).device

    @property
    def dtype(self) -> torch.dtype:
        return self.tensors["prompt_embeds"].dtype

    def to(self, device: Any = None, dtype: torch.dtype | None = None) -> Cond:
        return Cond({k: v.to(device, dtype) if dtype is not None and v.is_floating_point() else v.to(device)
                     for k, v in self.tensors.items()})

    def expand(self, n: int) -> Cond:
        """Repeat a one-row condition to ``n`` rows (a view, as ``Tensor.expand``)."""
        return Cond({k: v.expand(n, *v.shape[1:]) for k, v in self.tensors.items()})

    @staticmethod
    def cat(conds: Sequence[Cond]) -> Cond:
        keys = conds[0].tensors.keys()
        return Cond({k: torch.cat([c.tensors[k] for c in conds]) for k in keys})


def cat_cond(a: Any, b: Any) -> Any:
    """Concatenate two conditions (``Cond`` or plain ``[n, L, D]`` embedding tensors) along the batch."""
    if isinstance(a, Cond):
        return Cond.cat([a, b])
    return torch.cat([a, b])


def expand_cond(c: Any, n: int) -> Any:
    """A one-row condition (``Cond`` or tensor) repeated to ``n`` rows."""
    if isinstance(c, Cond):
        return c.expand(n)
    return c.expand(n, *c.shape[1:])


class Backbone:
    """Base class of a family; subclasses override what differs (see the module docstring)."""

    name: str = ""
    label: str = ""
    pipeline_classes: tuple[str, ...] = ()
    denoiser_attr: str = "unet"
    text_modules: tuple[str, ...] = ("text_encoder",)
    xattn_rule: str = ""
    """One line for ``erasure methods`` and the README: which parameters ``--trainable xattn`` selects."""

    # ---------------------------------------------------------------- loading
    def pipeline_cls(self):
        import diffusers

        return getattr(diffusers, self.pipeline_classes[0])

    def load_kwargs(self, path: str) -> dict[str, Any]:
        """Extra ``from_pretrained`` keyword arguments for the folder (e.g. missing optional encoders)."""
        return {}

    def set_scheduler(self, pipe, scheduler: str) -> None:
        """``ddim``: the family's sampler for erasure and evaluation; ``keep``: the folder's own."""
        if scheduler not in ("ddim", "keep"):
            raise ValueError(f"scheduler must be 'ddim' or 'keep', got {scheduler!r}")

    def denoiser(self, pipe) -> torch.nn.Module:
        return getattr(pipe, self.denoiser_attr)

    def frozen_modules(self, pipe) -> list[torch.nn.Module]:
        """Text encoders and VAE (never trained)."""
        mods = [getattr(pipe, n, None) for n in (*self.text_modules, "vae")]
        return [m for m in mods if m is not None]

    # ---------------------------------------------------------------- conditioning, noise, prediction
    def encode(self, pipe, prompts: Sequence[str], resolution: int | None = None) -> Cond:
        raise NotImplementedError

    def noise(self, scheduler, latents: torch.Tensor, generator: torch.Generator):
        """Forward diffusion at random timesteps: returns ``(x_t, t, target)``, randomness from ``generator``."""
        raise NotImplementedError

    def predict(self, denoiser, x: torch.Tensor, t: torch.Tensor, cond: Cond) -> torch.Tensor:
        raise NotImplementedError

    def partial_sample(self, denoiser, scheduler_config, cond: Cond, uncond: Cond, shape: tuple[int, ...],
                       num_steps: int, generator: torch.Generator, guidance: float = 3.0):
        """ESD's x_t: sample from noise with the current model for a random number of steps; returns (x_t, t)."""
        raise NotImplementedError

    def encode_latents(self, vae, pixels: torch.Tensor) -> torch.Tensor:
        """VAE posterior mean, shifted and scaled as the denoiser consumes it."""
        return self.scale_latents(vae, vae.encode(pixels).latent_dist.mean)

    def scale_latents(self, vae, latents: torch.Tensor) -> torch.Tensor:
        """``(latents - shift_factor) * scaling_factor`` (SD3/FLUX VAEs have a shift; SD's has none)."""
        shift = getattr(vae.config, "shift_factor", None)
        if shift:
            latents = latents - shift
        return latents * vae.config.scaling_factor

    # ---------------------------------------------------------------- parameters
    def is_xattn(self, name: str) -> bool:
        raise NotImplementedError

    def is_io_layer(self, name: str) -> bool:
        """Embedding and output layers that ESD-u (``noxattn``) leaves frozen too."""
        return False

    def trainable(self, name: str, mode: str) -> bool:
        """Which denoiser parameters may train: ``full``, ``xattn``, ``noxattn`` (all but xattn and I/O layers)."""
        if mode == "full":
            return True
        if mode == "xattn":
            return self.is_xattn(name)
        if mode == "noxattn":
            return not (self.is_xattn(name) or self.is_io_layer(name))
        raise ValueError(f"trainable must be full, xattn or noxattn, got {mode!r}")

    def token_encoder(self, pipe) -> tuple[Any, Any]:
        """``(text_encoder, tokenizer)`` whose token hidden states feed the cross-attention K/V (UCE/RECE)."""
        raise ValueError(f"{self.label} models have no UNet cross-attention K/V projections for UCE/RECE")

    # ---------------------------------------------------------------- generation
    def latent_shape(self, pipe, height: int, width: int) -> tuple[int, ...]:
        f = pipe.vae_scale_factor
        return (1, self.denoiser(pipe).config.in_channels, height // f, width // f)

    def initial_latents(self, pipe, seed: int, height: int, width: int, dtype: torch.dtype | None = None):
        """The starting noise for one image, drawn on CPU from ``torch.Generator().manual_seed(seed)``."""
        g = torch.Generator("cpu").manual_seed(int(seed))
        lat = torch.randn(self.latent_shape(pipe, height, width), generator=g, dtype=torch.float32)
        return lat.to(dtype or self.denoiser(pipe).dtype)

    def size_multiple(self, pipe) -> int:
        return int(pipe.vae_scale_factor)

    def default_resolution(self, pipe) -> int:
        return int(self.denoiser(pipe).config.sample_size) * int(pipe.vae_scale_factor)

    def folder_resolution(self, folder: str | os.PathLike) -> int:
        """The native image size of a pipeline folder, read from its configs without loading weights."""
        den = json.loads((Path(folder) / self.denoiser_attr / "config.json").read_text(encoding="utf-8"))
        return int(den["sample_size"]) * self._folder_vae_factor(folder)

    @staticmethod
    def _folder_vae_factor(folder: str | os.PathLike) -> int:
        vae = json.loads((Path(folder) / "vae" / "config.json").read_text(encoding="utf-8"))
        return 2 ** (len(vae["block_out_channels"]) - 1)

    def call(self, pipe, prompts: list[str], latents: torch.Tensor, height: int, width: int, steps: int,
             guidance: float, negative_prompt: str | None):
        """Run the pipeline's ``__call__`` and return PIL images."""
        return pipe(prompts, height=height, width=width, num_inference_steps=steps, guidance_scale=guidance,
                    negative_prompt=[negative_prompt] * len(prompts) if negative_prompt else None,
                    latents=latents).images


BACKBONES: Registry[Backbone] = Registry("backbone")


def supported_pipelines() -> list[str]:
    return [c for b in BACKBONES.values() for c in b.pipeline_classes]


def family_of_class(class_name: str | None) -> str:
    """The family of a diffusers pipeline class name; raises :class:`UnsupportedPipelineError` naming the supported."""
    for b in BACKBONES.values():
        if class_name in b.pipeline_classes:
            return b.name
    raise UnsupportedPipelineError(f"{class_name} is not supported; supported: {', '.join(supported_pipelines())}")


def _read_index(path: str | os.PathLike) -> dict[str, Any] | None:
    p = Path(path)
    if p.is_dir():
        return json.loads((p / "model_index.json").read_text(encoding="utf-8"))
    try:  # a hub id: its model_index.json from the local cache, if any
        from huggingface_hub import hf_hub_download

        return json.loads(Path(hf_hub_download(str(path), "model_index.json")).read_text(encoding="utf-8"))
    except Exception:  # noqa: BLE001 - not cached / offline: the loader reports it
        return None


def detect_family(model: str | os.PathLike) -> str:
    """The family of a pipeline folder (``model_index.json`` ``_class_name``); ``sd`` when it names no class."""
    index = _read_index(model)
    name = index.get("_class_name") if isinstance(index, dict) else None
    return "sd" if name is None else family_of_class(name)


def get_backbone(family: str) -> Backbone:
    return BACKBONES.lookup(family)


def backbone_of(pipe) -> Backbone:
    """The backbone of a loaded pipeline, by its class (subclasses of a supported class count as it); any other
    object is treated as SD v1/v2, as before the backbone layer (custom SD-layout pipelines, test doubles)."""
    for cls in type(pipe).__mro__:
        for b in BACKBONES.values():
            if cls.__name__ in b.pipeline_classes:
                return b
    return BACKBONES["sd"]


def check_method_family(cfg, spec) -> Backbone:
    """The backbone of ``cfg.model``; raises ``ValueError`` (one line) when method ``spec`` does not apply to it.

    Called before anything is loaded, generated or written."""
    from erasure.diffusion.pipeline import ModelLoadError, resolve_model
    from erasure.methods import METHODS

    model = resolve_model(cfg.model)
    try:
        backbone = get_backbone(detect_family(model))
    except ValueError as err:
        raise ModelLoadError(f"cannot load {model}: {err}") from err
    if getattr(cfg, "drop_t5", False) and backbone.name != "sd3":
        raise ValueError(f"--drop-t5 applies to SD3 models only; {model} is a {backbone.label} pipeline")
    if backbone.name not in spec.families:
        ok = sorted(n for n, m in METHODS.items() if backbone.name in m.families)
        raise ValueError(f"method {spec.name!r} does not apply to {backbone.label} models (it applies to "
                         f"{', '.join(spec.families)}); choose one of {', '.join(ok)}")
    return backbone


from erasure.backbones import flux, sd, sd3, sdxl  # noqa: E402,F401  (each registers itself)
