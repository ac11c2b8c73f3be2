"""Stable Diffusion 3 / 3.5: CLIP-L + CLIP-G (+ optional T5-XXL), an MMDiT transformer, rectified-flow matching.

Training as diffusers' SD3 scripts: ``sigma`` drawn from a logit-normal density (``u = sigmoid(N(0, 1))``, the
scheduler's training sigmas at index ``u * 1000``, so its ``shift`` applies), ``x_t = (1 - sigma) x0 + sigma
noise``, timestep ``1000 sigma``, target ``noise - x0`` (the velocity the transformer predicts).

T5 is optional: a folder saved without it (``text_encoder_3`` null in model_index.json, or no ``text_encoder_3/``
folder) loads without it, and ``load_pipeline(..., drop_t5=True)`` drops it from a full folder; the pipeline then
feeds zeros in place of the T5 tokens, as diffusers does.

``--trainable xattn`` selects the joint-attention projections of the text stream (``attn.add_q_proj``,
``add_k_proj``, ``add_v_proj``, ``to_add_out``): the MMDiT counterpart of UNet cross-attention. (SD 3.5's
``attn2`` is a second image self-attention, not cross-attention.)
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch

from erasure.backbones import BACKBONES, Backbone, Cond, cat_cond, expand_cond

__all__ = ["FlowBackbone", "SD3Backbone", "MMDIT_TEXT_PROJECTIONS"]

MMDIT_TEXT_PROJECTIONS = ("add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")


class FlowBackbone(Backbone):
    """Shared by SD3 and FLUX: rectified-flow noising, target, ESD sampling, MMDiT parameter groups."""

    denoiser_attr = "transformer"
    io_prefixes: tuple[str, ...] = ("pos_embed", "x_embedder", "time_text_embed", "context_embedder", "norm_out",
                                    "proj_out")

    def noise(self, scheduler, latents: torch.Tensor, generator: torch.Generator):
        from diffusers import FlowMatchEulerDiscreteScheduler

        n = latents.shape[0]
        u = torch.sigmoid(torch.randn(n, generator=generator))  # logit-normal(0, 1)
        train = FlowMatchEulerDiscreteScheduler.from_config(scheduler.config)  # untouched by set_timesteps
        total = int(train.config.num_train_timesteps)
        idx = (u * total).long().clamp(0, total - 1)
        sigma = train.sigmas[idx].to(latents.device, latents.dtype)
        t = train.timesteps[idx].to(latents.device)
        noise = torch.randn(latents.shape, generator=generator, dtype=torch.float32).to(latents.device, latents.dtype)
        s = sigma.view(n, *([1] * (latents.ndim - 1)))
        return (1 - s) * latents + s * noise, t, noise - latents

    @torch.no_grad()
    def partial_sample(self, denoiser, scheduler_config, cond, uncond, shape, num_steps, generator, guidance=3.0):
        """Euler steps of the flow ODE from noise, with CFG, stopped after a random number of steps."""
        stop = int(torch.randint(0, num_steps, (1,), generator=generator))
        x = torch.randn(shape, generator=generator, dtype=torch.float32).to(cond.device, cond.dtype)
        sig = torch.linspace(1.0, 0.0, num_steps + 1)
        shift = float(scheduler_config.get("shift", 1.0))
        if not scheduler_config.get("use_dynamic_shifting", False) and shift != 1.0:
            sig = shift * sig / (1 + (shift - 1) * sig)
        n = shape[0]
        for i in range(stop):
            t = (sig[i] * 1000).expand(n).to(x.device)
            v = self.predict(denoiser, torch.cat([x, x]), torch.cat([t, t]), cat_cond(cond, expand_cond(uncond, n)))
            v_c, v_u = v.chunk(2)
            x = x + (sig[i + 1] - sig[i]).item() * (v_u + guidance * (v_c - v_u))
        return x, (sig[stop] * 1000).expand(n).to(x.device)

    def is_xattn(self, name: str) -> bool:
        return any(f".attn.{p}." in name for p in MMDIT_TEXT_PROJECTIONS)

    def is_io_layer(self, name: str) -> bool:
        return name.startswith(self.io_prefixes)

    def set_scheduler(self, pipe, scheduler: str) -> None:
        super().set_scheduler(pipe, scheduler)  # flow models keep their flow-matching Euler scheduler

    def size_multiple(self, pipe) -> int:
        return int(pipe.vae_scale_factor) * int(getattr(self.denoiser(pipe).config, "patch_size", 1) or 1)


class SD3Backbone(FlowBackbone):
    name = "sd3"
    label = "Stable Diffusion 3"
    pipeline_classes = ("StableDiffusion3Pipeline",)
    text_modules = ("text_encoder", "text_encoder_2", "text_encoder_3")
    xattn_rule = "joint-attention text-stream projections (`attn.add_q_proj/add_k_proj/add_v_proj/to_add_out`)"

    def load_kwargs(self, path: str, drop_t5: bool = False) -> dict:
        p = Path(path)
        no_t5 = drop_t5
        if p.is_dir():
            index = json.loads((p / "model_index.json").read_text(encoding="utf-8"))
            entry = index.get("text_encoder_3")
            no_t5 = no_t5 or not entry or entry[0] is None or not (p / "text_encoder_3").is_dir()
        return {"text_encoder_3": None, "tokenizer_3": None} if no_t5 else {}

    @torch.no_grad()
    def encode(self, pipe, prompts: Sequence[str], resolution: int | None = None) -> Cond:
        pe, _, pooled, _ = pipe.encode_prompt(prompt=list(prompts), prompt_2=None, prompt_3=None,
                                              device=pipe._execution_device, num_images_per_prompt=1,
                                              do_classifier_free_guidance=False)
        return Cond({"prompt_embeds": pe, "pooled": pooled})

    def predict(self, denoiser, x: torch.Tensor, t: torch.Tensor, cond: Cond) -> torch.Tensor:
        return denoiser(hidden_states=x, timestep=t, encoder_hidden_states=cond["prompt_embeds"],
                        pooled_projections=cond["pooled"], return_dict=False)[0]


BACKBONES.register("sd3", SD3Backbone())
