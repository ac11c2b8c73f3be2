"""Single-file (original LDM / CompVis / SGM layout) checkpoints from diffusers SD v1-style and SDXL pipelines.

The inverse of diffusers' ``convert_ldm_*_checkpoint`` (``diffusers/loaders/single_file_utils.py``), derived
from the UNet/VAE configs instead of hard-coding SD v1.4's block counts, so it also covers smaller models of
the same family. Keys: ``model.diffusion_model.*`` (UNet), ``first_stage_model.*`` (VAE) and
``cond_stage_model.transformer.*`` (CLIP text encoder, SD v1). SDXL (the layout A1111 and ComfyUI load):
``conditioner.embedders.0.transformer.*`` (CLIP-L, transformers names) and ``conditioner.embedders.1.model.*``
(OpenCLIP bigG names: fused ``in_proj`` q/k/v, ``text_projection`` transposed; the inverse of diffusers'
``convert_open_clip_checkpoint``, from its own ``DIFFUSERS_TO_LDM_MAPPING["openclip"]`` table), and the UNet's
``add_embedding`` as ``label_emb.0``. The file loads in ``from_single_file`` and in SD front ends.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch

from erasure.io import atomic_save_safetensors

__all__ = ["unet_to_ldm", "vae_to_ldm", "text_encoder_to_ldm", "open_clip_to_ldm", "pipeline_to_ldm",
           "save_single_file"]

_UNET_TOP = {
    "time_embedding.linear_1.weight": "time_embed.0.weight",
    "time_embedding.linear_1.bias": "time_embed.0.bias",
    "time_embedding.linear_2.weight": "time_embed.2.weight",
    "time_embedding.linear_2.bias": "time_embed.2.bias",
    "conv_in.weight": "input_blocks.0.0.weight",
    "conv_in.bias": "input_blocks.0.0.bias",
    "conv_norm_out.weight": "out.0.weight",
    "conv_norm_out.bias": "out.0.bias",
    "conv_out.weight": "out.2.weight",
    "conv_out.bias": "out.2.bias",
    "add_embedding.linear_1.weight": "label_emb.0.0.weight",  # SDXL size/crop + pooled-text conditioning
    "add_embedding.linear_1.bias": "label_emb.0.0.bias",
    "add_embedding.linear_2.weight": "label_emb.0.2.weight",
    "add_embedding.linear_2.bias": "label_emb.0.2.bias",
}
_RESNET = [("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("norm2", "out_layers.0"), ("conv2", "out_layers.3"),
           ("time_emb_proj", "emb_layers.1"), ("conv_shortcut", "skip_connection")]


def _resnet(rest: str) -> str:
    head, _, tail = rest.partition(".")
    for hf, ldm in _RESNET:
        if head == hf:
            return f"{ldm}.{tail}"
    raise ValueError(f"unexpected resnet parameter {rest!r}")


def unet_to_ldm(state: dict[str, torch.Tensor], config) -> dict[str, torch.Tensor]:
    """Diffusers ``UNet2DConditionModel`` state dict -> LDM ``model.diffusion_model.*`` names."""
    lpb = int(config["layers_per_block"])
    up_has_attn = ["CrossAttn" in t for t in config["up_block_types"]]
    out: dict[str, torch.Tensor] = {}
    for k, v in state.items():
        if k in _UNET_TOP:
            name = _UNET_TOP[k]
        elif m := re.match(r"down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", k):
            b, layer, rest = int(m[1]), int(m[2]), m[3]
            name = f"input_blocks.{1 + b * (lpb + 1) + layer}.0.{_resnet(rest)}"
        elif m := re.match(r"down_blocks\.(\d+)\.attentions\.(\d+)\.(.+)", k):
            b, layer, rest = int(m[1]), int(m[2]), m[3]
            name = f"input_blocks.{1 + b * (lpb + 1) + layer}.1.{rest}"
        elif m := re.match(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", k):
            name = f"input_blocks.{(int(m[1]) + 1) * (lpb + 1)}.0.op.{m[2]}"
        elif m := re.match(r"mid_block\.resnets\.(\d+)\.(.+)", k):
            name = f"middle_block.{2 * int(m[1])}.{_resnet(m[2])}"
        elif m := re.match(r"mid_block\.attentions\.0\.(.+)", k):
            name = f"middle_block.1.{m[1]}"
        elif m := re.match(r"up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", k):
            b, layer, rest = int(m[1]), int(m[2]), m[3]
            name = f"output_blocks.{b * (lpb + 1) + layer}.0.{_resnet(rest)}"
        elif m := re.match(r"up_blocks\.(\d+)\.attentions\.(\d+)\.(.+)", k):
            b, layer, rest = int(m[1]), int(m[2]), m[3]
            name = f"output_blocks.{b * (lpb + 1) + layer}.1.{rest}"
        elif m := re.match(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", k):
            b = int(m[1])
            name = f"output_blocks.{b * (lpb + 1) + lpb}.{2 if up_has_attn[b] else 1}.conv.{m[2]}"
        else:
            raise ValueError(f"cannot map UNet parameter {k!r} to the single-file layout")
        out["model.diffusion_model." + name] = v
    return out


_VAE_ATTN = [("group_norm", "norm"), ("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out.0", "proj_out")]


def vae_to_ldm(state: dict[str, torch.Tensor], config) -> dict[str, torch.Tensor]:
    """Diffusers ``AutoencoderKL`` state dict -> LDM ``first_stage_model.*`` names (attention as 1x1 convs)."""
    n_up = len(config["up_block_types"])
    out: dict[str, torch.Tensor] = {}
    for k, v in state.items():
        name = k
        if m := re.match(r"(encoder|decoder)\.conv_norm_out\.(.+)", k):
            name = f"{m[1]}.norm_out.{m[2]}"
        elif m := re.match(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", k):
            name = f"encoder.down.{m[1]}.block.{m[2]}.{m[3].replace('conv_shortcut', 'nin_shortcut')}"
        elif m := re.match(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", k):
            name = f"encoder.down.{m[1]}.downsample.conv.{m[2]}"
        elif m := re.match(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", k):
            name = f"decoder.up.{n_up - 1 - int(m[1])}.block.{m[2]}.{m[3].replace('conv_shortcut', 'nin_shortcut')}"
        elif m := re.match(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", k):
            name = f"decoder.up.{n_up - 1 - int(m[1])}.upsample.conv.{m[2]}"
        elif m := re.match(r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.+)", k):
            name = f"{m[1]}.mid.block_{int(m[2]) + 1}.{m[3].replace('conv_shortcut', 'nin_shortcut')}"
        elif m := re.match(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.+)", k):
            rest = m[2]
            for hf, ldm in _VAE_ATTN:
                if rest.startswith(hf + "."):
                    rest = ldm + rest[len(hf):]
                    break
            name = f"{m[1]}.mid.attn_1.{rest}"
            if v.ndim == 2:
                v = v[:, :, None, None]
        out["first_stage_model." + name] = v
    return out


def text_encoder_to_ldm(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``CLIPTextModel`` state dict -> ``cond_stage_model.transformer.text_model.*`` (SD v1 layout).

    transformers >= 5.6 flattened ``CLIPTextModel`` (no ``text_model.`` prefix); the LDM layout keeps it.
    """
    out = {}
    for k, v in state.items():
        if k.endswith("position_ids"):
            continue
        out["cond_stage_model.transformer." + (k if k.startswith("text_model.") else "text_model." + k)] = v
    return out


