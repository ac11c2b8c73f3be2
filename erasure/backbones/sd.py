"""Stable Diffusion v1.x / v2.x: one CLIP text encoder, a UNet, epsilon or v prediction.

The prediction type comes from the scheduler config (``prediction_type``: ``epsilon`` for v1.x and SD 2.x base,
``v_prediction`` for SD 2.x 768); the training target follows it (the noise, or ``alpha_t noise - sigma_t x0``).
``--trainable xattn`` selects the UNet's cross-attention blocks ``attn2`` (queries from the image, keys and values
from the text).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from erasure.backbones import BACKBONES, Backbone, Cond, cat_cond, expand_cond

__all__ = ["SDBackbone", "unet_predict", "ddim_partial_sample"]


def unet_predict(unet, x: torch.Tensor, t: torch.Tensor, cond) -> torch.Tensor:
    """The UNet's output for a ``Cond`` or a plain ``[n, 77, D]`` embedding tensor (SD v1/v2)."""
    ehs = cond["prompt_embeds"] if isinstance(cond, Cond) else cond
    return unet(x, t, encoder_hidden_states=ehs).sample


@torch.no_grad()
def ddim_partial_sample(predict, denoiser, scheduler_config, cond, uncond, shape: tuple[int, ...], num_steps: int,
                        generator: torch.Generator, guidance: float = 3.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Run DDIM from noise with the current model for a random number of steps (ESD's x_t).

    Returns ``(x_t, t)`` where ``t`` is the training timestep x_t corresponds to (one per batch item).
    """
    from diffusers import DDIMScheduler

    sched = DDIMScheduler.from_config(scheduler_config)
    sched.set_timesteps(num_steps)
    stop = int(torch.randint(0, num_steps, (1,), generator=generator))
    x = torch.randn(shape, generator=generator, dtype=torch.float32).to(cond.device, cond.dtype)
    n = shape[0]
    for i, ts in enumerate(sched.timesteps):
        if i == stop:
            break
        t = ts.expand(n).to(x.device)
        e = predict(denoiser, torch.cat([x, x]), torch.cat([t, t]), cat_cond(cond, expand_cond(uncond, n)))
        e_c, e_u = e.chunk(2)
        x = sched.step(e_u + guidance * (e_c - e_u), ts, x).prev_sample
    t_final = sched.timesteps[stop].expand(n).to(x.device)
    return x, t_final


class SDBackbone(Backbone):
    name = "sd"
    label = "Stable Diffusion v1/v2"
    pipeline_classes = ("StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline")
    denoiser_attr = "unet"
    text_modules = ("text_encoder",)
    xattn_rule = "UNet cross-attention blocks (`attn2`: to_q, to_k, to_v, to_out)"

    def load_kwargs(self, path: str) -> dict:
        return {"safety_checker": None, "requires_safety_checker": False}

    def set_scheduler(self, pipe, scheduler: str) -> None:
        super().set_scheduler(pipe, scheduler)
        if scheduler == "ddim":
            from diffusers import DDIMScheduler

            pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)

    @torch.no_grad()
    def encode(self, pipe, prompts: Sequence[str], resolution: int | None = None) -> torch.Tensor:
        """The CLIP hidden states ``[n, 77, D]``: SD's condition is that plain tensor (as methods written before
        the backbone layer expect), other families return a :class:`Cond`."""
        tok = pipe.tokenizer(list(prompts), padding="max_length", max_length=pipe.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt")
        te = pipe.text_encoder
        return te(tok.input_ids.to(te.device))[0]

    def noise(self, scheduler, latents: torch.Tensor, generator: torch.Generator):
        n = latents.shape[0]
        t = torch.randint(0, scheduler.config.num_train_timesteps, (n,), generator=generator).to(latents.device)
        noise = torch.randn(latents.shape, generator=generator, dtype=torch.float32).to(latents.device, latents.dtype)
        x_t = scheduler.add_noise(latents, noise, t)
        kind = scheduler.config.get("prediction_type", "epsilon")
        if kind == "epsilon":
            return x_t, t, noise
        if kind == "v_prediction":
            return x_t, t, scheduler.get_velocity(latents, noise, t)
        raise ValueError(f"prediction_type {kind!r} is not supported for training; epsilon or v_prediction")

    def predict(self, denoiser, x: torch.Tensor, t: torch.Tensor, cond) -> torch.Tensor:
        return unet_predict(denoiser, x, t, cond)

    def partial_sample(self, denoiser, scheduler_config, cond, uncond, shape, num_steps, generator, guidance=3.0):
        return ddim_partial_sample(self.predict, denoiser, scheduler_config, cond, uncond, shape, num_steps,
                                   generator, guidance)

    def is_xattn(self, name: str) -> bool:
        return ".attn2." in name

    def is_io_layer(self, name: str) -> bool:
        return name.startswith(("time_embedding", "conv_out", "conv_norm_out"))

    def token_encoder(self, pipe):
        return pipe.text_encoder, pipe.tokenizer


BACKBONES.register("sd", SDBackbone())
