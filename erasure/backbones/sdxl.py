"""Stable Diffusion XL: two CLIP text encoders (penultimate hidden states concatenated), the second one's pooled
embedding, and size/crop conditioning (``add_time_ids`` = original size, crop top-left, target size).

The UNet, its prediction types and ``--trainable xattn`` (``attn2``) are as in :mod:`erasure.backbones.sd`. With
``force_zeros_for_empty_prompt`` (SDXL base) the empty prompt is encoded as zeros, as the pipeline does for its
unconditional branch. UCE/RECE edit the ``attn2`` K/V projections, which read the concatenation of both encoders'
token states (:class:`SDXLTokenEncoder`).
"""

from __future__ import annotations

from collections.abc import Sequence
from types import SimpleNamespace

import torch

from erasure.backbones import BACKBONES, Cond
from erasure.backbones.sd import SDBackbone

__all__ = ["SDXLBackbone", "SDXLTokenEncoder", "SDXLTokenizer"]


class SDXLTokenEncoder(torch.nn.Module):
    """Both CLIP encoders as one "text encoder" of token states (``[n, 77, d1 + d2]``) for UCE/RECE.

    Takes ``[n, 2, 77]`` ids (one row per tokenizer, from :class:`SDXLTokenizer`) and returns a 1-tuple, as a
    transformers encoder's output is indexed by the UCE code.
    """

    def __init__(self, text_encoder, text_encoder_2) -> None:
        super().__init__()
        self.te1 = text_encoder
        self.te2 = text_encoder_2

    def forward(self, ids: torch.Tensor):
        h1 = self.te1(ids[:, 0], output_hidden_states=True).hidden_states[-2]
        h2 = self.te2(ids[:, 1], output_hidden_states=True).hidden_states[-2]
        return (torch.cat([h1, h2], dim=-1),)


class SDXLTokenizer:
    """Both tokenizers as one: ``input_ids`` stacked to ``[n, 2, L]``, ``attention_mask`` of the first."""

    def __init__(self, tokenizer, tokenizer_2) -> None:
        self.tok1, self.tok2 = tokenizer, tokenizer_2
        self.model_max_length = tokenizer.model_max_length

    def __call__(self, prompts, **kw):
        a, b = self.tok1(prompts, **kw), self.tok2(prompts, **kw)
        return SimpleNamespace(input_ids=torch.stack([a.input_ids, b.input_ids], dim=1), attention_mask=a.attention_mask)


class SDXLBackbone(SDBackbone):
    name = "sdxl"
    label = "Stable Diffusion XL"
    pipeline_classes = ("StableDiffusionXLPipeline",)
    text_modules = ("text_encoder", "text_encoder_2")
    xattn_rule = "UNet cross-attention blocks (`attn2`), as SD"

    def load_kwargs(self, path: str) -> dict:
        return {}

    @torch.no_grad()
    def encode(self, pipe, prompts: Sequence[str], resolution: int | None = None) -> Cond:
        prompts = list(prompts)
        pe, _, pooled, _ = pipe.encode_prompt(prompt=prompts, device=pipe._execution_device, num_images_per_prompt=1,
                                              do_classifier_free_guidance=False)
        if pipe.config.get("force_zeros_for_empty_prompt", False):
            empty = torch.tensor([p == "" for p in prompts], device=pe.device)
            pe = torch.where(empty[:, None, None], torch.zeros_like(pe), pe)
            pooled = torch.where(empty[:, None], torch.zeros_like(pooled), pooled)
        size = int(resolution or self.default_resolution(pipe))
        time_ids = torch.tensor([[size, size, 0, 0, size, size]], dtype=pe.dtype, device=pe.device)
        return Cond({"prompt_embeds": pe, "pooled": pooled, "time_ids": time_ids.expand(len(prompts), -1)})

    def predict(self, denoiser, x: torch.Tensor, t: torch.Tensor, cond: Cond) -> torch.Tensor:
        return denoiser(x, t, encoder_hidden_states=cond["prompt_embeds"],
                        added_cond_kwargs={"text_embeds": cond["pooled"], "time_ids": cond["time_ids"]}).sample

    def is_io_layer(self, name: str) -> bool:
        return super().is_io_layer(name) or name.startswith("add_embedding")

    def token_encoder(self, pipe):
        return (SDXLTokenEncoder(pipe.text_encoder, pipe.text_encoder_2),
                SDXLTokenizer(pipe.tokenizer, pipe.tokenizer_2))


BACKBONES.register("sdxl", SDXLBackbone())
