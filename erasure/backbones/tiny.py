"""Tiny random SDXL, SD3 and FLUX pipelines built offline in code, like diffusers' ``get_dummy_components``.

CLIP tokenizers come from open_clip's BPE file (:mod:`erasure.tokenizer`); the T5 tokenizer is a small Unigram
model trained with the ``tokenizers`` library on a few sentences and wrapped as ``T5TokenizerFast``. Every
builder seeds each component with ``torch.manual_seed(seed)``; images are 64 px (latents 8x8) by default.
``build_tiny(family, out_dir)`` dispatches (``sd`` is :func:`erasure.diffusion.tiny.build_tiny_pipeline`).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch

from erasure.tokenizer import build_clip_tokenizer

__all__ = ["build_t5_tokenizer", "build_tiny_sdxl", "build_tiny_sd3", "build_tiny_flux", "build_tiny"]

_CORPUS = [
    "a photo of a red circle", "a blue star on a white background", "a green square", "an image of a church",
    "a painting in the style of van gogh", "a parachute over the sea", "a cat", "a dog", "a truck", "a yellow heart",
    "a small triangle and a big hexagon", "the quick brown fox jumps over the lazy dog",
]


def build_t5_tokenizer(out_dir: str | os.PathLike | None = None, vocab_size: int = 120):
    """A small T5-style tokenizer (Unigram, ``</s>`` appended, ``<pad>`` = 0, no extra ids)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import T5TokenizerFast

    tok = Tokenizer(models.Unigram())
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.UnigramTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "</s>", "<unk>"],
                                      unk_token="<unk>")
    tok.train_from_iterator(_CORPUS, trainer)
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                       special_tokens=[("</s>", tok.token_to_id("</s>"))])
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "tokenizer.json"
        tok.save(str(path))
        t5 = T5TokenizerFast(tokenizer_file=str(path), extra_ids=0, pad_token="<pad>", eos_token="</s>",
                             unk_token="<unk>", model_max_length=512)
    if out_dir is not None:
        t5.save_pretrained(str(out_dir))
    return t5


def _clip(hidden: int, projection: int | None = None, seed: int = 0):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cfg = CLIPTextConfig(bos_token_id=49406, eos_token_id=49407, pad_token_id=49407, hidden_size=hidden,
                         intermediate_size=2 * hidden, num_attention_heads=2, num_hidden_layers=2, vocab_size=49408,
                         max_position_embeddings=77, layer_norm_eps=1e-5, projection_dim=projection or hidden)
    torch.manual_seed(seed)
    return CLIPTextModelWithProjection(cfg) if projection else CLIPTextModel(cfg)


def _t5(d_model: int, vocab: int, seed: int = 0):
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    return T5EncoderModel(T5Config(d_model=d_model, d_ff=2 * d_model, d_kv=8, num_layers=2, num_heads=2,
                                   vocab_size=vocab, relative_attention_num_buckets=8, decoder_start_token_id=0,
                                   pad_token_id=0, eos_token_id=1))


def _vae(latent_channels: int, seed: int = 0, flow: bool = False):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    kw = dict(shift_factor=0.0609, scaling_factor=1.5035, use_quant_conv=False, use_post_quant_conv=False) if flow else {}
    return AutoencoderKL(block_out_channels=(8, 8, 8, 8), in_channels=3, out_channels=3,
                         down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                         latent_channels=latent_channels, norm_num_groups=4, sample_size=64, **kw)


def _save(pipe, out_dir):
    if out_dir is not None:
        pipe.save_pretrained(str(out_dir), safe_serialization=True)
    return pipe


