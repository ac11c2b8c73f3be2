"""UCE: Unified Concept Editing in Diffusion Models (Gandikota et al., WACV 2024, https://arxiv.org/abs/2308.14761).

A closed-form edit of every cross-attention key and value projection (``attn2.to_k``, ``attn2.to_v``). For each
projection ``W`` the edited weight minimises

    lamb * ||W' - W||^2 + erase_scale * sum_i ||W' c_i - W g_i||^2 + preserve_scale * sum_j ||W' p_j - W p_j||^2

where ``c_i`` is a token embedding of erase prompt ``i``, ``g_i`` the paired one of its guide prompt and ``p_j`` a
token embedding of preserve prompt ``j``. The solution is
``W' = (lamb W + es sum W g c^T + ps sum W p p^T) (lamb I + es sum c c^T + ps sum p p^T)^-1``.

Which tokens (``token_span``):

* ``"last"`` (the current official script ``trainscripts/uce_sd_erase.py``): one token per prompt, the
  last one before end-of-text (the final word, which in CLIP's causal encoder carries the whole prompt); an empty
  prompt contributes its start-of-text token. Preserve prompts likewise.
* ``"last_to_end"`` (the paper-era official code, ``train-scripts/train_erase.py``, last changed in ``bd5fb51`` and
  replaced by ``uce_sd_erase.py`` in ``4502388``; RECE's UCE checkpoints were made with it): the erase prompt's
  tokens from its last word to the end of the padded sequence, paired position by position with the guide's tokens
  from its last word (the longer prompt's tail is cut so both spans have the same length); preserve prompts
  contribute all their tokens, and the empty prompt (the unconditional branch of classifier-free guidance) is
  always preserved. The end-of-text and padding tokens also carry the prompt in a causal encoder, so this erases
  much more than ``"last"``.
* ``"concept_to_end"`` (default here): as ``"last_to_end"``, but the erase span starts at the first token where the
  erase prompt differs from its guide (the concept's first word) instead of at the last word, and the guide's span at
  the same position. Tokens before it are identical in both prompts (a causal encoder), so this takes every token
  that carries the concept: for "a striped shape" -> "a solid shape" the token "striped" itself, which
  ``"last_to_end"`` leaves unedited (the judge still saw stripes in 25% of images; 0% with this span,
  ``bench/results/auto_erase_uce_span.md``). For a prompt that is the concept alone ("Van Gogh" -> "") it adds the
  concept's earlier words. Spans of prompts whose token counts differ are paired position by position (both padded
  to the same length); an erase prompt equal to its guide contributes nothing.

Because the K/V projections are bias-free, that solution factors as ``W' = W @ M`` with one ``d x d`` matrix ``M``
shared by every edited projection (``d`` = text embedding width): :func:`edit_matrix` solves for ``M`` once, in
float64, with ``torch.linalg.solve``. RECE (:mod:`erasure.diffusion.methods.rece`) reuses these pieces.

Registered as method ``uce``: forget prompts are the erase set, anchor prompts the guides, retain prompts the
preserve set; several concepts are erased in one solve. On the embedded shapes model the current script's
``"last"`` span left 85% of circles (the original: 97.7%) and ``"last_to_end"`` 0.0% with no retain loss
(``bench/results/uce_outside_check.md``), hence the default.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch

from erasure.jsonconfig import field
from erasure.methods import MethodConfig, MethodSpec, register_method

logger = logging.getLogger(__name__)

TOKEN_SPANS = ("last", "last_to_end", "concept_to_end")

__all__ = [
    "UCEConfig",
    "uce_edit",
    "cross_attention_kv",
    "encode_prompt_tokens",
    "last_token_embeddings",
    "first_difference",
    "tokenize_padded",
    "uce_keys",
    "edit_matrix",
    "apply_edit_matrix",
    "write_weights",
    "concept_prompt_sets",
    "pair_guides",
    "solve_device",
]


@dataclass
class UCEConfig(MethodConfig):
    """Knobs of the UCE closed-form edit (flags ``--uce-*``; lamb and scales as the official ``uce_sd_erase.py``)."""

    cli_prefix: ClassVar[str] = "uce"

    lamb: float = field(0.5, help="Regulariser lambda pulling each edited weight towards its original value (> 0).",
                        label="UCE lambda", min=0.0, max=1e6, min_exclusive=True)
    erase_scale: float = field(1.0, help="Weight of the erase terms ||W' c_erase - W c_guide||^2 (> 0).",
                               label="UCE erase scale", min=0.0, max=1e6, min_exclusive=True)
    preserve_scale: float = field(1.0, help="Weight of the preserve terms ||W' c_keep - W c_keep||^2 (>= 0).",
                                  label="UCE preserve scale", min=0.0, max=1e6)
    token_span: Literal["last", "last_to_end", "concept_to_end"] = field(
        "concept_to_end",
        help="Tokens edited: 'concept_to_end' (from the first token where the erase prompt differs from its guide to "
        "the end of the padded sequence), 'last_to_end' (from the last word: the paper-era official code; misses a "
        "concept word that is not last, as 'striped' in 'a striped shape') or 'last' (the last word of each prompt: "
        "the current official script, which erased far less on the shapes model). The first two preserve every token "
        "of the preserve prompts and of the empty prompt.",
        label="UCE tokens",
    )
    guide: Literal["anchor", "uncond"] = field(
        "anchor", help="What each erase prompt is mapped to: its anchor prompt, or the empty prompt (the official "
        "scripts' default when no guide concept is given, 'towards_uncond').", label="UCE guide")

    def uses_retain_prompts(self) -> bool:
        return self.preserve_scale > 0

    def tune_grid(self, cfg) -> list[dict]:
        """A closed form has no learning rate or steps: ``--tune`` moves the erase and preserve weights (a concept
        that resists: erase harder or preserve less; collateral damage: preserve more) and the neighbours' weight."""
        es, ps, lamb = self.erase_scale, self.preserve_scale, self.lamb
        nw = cfg.auto.neighbour_weight if cfg.auto.neighbours else None
        # alternating: a candidate against resistance, one against damage, ...
        # (a conjunction such as "a blue star" resisted at the defaults and gave way at erase x10 or preserve x0.3)
        grid = [{}, {"erase_scale": es * 3}, {"preserve_scale": ps * 3}, {"erase_scale": es * 10}]
        grid += [{"neighbour_weight": nw * 3}, {"neighbour_weight": nw / 3}] if nw else []
        grid += [{"erase_scale": es * 3, "preserve_scale": ps * 3}, {"preserve_scale": ps * 0.3}, {"lamb": lamb * 0.2},
                 {"erase_scale": es * 10, "preserve_scale": ps * 3}]
        return grid


