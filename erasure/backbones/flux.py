"""FLUX.1: CLIP-L (pooled) + T5-XXL (tokens), an MMDiT transformer on packed 2x2 latent patches, rectified flow.

Latents are kept unpacked (``[n, C, H, W]``, as the VAE gives them) everywhere in the engine; :meth:`predict`
packs them into ``[n, H/2 * W/2, 4C]`` tokens with their position ids, calls the transformer and unpacks its
output. Guidance-distilled checkpoints (FLUX.1-dev, ``guidance_embeds``) get the guidance embedding
:data:`TRAIN_GUIDANCE` during training (diffusers' FLUX DreamBooth default); at generation ``guidance`` is that
embedding, and a negative prompt turns on true CFG at the same scale. Noising, target, ESD sampling and
``--trainable xattn`` (text-stream projections of the double-stream blocks) are as SD3 (:mod:`erasure.backbones.sd3`);
the single-stream blocks share one projection for text and image tokens, so they count as "not xattn".
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from erasure.backbones import BACKBONES, Cond
from erasure.backbones.sd3 import FlowBackbone

__all__ = ["FluxBackbone", "pack", "unpack", "TRAIN_GUIDANCE"]

TRAIN_GUIDANCE = 3.5


def pack(x: torch.Tensor) -> torch.Tensor:
    """``[n, C, H, W]`` -> ``[n, H/2 * W/2, 4C]`` (FluxPipeline._pack_latents)."""
    n, c, h, w = x.shape
    return x.view(n, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(n, (h // 2) * (w // 2), c * 4)


def unpack(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Inverse of :func:`pack` for latent height ``h`` and width ``w``."""
    n, _, ch = x.shape
    return x.view(n, h // 2, w // 2, ch // 4, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(n, ch // 4, h, w)


def _image_ids(h: int, w: int, device, dtype) -> torch.Tensor:
    ids = torch.zeros(h // 2, w // 2, 3)
    ids[..., 1] = ids[..., 1] + torch.arange(h // 2)[:, None]
    ids[..., 2] = ids[..., 2] + torch.arange(w // 2)[None, :]
    return ids.reshape(-1, 3).to(device=device, dtype=dtype)


class FluxBackbone(FlowBackbone):
    name = "flux"
    label = "FLUX.1"
    pipeline_classes = ("FluxPipeline",)
    text_modules = ("text_encoder", "text_encoder_2")
    xattn_rule = "double-stream blocks' text-stream projections (`attn.add_q_proj/add_k_proj/add_v_proj/to_add_out`)"

    @torch.no_grad()
    def encode(self, pipe, prompts: Sequence[str], resolution: int | None = None) -> Cond:
        pe, pooled, _ = pipe.encode_prompt(prompt=list(prompts), prompt_2=None, device=pipe._execution_device,
                                           num_images_per_prompt=1)
        return Cond({"prompt_embeds": pe, "pooled": pooled})

    def predict(self, denoiser, x: torch.Tensor, t: torch.Tensor, cond: Cond) -> torch.Tensor:
        n, _, h, w = x.shape
        config = getattr(denoiser, "module", denoiser).config
        pe = cond["prompt_embeds"]
        guidance = None
        if config.guidance_embeds:
            guidance = torch.full((n,), TRAIN_GUIDANCE, device=x.device, dtype=torch.float32)
        out = denoiser(hidden_states=pack(x), timestep=t.to(x.dtype) / 1000, guidance=guidance,
                       pooled_projections=cond["pooled"], encoder_hidden_states=pe,
                       txt_ids=torch.zeros(pe.shape[1], 3, device=x.device, dtype=x.dtype),
                       img_ids=_image_ids(h, w, x.device, x.dtype), return_dict=False)[0]
        return unpack(out, h, w)

    def latent_shape(self, pipe, height: int, width: int) -> tuple[int, ...]:
        f = int(pipe.vae_scale_factor) * 2
        return (1, self.denoiser(pipe).config.in_channels // 4, 2 * (height // f), 2 * (width // f))

    def initial_latents(self, pipe, seed: int, height: int, width: int, dtype: torch.dtype | None = None):
        """Packed starting noise (``[1, tokens, 4C]``), drawn unpacked from ``Generator().manual_seed(seed)``."""
        return pack(super().initial_latents(pipe, seed, height, width, dtype))

    def size_multiple(self, pipe) -> int:
        return int(pipe.vae_scale_factor) * 2

    def default_resolution(self, pipe) -> int:
        return int(pipe.default_sample_size) * int(pipe.vae_scale_factor)

    def folder_resolution(self, folder) -> int:
        return 128 * self._folder_vae_factor(folder)  # FluxPipeline.default_sample_size

    def call(self, pipe, prompts, latents, height, width, steps, guidance, negative_prompt):
        extra = {"negative_prompt": [negative_prompt] * len(prompts), "true_cfg_scale": guidance} if negative_prompt else {}
        return pipe(prompts, height=height, width=width, num_inference_steps=steps, guidance_scale=guidance,
                    latents=latents, **extra).images


BACKBONES.register("flux", FluxBackbone())
