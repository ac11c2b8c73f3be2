"""RECE: Reliable and Efficient Concept Erasure of Text-to-Image Diffusion Models (Gong et al., ECCV 2024,
https://arxiv.org/abs/2407.12383).

UCE followed by a few epochs of closed-form adversarial re-editing of the cross-attention K/V projections,
after the official code (``train.py``, ``erase_methods/uce.py``, ``utils/embedding_calculation/close_form_emb.py``
of github.com/CharlesGong12/RECE, the ``close_regzero`` variant):

1. UCE edit (:func:`~erasure.diffusion.methods.uce.uce_edit`). Officially RECE starts from checkpoints of the
   paper-era UCE code, which edits each prompt's tokens from its last word to the end of the sequence: hence
   ``uce_token_span="last_to_end"`` by default.
2. For every erase prompt, derive the embedding that makes the EDITED projections reproduce the ORIGINAL
   projections of the prompt: ``c' = argmin sum_l ||W'_l c' - W_l c||^2 + adv_reg ||c'||^2``, i.e.
   ``c' = (sum W'^T W' + adv_reg I)^-1 (sum W'^T W) c``, for each of the prompt's token embeddings (all positions,
   padding included, as officially). Fed to the edited UNet it regenerates the erased concept.
3. Re-edit the current weights in closed form (the UCE solution with the current weights as the prior): every token
   of ``c'`` is mapped to the same position of the guide prompt (under the current weights), while full-sequence
   embeddings of the preserve prompts (and of the empty prompt, the classifier-free-guidance branch) keep their
   current projections. Repeat 2-3 for ``epochs`` epochs.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch

from erasure.diffusion.methods.uce import (
    UCEConfig,
    apply_edit_matrix,
    concept_prompt_sets,
    cross_attention_kv,
    edit_matrix,
    encode_prompt_tokens,
    pair_guides,
    solve_device,
    uce_edit,
    write_weights,
)
from erasure.jsonconfig import field
from erasure.methods import MethodConfig, MethodSpec, register_method
from erasure.progress import emit

logger = logging.getLogger(__name__)

__all__ = ["RECEConfig", "rece_edit", "adversarial_embedding", "kv_reconstruction_error"]


@dataclass
class RECEConfig(MethodConfig):
    """Knobs of RECE: the initial UCE edit (``uce_*``), the adversarial embedding and the re-edits.

    Defaults follow the official code: UCE as in its UCE checkpoints (lamb 0.5, erase 1, preserve 1, tokens from the
    last word to the end), re-edits with lamb 0.1, erase 1, preserve 0.1; ``adv_reg`` 1e-3 and 1 epoch is its
    setting for objects UCE finds hard (0.1 for easy objects; nudity: 0.1 and 3 epochs).
    """

    cli_prefix: ClassVar[str] = "rece"

    epochs: int = field(1, help="Adversarial re-editing epochs after the UCE edit (0 = UCE only).",
                        label="RECE epochs", min=0, max=1000)
    adv_reg: float = field(
        1e-3, help="Regulariser of the adversarial embedding, lambda in argmin sum ||W' c' - W c||^2 + lambda ||c'||^2 (> 0).",
        label="RECE adversarial regulariser", min=0.0, max=1e6, min_exclusive=True,
    )
    lamb: float = field(0.1, help="Re-edit: regulariser pulling each weight towards its current value (> 0).",
                        label="RECE re-edit lambda", min=0.0, max=1e6, min_exclusive=True)
    erase_scale: float = field(1.0, help="Re-edit: weight of the adversarial-embedding -> guide terms (> 0).",
                               label="RECE re-edit erase scale", min=0.0, max=1e6, min_exclusive=True)
    preserve_scale: float = field(0.1, help="Re-edit: weight of the preserve terms (>= 0).",
                                  label="RECE re-edit preserve scale", min=0.0, max=1e6)
    preserve_uncond: bool = field(True, help="Re-edit: also preserve the empty prompt (the unconditional branch).",
                                  label="RECE preserve the empty prompt")
    uce_lamb: float = field(0.5, help="Initial UCE edit: lambda (see UCE).", label="RECE: UCE lambda", min=0.0, max=1e6,
                            min_exclusive=True)
    uce_erase_scale: float = field(1.0, help="Initial UCE edit: erase scale (see UCE).", label="RECE: UCE erase scale",
                                   min=0.0, max=1e6, min_exclusive=True)
    uce_preserve_scale: float = field(1.0, help="Initial UCE edit: preserve scale (see UCE).",
                                      label="RECE: UCE preserve scale", min=0.0, max=1e6)
    uce_token_span: Literal["last", "last_to_end", "concept_to_end"] = field(
        "last_to_end", help="Initial UCE edit: tokens (see UCE; RECE's UCE checkpoints used 'last_to_end').",
        label="RECE: UCE tokens",
    )

    def uses_retain_prompts(self) -> bool:
        return self.uce_preserve_scale > 0 or self.preserve_scale > 0

    def uce_config(self) -> UCEConfig:
        """The :class:`UCEConfig` of the initial edit."""
        return UCEConfig(
            lamb=self.uce_lamb, erase_scale=self.uce_erase_scale, preserve_scale=self.uce_preserve_scale,
            token_span=self.uce_token_span,
        )


def adversarial_embedding(
    concept: torch.Tensor,
    edited: Mapping[str, torch.Tensor],
    original: Mapping[str, torch.Tensor],
    reg: float,
) -> torch.Tensor:
    """The embedding whose K/V under the ``edited`` weights best reproduce the ``original`` K/V of ``concept``.

    ``c' = (sum_l W'_l^T W'_l + reg I)^-1 (sum_l W'_l^T W_l) c`` for every row ``c`` of ``concept``
    (``[..., d]``); the sums run over all edited projections (same names in both mappings).

    Returns:
        `torch.Tensor`: float64, the shape of ``concept``.
    """
    if set(edited) != set(original):
        raise ValueError("edited and original weights must name the same projections")
    c = concept.to(torch.float64)
    d = c.shape[-1]
    names = sorted(edited)
    dev = edited[names[0]].device
    gram = reg * torch.eye(d, dtype=torch.float64, device=dev)
    cross = torch.zeros(d, d, dtype=torch.float64, device=dev)
    for n in names:
        w_new = edited[n].to(torch.float64)
        gram = gram + w_new.T @ w_new
        cross = cross + w_new.T @ original[n].to(device=dev, dtype=torch.float64)
    coef = torch.linalg.solve(gram, cross)  # c' = coef @ c
    return c.to(dev) @ coef.T


def kv_reconstruction_error(
    embedding: torch.Tensor, edited: Mapping[str, torch.Tensor], concept: torch.Tensor, original: Mapping[str, torch.Tensor]
) -> float:
    """``sum_l ||W'_l e - W_l c||^2 / sum_l ||W_l c||^2`` over all rows: how well ``embedding`` under the edited
    weights reproduces the original K/V of ``concept`` (0 = perfectly: the erased concept is back)."""
    num = den = 0.0
    for n, w in original.items():
        w = w.to(torch.float64)
        target = concept.to(device=w.device, dtype=torch.float64) @ w.T
        got = embedding.to(device=w.device, dtype=torch.float64) @ edited[n].to(w.device, torch.float64).T
        num += (got - target).pow(2).sum().item()
        den += target.pow(2).sum().item()
    return num / den


@torch.no_grad()
def rece_edit(
    unet: torch.nn.Module,
    text_encoder: torch.nn.Module,
    tokenizer,
    erase_prompts: Sequence[str],
    guide_prompts: Sequence[str],
    preserve_prompts: Sequence[str],
    cfg: RECEConfig,
    device: str | torch.device | None = None,
    progress: Callable[[int, int], None] | None = None,
    preserve_weights: Mapping[str, float] | None = None,
) -> dict[str, torch.Tensor]:
    """Erase concepts with RECE: UCE, then ``cfg.epochs`` adversarial re-edits of every ``attn2.to_k`` /
    ``attn2.to_v`` weight of ``unet``, in place.

    Args:
        unet (`torch.nn.Module`): a diffusers ``UNet2DConditionModel`` with the ORIGINAL weights (edited in place).
        text_encoder (`torch.nn.Module`), tokenizer: the pipeline's text encoder and tokenizer (not modified).
        erase_prompts (`list[str]`): prompts of the concepts to erase; each gets an adversarial embedding per epoch.
        guide_prompts (`list[str]`): one guide for all erase prompts or one per erase prompt.
        preserve_prompts (`list[str]`): prompts whose K/V must not change; may be empty.
        cfg (`RECEConfig`): see its fields.
        device (`str` or `torch.device`, *optional*, defaults to the UNet's device): where the float64 solves run.
        progress (`Callable[[int, int], None]`, *optional*): called as ``progress(done, total)`` after the UCE
            edit (``done`` = 0) and after each epoch.
        preserve_weights (`dict[str, float]`, *optional*): per preserve prompt weight in the initial UCE edit.

    Returns:
        `dict[str, torch.Tensor]`: the new weights by ``unet.state_dict()`` name, in the UNet's dtype.
    """
    guides = pair_guides(erase_prompts, guide_prompts)
    preserve = list(preserve_prompts)
    modules = cross_attention_kv(unet)
    dev = solve_device(device, unet)
    original = {n: m.weight.detach().to(device=dev, dtype=torch.float64).clone() for n, m in modules.items()}
    out = uce_edit(unet, text_encoder, tokenizer, list(erase_prompts), guides, preserve, cfg.uce_config(), device=dev,
                   preserve_weights=preserve_weights)
    if progress is not None:
        progress(0, cfg.epochs)
    if cfg.epochs == 0:
        return out
    concept, _ = encode_prompt_tokens(text_encoder, tokenizer, list(erase_prompts))
    guide, _ = encode_prompt_tokens(text_encoder, tokenizer, guides)
    keep_prompts = preserve + ([""] if cfg.preserve_uncond else [])
    d = concept.shape[-1]
    keep = encode_prompt_tokens(text_encoder, tokenizer, keep_prompts)[0].reshape(-1, d).to(dev) if keep_prompts else None
    concept, guide = concept.to(dev), guide.to(dev)
    current = {n: m.weight.detach().to(device=dev, dtype=torch.float64) for n, m in modules.items()}
    for epoch in range(cfg.epochs):
        adv = adversarial_embedding(concept, current, original, cfg.adv_reg)
        logger.info(
            "RECE epoch %d: the adversarial embedding reproduces the original K/V with relative error %.3g "
            "(the erase prompts themselves: %.3g)", epoch + 1,
            kv_reconstruction_error(adv, current, concept, original),
            kv_reconstruction_error(concept, current, concept, original),
        )
        m = edit_matrix(adv.reshape(-1, d), guide.reshape(-1, d), keep, cfg.lamb, cfg.erase_scale, cfg.preserve_scale)
        current = apply_edit_matrix(current, m)
        if progress is not None:
            progress(epoch + 1, cfg.epochs)
    return write_weights(modules, current)


def run(ctx) -> dict[str, torch.Tensor]:
    """The engine's entry: UCE, then ``epochs`` rounds of adversarial embedding and re-edit, for every concept."""
    erase, guide, preserve = concept_prompt_sets(ctx.concepts)
    progress = None if ctx.progress is None else (lambda d, t: emit(ctx.progress, "editing", d, t))
    return rece_edit(ctx.unet, ctx.text_encoder, ctx.tokenizer, erase, guide, preserve, ctx.args, device=ctx.device,
                     progress=progress, preserve_weights=ctx.retain_weights)


register_method(
    MethodSpec(
        name="rece",
        config_cls=RECEConfig,
        run=run,
        description="RECE: UCE, then closed-form adversarial embeddings of the erased concept erased in turn.",
        label="RECE (UCE + adversarial re-edits)",
        paper="https://arxiv.org/abs/2407.12383",
        needs_images=False,
        families=("sd", "sdxl"),  # edits UNet cross-attention K/V (attn2.to_k / to_v)
    )
)