def cross_attention_kv(unet: torch.nn.Module) -> dict[str, torch.nn.Linear]:
    """The cross-attention key and value projections UCE edits, by module name.

    Same selection as the official script: modules whose name contains ``attn2`` and ends in ``to_k`` or ``to_v``.

    Raises:
        ValueError: when there are none, or one has a bias (the closed form here assumes ``y = W c``).
    """
    out: dict[str, torch.nn.Linear] = {}
    for name, module in unet.named_modules():
        if "attn2" in name and (name.endswith("to_k") or name.endswith("to_v")):
            if not isinstance(module, torch.nn.Linear):
                raise ValueError(f"{name} is a {type(module).__name__}, expected torch.nn.Linear")
            if module.bias is not None:
                raise ValueError(f"{name} has a bias; UCE here edits bias-free K/V projections (as in SD)")
            out[name] = module
    if not out:
        raise ValueError("the UNet has no cross-attention K/V projections (no '*attn2*to_k' / '*attn2*to_v' modules)")
    return out


@torch.no_grad()
def encode_prompt_tokens(
    text_encoder: torch.nn.Module, tokenizer, prompts: Sequence[str]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Encode prompts as the pipeline does (padded to the tokenizer's maximum length).

    Returns:
        `tuple[torch.Tensor, torch.Tensor]`: the hidden states ``[n, max_length, d]`` in float64 on CPU and the
        index of each prompt's last token before end-of-text (``attention_mask.sum() - 2``, at least 0) ``[n]``.
    """
    if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts):
        raise ValueError("prompts must be a list of strings")
    if not prompts:
        raise ValueError("no prompts to encode")
    tok = tokenize_padded(tokenizer, prompts)
    device = next(text_encoder.parameters()).device
    hidden = text_encoder(tok.input_ids.to(device))[0]
    last = (tok.attention_mask.sum(dim=1) - 2).clamp(min=0)
    return hidden.detach().to("cpu", torch.float64), last


def tokenize_padded(tokenizer, prompts: Sequence[str]):
    """The pipeline's tokenization: padded to the tokenizer's maximum length, truncated."""
    return tokenizer(list(prompts), padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt")


def first_difference(tokenizer, erase_prompts: Sequence[str], guide_prompts: Sequence[str]) -> list[int | None]:
    """Per pair, the index of the first token where the erase prompt's ids differ from its guide's (``None`` when
    the two tokenize identically). Several tokenizers (SDXL's ``[n, 2, L]`` ids): the first position where any
    differs."""
    a, b = tokenize_padded(tokenizer, erase_prompts).input_ids, tokenize_padded(tokenizer, guide_prompts).input_ids
    out: list[int | None] = []
    for x, y in zip(a, b):
        diff = (x != y).reshape(-1, x.shape[-1]).any(0).nonzero()
        out.append(int(diff[0, 0]) if len(diff) else None)
    return out


def last_token_embeddings(text_encoder: torch.nn.Module, tokenizer, prompts: Sequence[str]) -> torch.Tensor:
    """One embedding per prompt, ``[n, d]`` float64: the token UCE edits (see :func:`encode_prompt_tokens`)."""
    hidden, last = encode_prompt_tokens(text_encoder, tokenizer, prompts)
    return hidden[torch.arange(hidden.shape[0]), last]


def uce_keys(
    text_encoder: torch.nn.Module,
    tokenizer,
    erase_prompts: Sequence[str],
    guide_prompts: Sequence[str],
    preserve_prompts: Sequence[str],
    token_span: str = "last",
    preserve_weights: Mapping[str, float] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The erase, guide and preserve embeddings UCE uses (rows, float64 on CPU), for a ``token_span``.

    Args:
        erase_prompts (`list[str]`), guide_prompts (`list[str]`): paired one to one.
        preserve_prompts (`list[str]`): may be empty.
        token_span (`str`, defaults to `"last"`): see :class:`UCEConfig`.
        preserve_weights (`dict[str, float]`, *optional*): weight of a preserve prompt's terms (1 when absent; the
            neighbour prompts of :mod:`erasure.auto`): its rows are scaled by the square root, so ``P^T P`` weighs it.

    Returns:
        `tuple`: erase keys ``[k, d]``, guide keys ``[k, d]`` (paired by row) and preserve keys ``[m, d]`` (``None``
        when there are none).
    """
    if len(erase_prompts) != len(guide_prompts):
        raise ValueError("erase and guide prompts must be paired one to one")
    if token_span == "last":
        keys = last_token_embeddings(text_encoder, tokenizer, list(erase_prompts) + list(guide_prompts)
                                     + list(preserve_prompts))
        n = len(erase_prompts)
        keep = keys[2 * n :] * _row_scale(preserve_prompts, preserve_weights, 1)
        return keys[:n], keys[n : 2 * n], keep if keep.shape[0] else None
    if token_span not in TOKEN_SPANS:
        raise ValueError(f"token_span must be one of {TOKEN_SPANS}, got {token_span!r}")
    hidden_e, last_e = encode_prompt_tokens(text_encoder, tokenizer, erase_prompts)
    hidden_g, last_g = encode_prompt_tokens(text_encoder, tokenizer, guide_prompts)
    length = hidden_e.shape[1]
    erase, guide = [], []
    if token_span == "concept_to_end":
        for i, d in enumerate(first_difference(tokenizer, erase_prompts, guide_prompts)):
            if d is not None:
                erase.append(hidden_e[i, d:])
                guide.append(hidden_g[i, d:])
        if not erase:
            raise ValueError("every erase prompt tokenizes the same as its guide: nothing to erase; give an anchor "
                             "that differs from the forget prompt")
    else:
        for i in range(len(erase_prompts)):
            e, g = int(last_e[i]), int(last_g[i])
            far = max(e, g)
            erase.append(hidden_e[i, e : length - (far - e)])
            guide.append(hidden_g[i, g : length - (far - g)])
    keep, _ = encode_prompt_tokens(text_encoder, tokenizer, [""] + list(preserve_prompts))
    keep = keep * _row_scale([""] + list(preserve_prompts), preserve_weights, keep.shape[1]).unsqueeze(-1)
    return torch.cat(erase), torch.cat(guide), keep.reshape(-1, keep.shape[-1])


def _row_scale(prompts: Sequence[str], weights: Mapping[str, float] | None, tokens: int) -> torch.Tensor:
    """``[n, 1]`` (one token per prompt) or ``[n, tokens]``-broadcastable square roots of the prompts' weights."""
    w = torch.tensor([float((weights or {}).get(p, 1.0)) for p in prompts], dtype=torch.float64)
    if (w < 0).any():
        raise ValueError("preserve weights must be >= 0")
    return w.sqrt().unsqueeze(1).expand(-1, tokens)


def edit_matrix(
    erase_keys: torch.Tensor,
    guide_keys: torch.Tensor,
    preserve_keys: torch.Tensor | None,
    lamb: float,
    erase_scale: float,
    preserve_scale: float,
) -> torch.Tensor:
    """The matrix ``M`` (``d x d``, float64) of the UCE closed form ``W' = W @ M``, shared by all projections.

    ``M = (lamb I + es G^T C + ps P^T P) (lamb I + es C^T C + ps P^T P)^-1`` with the erase, guide and preserve
    embeddings as the rows of ``C``, ``G`` and ``P``.

    Args:
        erase_keys (`torch.Tensor`): ``[n, d]`` embeddings to move.
        guide_keys (`torch.Tensor`): ``[n, d]`` embeddings whose projections (under the weights being edited) the
            erase keys must produce, paired by row.
        preserve_keys (`torch.Tensor`, *optional*): ``[m, d]`` embeddings whose projections must not change.
        lamb (`float`), erase_scale (`float`), preserve_scale (`float`): see :class:`UCEConfig`.
    """
    c = erase_keys.to(torch.float64)
    g = guide_keys.to(torch.float64)
    if c.ndim != 2 or c.shape != g.shape:
        raise ValueError(f"erase keys {tuple(c.shape)} and guide keys {tuple(g.shape)} must both be [n, d]")
    d = c.shape[1]
    eye = torch.eye(d, dtype=torch.float64, device=c.device)
    lhs = lamb * eye + erase_scale * (g.T @ c)
    rhs = lamb * eye + erase_scale * (c.T @ c)
    if preserve_keys is not None and preserve_keys.numel() and preserve_scale > 0:
        p = preserve_keys.to(device=c.device, dtype=torch.float64)
        if p.ndim != 2 or p.shape[1] != d:
            raise ValueError(f"preserve keys must be [m, {d}], got {tuple(p.shape)}")
        pp = preserve_scale * (p.T @ p)
        lhs = lhs + pp
        rhs = rhs + pp
    # M = lhs @ rhs^-1  <=>  rhs^T M^T = lhs^T (rhs is symmetric positive definite for lamb > 0)
    return torch.linalg.solve(rhs.T, lhs.T).T


def apply_edit_matrix(weights: Mapping[str, torch.Tensor], m: torch.Tensor) -> dict[str, torch.Tensor]:
    """``{name: W @ M}`` in float64 (``W`` of shape ``[out, d]``)."""
    return {name: w.to(torch.float64) @ m.to(device=w.device, dtype=torch.float64) for name, w in weights.items()}


@torch.no_grad()
def write_weights(modules: Mapping[str, torch.nn.Linear], weights: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Copy ``weights`` (any float dtype) into the modules in place; return them by state-dict name, in the
    modules' dtype and device."""
    out = {}
    for name, module in modules.items():
        module.weight.copy_(weights[name].to(module.weight.device, module.weight.dtype))
        out[f"{name}.weight"] = module.weight.detach().clone()
    return out


def pair_guides(erase_prompts: Sequence[str], guide_prompts: Sequence[str]) -> list[str]:
    """One guide per erase prompt (a single guide is repeated); raises ``ValueError`` on a count mismatch."""
    if isinstance(erase_prompts, str) or isinstance(guide_prompts, str):
        raise ValueError("erase and guide prompts must be lists of strings")
    if not erase_prompts:
        raise ValueError("no erase prompts: give at least one")
    if len(guide_prompts) == 1:
        return list(guide_prompts) * len(erase_prompts)
    if len(guide_prompts) != len(erase_prompts):
        raise ValueError(
            f"give 1 guide prompt or one per erase prompt ({len(erase_prompts)}), got {len(guide_prompts)}"
        )
    return list(guide_prompts)


def solve_device(device: str | torch.device | None, unet: torch.nn.Module) -> torch.device:
    """``device``, or the UNet's device when ``None``."""
    return torch.device(device) if device is not None else next(unet.parameters()).device


@torch.no_grad()
def uce_edit(
    unet: torch.nn.Module,
    text_encoder: torch.nn.Module,
    tokenizer,
    erase_prompts: Sequence[str],
    guide_prompts: Sequence[str],
    preserve_prompts: Sequence[str],
    cfg: UCEConfig,
    device: str | torch.device | None = None,
    preserve_weights: Mapping[str, float] | None = None,
) -> dict[str, torch.Tensor]:
    """Erase concepts with UCE: edit every ``attn2.to_k`` / ``attn2.to_v`` weight of ``unet`` in place.

    Args:
        unet (`torch.nn.Module`): a diffusers ``UNet2DConditionModel`` (edited in place).
        text_encoder (`torch.nn.Module`), tokenizer: the pipeline's text encoder and tokenizer (not modified).
        erase_prompts (`list[str]`): prompts of the concepts to erase (a concept spec's forget prompts).
        guide_prompts (`list[str]`): what each erase prompt is mapped to: one prompt for all, or one per erase
            prompt (a concept spec's anchor prompts). ``""`` maps to the start-of-text token, as officially.
        preserve_prompts (`list[str]`): prompts whose K/V must not change (a concept spec's retain prompts); may be
            empty.
        cfg (`UCEConfig`): ``lamb``, ``erase_scale``, ``preserve_scale``, ``token_span``.
        device (`str` or `torch.device`, *optional*, defaults to the UNet's device): where the float64 solve runs.
        preserve_weights (`dict[str, float]`, *optional*): per preserve prompt weight (see :func:`uce_keys`).

    Returns:
        `dict[str, torch.Tensor]`: the new weights by ``unet.state_dict()`` name (``...attn2.to_k.weight``,
        ``...attn2.to_v.weight``), in the UNet's dtype.
    """
    guides = pair_guides(erase_prompts, guide_prompts)
    preserve = list(preserve_prompts)
    modules = cross_attention_kv(unet)
    dev = solve_device(device, unet)
    erase, guide, keep = uce_keys(text_encoder, tokenizer, erase_prompts, guides, preserve, cfg.token_span,
                                  preserve_weights)
    keep = keep.to(dev) if keep is not None else None
    m = edit_matrix(erase.to(dev), guide.to(dev), keep, cfg.lamb, cfg.erase_scale, cfg.preserve_scale)
    new = apply_edit_matrix({k: mod.weight.detach().to(dev) for k, mod in modules.items()}, m)
    logger.info(
        "UCE (%s): %d erase prompts (%d tokens), %d preserve prompts; edited %d K/V projections", cfg.token_span,
        len(erase_prompts), erase.shape[0], len(preserve), len(modules),
    )
    return write_weights(modules, new)


def concept_prompt_sets(concepts: Sequence) -> tuple[list[str], list[str], list[str]]:
    """Erase, guide and preserve prompt lists for several ``ConceptSpec``s (their sets concatenated).

    Forget prompts are erased, each mapped to its anchor (a concept's single anchor is repeated), and retain
    prompts are preserved.
    """
    erase: list[str] = []
    guide: list[str] = []
    preserve: list[str] = []
    for c in concepts:
        erase.extend(c.forget_prompts)
        guide.extend(c.anchor_for(i) for i in range(len(c.forget_prompts)))
        preserve.extend(c.retain_prompts)
    return erase, guide, preserve


def run(ctx) -> dict[str, torch.Tensor]:
    """The engine's entry: edit ``ctx.unet`` for every concept of the run at once."""
    erase, guide, preserve = concept_prompt_sets(ctx.concepts)
    if ctx.args.guide == "uncond":
        guide = [""] * len(erase)
    return uce_edit(ctx.unet, ctx.text_encoder, ctx.tokenizer, erase, guide, preserve, ctx.args, device=ctx.device,
                    preserve_weights=ctx.retain_weights)


register_method(
    MethodSpec(
        name="uce",
        config_cls=UCEConfig,
        run=run,
        description="UCE closed-form edit of cross-attention K/V: erase -> anchor, preserve the retain prompts.",
        label="UCE (closed-form cross-attention edit)",
        paper="https://arxiv.org/abs/2308.14761",
        needs_images=False,
        families=("sd", "sdxl"),  # edits UNet cross-attention K/V (attn2.to_k / to_v)
    )
)
