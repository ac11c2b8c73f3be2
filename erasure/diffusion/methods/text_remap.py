"""text-remap: remap the concept inside the text encoder, on its salient weights only; no images.

The prompt embedding the UNet reads is trained so that each forget prompt's token states, from the concept's first
token to the end of the padded sequence (the span of UCE's ``concept_to_end``, :mod:`erasure.diffusion.methods.uce`),
equal what the *original* encoder gives its anchor prompt, while the preserve prompts' states (the retain and
neighbour prompts, weighted, and the empty prompt of classifier-free guidance) stay where they were:

    L = erase_scale * mean_span ||E'(f)_t - E(a)_t||^2 + preserve_scale * sum_j w_j mean_t ||E'(p_j)_t - E(p_j)_t||^2 / m

Only the top ``mask_ratio`` fraction (the engine's ``--mask-ratio``, as for SalUn) of the encoder's transformer
weights changes, chosen by SalUn's rule (Fan et al., ICLR 2024, https://arxiv.org/abs/2310.12508): the magnitude of
the gradient of the erase term at the original weights; the token and position embeddings never change, and
weights outside the mask stay bit-identical.

Why the encoder: UCE edits the cross-attention K/V, a linear map of each token state. A conjunction ("a blue star",
kept apart from other stars and other blue shapes) or a far anchor ("a blue heart") needs that map to move one
state a long way while states at cosine 0.95-0.97 stay, which costs the other concepts 4-6 points on the embedded
model (its states are 64 wide). The encoder's attention and MLPs are not linear in the prompt, so the remapping can
depend on the words together. Related work: AdvUnlearn (Zhang et al., NeurIPS 2024) found the text encoder the
better module to unlearn in for utility; Safe-CLIP (Poppi et al., ECCV 2024) fine-tunes CLIP's text encoder to map
unsafe to safe embeddings with a preservation loss. This method is that remapping target with SalUn's mask.

Changed tensors are saved under ``text_encoder.`` in ``weights.safetensors`` (loaded back by
:func:`erasure.load_erased_pipeline`); the run is checkpointed every ``checkpoint_every`` iterations and when
cancelled, and resumes where it stopped. SD v1/v2 family (one CLIP text encoder).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from typing import ClassVar

import torch

from erasure.jsonconfig import field
from erasure.methods import MethodConfig, MethodSpec, register_method

logger = logging.getLogger(__name__)

__all__ = ["TextRemapConfig", "remap_targets", "text_saliency_mask", "text_remap"]


@dataclass
class TextRemapConfig(MethodConfig):
    """Knobs of text-remap (flags ``--remap-*``).

    The built-in ``learning_rate=1e-5`` and ``iterations=1000`` are AdvUnlearn's text-encoder settings for SD v1.4
    (``--lr 1e-5``, 1000 iterations): a 768-wide CLIP encoder moves far at Adam steps of 1e-3 per weight. The
    embedded shapes model (a 64-wide, 2-layer encoder) ships 1e-3 and 300 in its ``erasure_defaults.json``, measured
    in ``bench/README.md``. Not run on real SD weights here.
    """

    cli_prefix: ClassVar[str] = "remap"

    iterations: int = field(1000, help="Adam steps on the text encoder (each on every forget prompt and up to "
                            "preserve_batch preserve prompts).", label="Iterations", min=1, max=100_000)
    learning_rate: float = field(1e-5, help="Adam learning rate of the text-encoder weights.",
                                 label="Learning rate", min=0.0, max=1.0, min_exclusive=True)
    erase_scale: float = field(1.0, help="Weight of the erase term (forget prompts' states -> the anchor's).",
                               label="Erase weight", min=0.0, max=1e6, min_exclusive=True)
    preserve_scale: float = field(1.0, help="Weight of the preserve term (retain, neighbour and empty prompts keep "
                                  "their states); 0 = none.", label="Preserve weight", min=0.0, max=1e6)
    preserve_batch: int = field(128, help="Preserve prompts per iteration (a seeded draw when there are more).",
                                label="Preserve batch", min=1, max=100_000)

    def uses_retain_prompts(self) -> bool:
        return self.preserve_scale > 0

    def tune_grid(self, cfg) -> list[dict]:
        """``--tune``: erase harder or preserve more (and the neighbours' weight), or train longer."""
        es, ps, it = self.erase_scale, self.preserve_scale, self.iterations
        nw = cfg.auto.neighbour_weight if cfg.auto.neighbours else None
        grid = [{}, {"preserve_scale": ps * 3}, {"erase_scale": es * 3}, {"iterations": it * 2}]
        grid += [{"neighbour_weight": nw * 3}] if nw else []
        grid += [{"preserve_scale": ps * 3, "iterations": it * 2}, {"mask_ratio": min(1.0, cfg.mask_ratio * 2)},
                 {"erase_scale": es * 3, "preserve_scale": ps * 3}]
        return grid


def remap_targets(text_encoder, tokenizer, erase_prompts, guide_prompts, preserve_prompts, device):
    """What the loss compares against, from the encoder as it is now (the original):

    ``(erase_ids, span_mask, targets, preserve_ids, preserve_states)``: the erase prompts' ids ``[n, L]``, which of
    their tokens are in the span ``[n, L]`` (from the first token that differs from the guide), the guides' states
    ``[n, L, d]``, and the preserve prompts' ids and states. A pair that tokenizes identically has an empty span;
    only such pairs: ``ValueError``."""
    from erasure.diffusion.methods.uce import first_difference, tokenize_padded

    def _ids(prompts) -> torch.Tensor:
        return tokenize_padded(tokenizer, prompts).input_ids

    first = first_difference(tokenizer, erase_prompts, guide_prompts)
    if all(d is None for d in first):
        raise ValueError("every forget prompt tokenizes the same as its anchor: nothing to remap; give an anchor "
                         "that differs from the forget prompt")
    e_ids, g_ids, p_ids = _ids(erase_prompts), _ids(guide_prompts), _ids(preserve_prompts)
    span = torch.zeros(e_ids.shape, dtype=torch.bool)
    for i, d in enumerate(first):
        if d is not None:
            span[i, d:] = True
    with torch.no_grad():
        targets = text_encoder(g_ids.to(device))[0].float()
        keep = torch.cat([text_encoder(p_ids[i : i + 256].to(device))[0].float() for i in range(0, len(p_ids), 256)])
    return e_ids.to(device), span.to(device), targets, p_ids, keep


def _erase_term(te, e_ids, span, targets) -> torch.Tensor:
    """Mean over the span tokens of the squared distance to the anchor's original states (per-token mean)."""
    return ((te(e_ids)[0].float() - targets) ** 2).mean(-1)[span].mean()


def _losses(te, e_ids, span, targets, p_ids, keep, weights, idx, args) -> dict[str, torch.Tensor]:
    out = {"erase_loss": _erase_term(te, e_ids, span, targets)}
    loss = args.erase_scale * out["erase_loss"]
    if args.preserve_scale > 0 and idx is not None:
        dev = e_ids.device
        per = ((te(p_ids[idx].to(dev))[0].float() - keep[idx.to(keep.device)].to(dev)) ** 2).mean((-1, -2))
        w = weights[idx].to(dev)
        out["preserve_loss"] = (per * w).sum() / w.numel()
        loss = loss + args.preserve_scale * out["preserve_loss"]
    out["loss"] = loss
    return out


def text_saliency_mask(te, e_ids, span, targets, ratio: float) -> dict[str, torch.Tensor]:
    """SalUn's mask over the encoder's trainable weights: the top ``ratio`` by |gradient| of the erase term at the
    current (original) weights. Every weight when ``ratio`` is 1."""
    from erasure.saliency import threshold_mask

    named = {n: p for n, p in te.named_parameters() if _trainable(n)}
    if ratio >= 1.0:
        return {n: torch.ones(p.shape, dtype=torch.bool) for n, p in named.items()}
    for p in named.values():
        p.grad = None
        p.requires_grad_(True)
    _erase_term(te, e_ids, span, targets).backward()
    scores = {n: (p.grad.detach().abs() if p.grad is not None else torch.zeros_like(p)).float().cpu()
              for n, p in named.items()}
    for p in named.values():
        p.grad = None
    return threshold_mask(scores, ratio)


def _trainable(name: str) -> bool:
    """The encoder's transformer layers and final norm; never the token or position embeddings."""
    return "embeddings" not in name


def text_remap(ctx) -> dict[str, torch.Tensor]:
    """The engine's entry: train the salient text-encoder weights; returns them by ``text_encoder.`` name."""
    from erasure.diffusion.mask import step_generator
    from erasure.diffusion.methods.uce import concept_prompt_sets
    from erasure.diffusion.train import EraseCancelled, NonFiniteLossError, restore, save_checkpoint
    from erasure.masked import MaskedUpdate, make_optimizer, prepare_masked_params
    from erasure.progress import emit
    from erasure.runs import TE_PREFIX
    from erasure.saliency import load_mask, mask_stats, save_mask

    cfg, args, dev = ctx.config, ctx.args, ctx.device
    if ctx.run is None:
        raise ValueError("text-remap needs a run folder (call it through erasure.erase)")
    te, tok = ctx.pipe.text_encoder, ctx.pipe.tokenizer
    te.to(dev)
    te.requires_grad_(False)
    erase, guide, preserve = concept_prompt_sets(ctx.concepts)
    preserve = list(dict.fromkeys(["", *preserve])) if args.preserve_scale > 0 else []
    weights = torch.tensor([float((ctx.retain_weights or {}).get(p, 1.0)) for p in preserve], dtype=torch.float32)
    e_ids, span, targets, p_ids, keep = remap_targets(te, tok, erase, guide, preserve or [""], dev)

    t0 = time.time()
    mask_file = ctx.run.partial / "mask.safetensors"
    if (ctx.run.partial / "latest_checkpoint").is_file() and mask_file.is_file():
        # resuming: train in the mask the checkpoint was trained in (a GPU's gradient sums can differ bitwise)
        full = {n: m for n, m in load_mask(mask_file).items() if n.startswith(TE_PREFIX)}
    else:
        full = {TE_PREFIX + n: m for n, m in text_saliency_mask(te, e_ids, span, targets, cfg.mask_ratio).items()}
    ctx.mask = {**{n: torch.zeros(p.shape, dtype=torch.bool) for n, p in ctx.unet.named_parameters()}, **full}
    stats = mask_stats(full)
    save_mask(ctx.mask, mask_file, metadata={
        "mask_ratio": cfg.mask_ratio, "module": "text_encoder", "kept": stats["kept"], "total": stats["total"]})
    emit(ctx.progress, "mask", 1, 1, seconds=round(time.time() - t0, 2))

    te.requires_grad_(False)
    named = {TE_PREFIX + n: p for n, p in te.named_parameters() if _trainable(n)}
    trainable = prepare_masked_params(named, {n: full[n].to(p.device) for n, p in named.items()})
    optimizer, _ = make_optimizer("adam", trainable.values(), lr=args.learning_rate)
    upd = MaskedUpdate(trainable, {n: full[n].to(p.device) for n, p in trainable.items()})
    start = restore(ctx.run, cfg, trainable, optimizer)
    te.train()
    n_keep = len(preserve)
    with open(ctx.run.partial / "log.jsonl", "a", encoding="utf-8") as log:
        for step in range(start, args.iterations):
            idx = None
            if n_keep:
                g = step_generator(cfg.seed, step, salt=29)
                idx = (torch.arange(n_keep) if n_keep <= args.preserve_batch
                       else torch.randperm(n_keep, generator=g)[: args.preserve_batch])
            parts = _losses(te, e_ids, span, targets, p_ids, keep, weights, idx, args)
            if not bool(torch.isfinite(parts["loss"])):
                raise NonFiniteLossError(f"loss is {parts['loss'].item()} at iteration {step}; start again with a "
                                         "lower --remap-learning-rate and --overwrite")
            parts["loss"].backward()
            upd.mask_gradients()
            optimizer.step()
            upd.after_step()
            optimizer.zero_grad(set_to_none=True)
            done = step + 1
            last = {"step": done, **{k: round(float(v.detach()), 7) for k, v in parts.items()}}
            log.write(json.dumps(last) + "\n")
            ctx.log.append(last)
            emit(ctx.progress, "fine-tuning", done, args.iterations, **last)
            stop = done < args.iterations and ctx.cancelled()
            if done < args.iterations and ((cfg.checkpoint_every and done % cfg.checkpoint_every == 0) or stop):
                log.flush()
                save_checkpoint(ctx.run, cfg, done, trainable, optimizer)
            if stop:
                raise EraseCancelled(f"erasure cancelled at iteration {done}; re-run with the same output folder to "
                                     "resume")
    te.eval()
    te.requires_grad_(False)
    logger.info("text-remap: %d forget prompts (%d span tokens), %d preserve prompts, %d of %d encoder weights "
                "trained", len(erase), int(span.sum()), n_keep, stats["kept"], stats["total"])
    return {n: p.detach().float().cpu().contiguous() for n, p in trainable.items()}


register_method(
    MethodSpec(
        name="text-remap",
        config_cls=TextRemapConfig,
        run=text_remap,
        description="Remap the concept's prompt embedding to the anchor's in the text encoder (salient weights only), "
                    "keeping the retain, neighbour and empty prompts' embeddings; no images.",
        label="Text-encoder remap (SalUn mask, no images)",
        paper="https://arxiv.org/abs/2310.12508",
        needs_mask=True,
        needs_images=False,
        families=("sd",),  # one CLIP text encoder whose states the UNet reads (SDXL's pair: not yet)
    )
)