def _text_model_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers >= 5.6 flattened CLIP text models (no ``text_model.`` prefix); the LDM layouts keep it."""
    return {k if k.startswith(("text_model.", "text_projection")) else "text_model." + k: v for k, v in state.items()
            if not k.endswith("position_ids")}


def open_clip_to_ldm(state: dict[str, torch.Tensor], prefix: str = "conditioner.embedders.1.model.") -> dict[str, torch.Tensor]:
    """``CLIPTextModelWithProjection`` state dict -> OpenCLIP names (SDXL's second text encoder)."""
    from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING

    table = DIFFUSERS_TO_LDM_MAPPING["openclip"]
    sub = [(hf, ldm) for hf, ldm in table["transformer"].items() if not hf.startswith("transformer.")]
    state = _text_model_keys(state)
    out: dict[str, torch.Tensor] = {}
    for hf, ldm in table["layers"].items():
        if hf in state:
            v = state.pop(hf)
            out[prefix + ldm] = v.T.contiguous() if ldm == "text_projection" else v
    for k in list(state):
        if m := re.match(r"text_model\.encoder\.layers\.(\d+)\.self_attn\.q_proj\.(weight|bias)", k):
            i, kind = m[1], m[2]
            parts = [state.pop(f"text_model.encoder.layers.{i}.self_attn.{x}_proj.{kind}") for x in "qkv"]
            out[f"{prefix}transformer.resblocks.{i}.attn.in_proj_{kind}"] = torch.cat(parts)
    for k, v in state.items():
        if re.search(r"self_attn\.[kv]_proj\.", k):
            continue  # fused with q above
        name = k
        for hf, ldm in sub:
            name = name.replace(hf, ldm)
        if not name.startswith("resblocks."):
            raise ValueError(f"cannot map text encoder parameter {k!r} to the OpenCLIP layout")
        out[prefix + "transformer." + name] = v
    return out


def pipeline_to_ldm(pipe) -> dict[str, torch.Tensor]:
    """All components of an SD v1-style or SDXL pipeline in one LDM/SGM-layout state dict."""
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    sd = {}
    te2 = getattr(pipe, "text_encoder_2", None)
    if isinstance(te2, CLIPTextModelWithProjection) and isinstance(pipe.text_encoder, CLIPTextModel):  # SDXL base
        sd.update({"conditioner.embedders.0.transformer." + k: v
                   for k, v in _text_model_keys(pipe.text_encoder.state_dict()).items()})
        sd.update(open_clip_to_ldm(te2.state_dict()))
    elif isinstance(pipe.text_encoder, CLIPTextModel) and te2 is None and getattr(pipe, "unet", None) is not None:
        sd.update(text_encoder_to_ldm(pipe.text_encoder.state_dict()))
    else:
        raise ValueError("single-file export supports SD v1-style pipelines (one CLIPTextModel) and SDXL base "
                         "(CLIP-L + OpenCLIP-bigG); use the diffusers folder export (--out) for this model")
    sd.update(unet_to_ldm(pipe.unet.state_dict(), pipe.unet.config))
    sd.update(vae_to_ldm(pipe.vae.state_dict(), pipe.vae.config))
    return {k: v.detach().contiguous() for k, v in sd.items()}


def save_single_file(pipe, path: str | os.PathLike, overwrite: bool = False, half: bool = False) -> Path:
    """Write ``pipe`` as one ``.safetensors`` checkpoint in the LDM layout (atomic)."""
    p = Path(path)
    if p.suffix != ".safetensors":
        raise ValueError(f"single-file checkpoints are written as .safetensors, got {p.name}")
    if p.exists() and not overwrite:
        raise FileExistsError(f"{p} exists; pass --overwrite or choose another path")
    sd = pipeline_to_ldm(pipe)
    if half:
        sd = {k: v.half() if v.is_floating_point() else v for k, v in sd.items()}
    atomic_save_safetensors(sd, p, metadata={"format": "pt", "exported_by": "salun-erasure"})
    return p
