"""Stable Diffusion pipelines with random weights, built offline from configs.

``build_tiny_pipeline`` makes a few-MB pipeline for tests (diffusers' dummy components, with the real
CLIP tokenizer). ``build_sd_shaped_pipeline`` makes a pipeline with SD v1.4's architecture and random
weights, for memory and time benchmarks.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from erasure.tokenizer import build_clip_tokenizer

__all__ = ["build_tiny_pipeline", "build_sd_shaped_unet", "SD14_UNET_CONFIG"]

SD14_UNET_CONFIG = dict(
    sample_size=64,
    in_channels=4,
    out_channels=4,
    layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768,
    attention_head_dim=8,
)


def build_sd_shaped_unet(seed: int = 0):
    """A UNet2DConditionModel with SD v1.4's configuration (859,520,964 weights) and random weights."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(**SD14_UNET_CONFIG)


def build_tiny_pipeline(out_dir: str | os.PathLike | None = None, seed: int = 0, sample_size: int = 16):
    """A tiny random Stable Diffusion pipeline (UNet channels (8, 16), 2-layer CLIP text encoder, tiny VAE).

    Images are ``8 * sample_size`` pixels square. When ``out_dir`` is given the pipeline is saved there
    (safetensors) and can be loaded with ``StableDiffusionPipeline.from_pretrained``.
    """
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(8, 16),
        layers_per_block=1,
        sample_size=sample_size,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=16,
        attention_head_dim=2,
        norm_num_groups=4,
    )
    torch.manual_seed(seed)
    vae = AutoencoderKL(
        block_out_channels=(8, 8, 8, 8),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=sample_size * 8,
    )
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            bos_token_id=49406,
            eos_token_id=49407,
            pad_token_id=49407,
            hidden_size=16,
            intermediate_size=32,
            num_attention_heads=2,
            num_hidden_layers=2,
            vocab_size=49408,
            max_position_embeddings=77,
            layer_norm_eps=1e-5,
        )
    )
    scheduler = DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False, steps_offset=1
    )
    tok_dir = None if out_dir is None else Path(out_dir) / "tokenizer"
    tokenizer = build_clip_tokenizer(tok_dir)
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    if out_dir is not None:
        pipe.save_pretrained(str(out_dir), safe_serialization=True)
    return pipe