def build_tiny_sdxl(out_dir: str | os.PathLike | None = None, seed: int = 0, sample_size: int = 8):
    """Tiny random SDXL: UNet (8, 16) with text_time conditioning, two 16-wide CLIPs (the second with projection)."""
    from diffusers import DDIMScheduler, StableDiffusionXLPipeline, UNet2DConditionModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(8, 16), layers_per_block=1, sample_size=sample_size, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=8, transformer_layers_per_block=(1, 1), projection_class_embeddings_input_dim=6 * 8 + 16,
        cross_attention_dim=32, norm_num_groups=4,
    )
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1)
    tok = build_clip_tokenizer(None if out_dir is None else Path(out_dir) / "tokenizer")
    tok2 = build_clip_tokenizer(None if out_dir is None else Path(out_dir) / "tokenizer_2")
    pipe = StableDiffusionXLPipeline(vae=_vae(4, seed), text_encoder=_clip(16, seed=seed), text_encoder_2=_clip(16, 16, seed),
                                     tokenizer=tok, tokenizer_2=tok2, unet=unet, scheduler=scheduler,
                                     force_zeros_for_empty_prompt=True)
    return _save(pipe, out_dir)


def build_tiny_sd3(out_dir: str | os.PathLike | None = None, seed: int = 0, sample_size: int = 8, t5: bool = True):
    """Tiny random SD3: one MMDiT block, two 16-wide CLIPs with projection (pooled 32), optional 32-wide T5."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(sample_size=sample_size, patch_size=1, in_channels=4, num_layers=1,
                                        attention_head_dim=8, num_attention_heads=4, caption_projection_dim=32,
                                        joint_attention_dim=32, pooled_projection_dim=32, out_channels=4,
                                        pos_embed_max_size=32)
    tok = build_clip_tokenizer(None if out_dir is None else Path(out_dir) / "tokenizer")
    tok2 = build_clip_tokenizer(None if out_dir is None else Path(out_dir) / "tokenizer_2")
    tok3 = build_t5_tokenizer() if t5 else None
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=_vae(4, seed, flow=True),
        text_encoder=_clip(16, 16, seed), tokenizer=tok, text_encoder_2=_clip(16, 16, seed + 1), tokenizer_2=tok2,
        text_encoder_3=_t5(32, len(tok3), seed) if t5 else None, tokenizer_3=tok3,
    )
    return _save(pipe, out_dir)


def build_tiny_flux(out_dir: str | os.PathLike | None = None, seed: int = 0, guidance_embeds: bool = True):
    """Tiny random FLUX: one double- and one single-stream block, CLIP (pooled 16), 32-wide T5, 4 latent channels."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                         attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                         pooled_projection_dim=16, guidance_embeds=guidance_embeds,
                                         axes_dims_rope=(4, 4, 8))
    tok = build_clip_tokenizer(None if out_dir is None else Path(out_dir) / "tokenizer")
    tok2 = build_t5_tokenizer()
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                base_image_seq_len=256, max_image_seq_len=4096)
    pipe = FluxPipeline(transformer=transformer, scheduler=scheduler, vae=_vae(4, seed, flow=True),
                        text_encoder=_clip(16, seed=seed), tokenizer=tok, text_encoder_2=_t5(32, len(tok2), seed),
                        tokenizer_2=tok2)
    return _save(pipe, out_dir)


def build_tiny(family: str, out_dir: str | os.PathLike | None = None, seed: int = 0, **kw):
    """A tiny random pipeline of ``family`` (``sd``, ``sdxl``, ``sd3``, ``sd3-no-t5``, ``flux``)."""
    if family == "sd":
        from erasure.diffusion.tiny import build_tiny_pipeline

        return build_tiny_pipeline(out_dir, seed=seed, sample_size=kw.get("sample_size", 8))
    builders = {"sdxl": build_tiny_sdxl, "sd3": build_tiny_sd3, "flux": build_tiny_flux}
    if family == "sd3-no-t5":
        return build_tiny_sd3(out_dir, seed=seed, t5=False, **kw)
    if family not in builders:
        raise ValueError(f"unknown family {family!r}; choose one of sd, sdxl, sd3, sd3-no-t5, flux")
    return builders[family](out_dir, seed=seed, **kw)
