"""salun-adv: SalUn with adversarial training in the erasure loop (a saliency version of AdvUnlearn).

AdvUnlearn (Zhang et al., NeurIPS 2024, https://arxiv.org/abs/2405.15234, code OPTML-Group/AdvUnlearn) shows
that erasure survives adversarial prompts when every outer step trains against an attack on the current model,
and that updating the text encoder (with a utility-retaining term on retain prompts) keeps image quality better
than updating the UNet. This method is bi-level:

* **inner**: ``attack_steps`` steps of a fast embedding-space attack on the current model (see
  :mod:`erasure.diffusion.adv`): free word embeddings in front of the forget prompt (``token``) or a perturbation
  of its prompt embedding (``embedding``) that minimise the model's denoising loss on the Df images;
* **outer**: the SalUn step, remapping both the plain and the adversarial forget conditions to the anchor's
  prediction, plus ``alpha`` times the retain loss on Dr, on the salient weights only (SalUn, Fan et al.,
  ICLR 2024, https://arxiv.org/abs/2310.12508). Weights outside the mask stay bit-identical.

``train`` picks what changes: the UNet, the text encoder (its transformer layers and final layer norm, as
AdvUnlearn's ``text_encoder_full``; never the token or position embeddings), or both. Each trained module gets its
own saliency mask (the top ``mask_ratio`` of its weights by SalUn's forget-loss gradient). When the text encoder
trains, the retain loss feeds the UNet the current encoder's retain embeddings (AdvUnlearn's ``reg`` retain
term), and ``te_retain_weight`` keeps the retain prompts' (and the empty prompt's) embeddings where they were.
Changed text-encoder tensors are saved under ``text_encoder.`` in ``weights.safetensors``.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from erasure.diffusion import adv
from erasure.diffusion.methods.salun import SalUnConfig
from erasure.jsonconfig import field
from erasure.methods import MethodSpec, register_method
from erasure.runs import TE_PREFIX


@dataclass
class SalUnAdvConfig(SalUnConfig):
    """Knobs of salun-adv (SalUn's ``alpha`` and ``retain_loss`` plus the attack and the text encoder).

    Defaults, and where they come from:

    * ``train="unet"``: SalUn's setting; AdvUnlearn's best utility trade-off is ``text_encoder`` (its README trains
      ``text_encoder_full``); both are offered.
    * ``attack_steps=3``: AdvUnlearn's multi-step attack uses 30 steps per outer step (30 extra UNet forward and
      backward passes); its fast-AT variant exists because that is slow. With ``attack_init="latest"`` the prefix
      carries over between outer steps (as in free adversarial training), so 3 steps per step keep a step at about
      twice SalUn's cost. ``attack_steps=1`` with ``attack_init="random"`` is FGSM from a random start (the fast-AT
      recipe); ``bench/adv_robustness.py`` measures that setting.
    * ``attack_lr=1e-3``, ``adv_tokens=1``, ``attack_space="token"``: AdvUnlearn's ``--attack_lr``,
      ``--adv_prompt_num`` and ``--attack_embd_type word_embd`` defaults (``prefix_k``).
    * ``attack_method="sign"``: AdvUnlearn's ``fast_at`` signs the gradient; signed steps make ``attack_lr`` a
      per-coordinate distance, independent of the loss scale.
    * ``te_retain_weight=1.0``: AdvUnlearn's ``--retain_loss_w`` default (its README example uses 0.3).
    """

    train: Literal["unet", "text_encoder", "both"] = field(
        "unet", help="What trains (masked): the UNet, the text encoder (transformer layers and final norm), or both.",
        label="Train")
    attack_steps: int = field(3, help="Inner attack steps per outer step (0 = plain SalUn).", label="Attack steps",
                              min=0, max=1000)
    attack_lr: float = field(1e-3, help="Inner attack step size (per coordinate for sign steps; Adam's lr for adam).",
                             label="Attack step size", min=0.0, max=10.0, min_exclusive=True)
    adv_tokens: int = field(1, help="Adversarial prefix tokens (token space).", label="Adversarial tokens", min=1,
                            max=16)
    attack_space: Literal["token", "embedding"] = field(
        "token", help="token: soft prefix word embeddings through the text encoder (AdvUnlearn word_embd); embedding: "
        "a perturbation of the prompt embedding (condition_embd).", label="Attack space")
    attack_method: Literal["sign", "adam"] = field(
        "sign", help="sign: signed-gradient steps (FGSM/fast-AT); adam: Adam on the adversarial variable.",
        label="Attack optimiser")
    attack_init: Literal["latest", "random"] = field(
        "latest", help="latest: warm-start from the previous outer step's prefix; random: random vocabulary tokens "
        "every step.", label="Attack init")
    adv_weight: float = field(1.0, help="Weight of the remap loss on the adversarial condition.",
                              label="Adversarial weight", min=0.0, max=100.0)
    te_retain_weight: float = field(1.0, help="Weight of the text-encoder retain term MSE(E(r), E0(r)) on the retain "
                                    "prompts and the empty prompt (text encoder training only).",
                                    label="Text-encoder retain weight", min=0.0, max=1000.0)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.attack_space == "embedding" and self.train != "unet" and self.attack_steps > 0:
            raise ValueError("attack_space 'embedding' perturbs the prompt embedding after the text encoder, so it "
                             "cannot train the text encoder against it: use --attack-space token or --train unet")

    def uses_retain(self) -> bool:
        return self.alpha > 0 or (self.trains_text_encoder() and self.te_retain_weight > 0)

    def trains_unet(self) -> bool:
        return self.train in ("unet", "both")

    def trains_text_encoder(self) -> bool:
        return self.train in ("text_encoder", "both")

    def needs_frozen_unet(self) -> bool:
        return self.alpha > 0 and self.retain_loss == "distill" and self.trains_unet()


def te_trainable(name: str) -> bool:
    """Text-encoder weights that may train: everything but the token and position embeddings."""
    return "embeddings" not in name


# ------------------------------------------------------------------------------------------------ mask
def _te_mask(ctx, ids: torch.Tensor, te_params: dict) -> dict[str, torch.Tensor]:
    """SalUn saliency over the text encoder: |grad| of the mask loss through the forget prompts' embeddings."""
    from erasure.diffusion.losses import StepBatch, add_noise, mask_loss
    from erasure.diffusion.mask import step_generator
    from erasure.saliency import accumulate_gradients, threshold_mask

    cfg, data = ctx.config, ctx.data
    nf = data.forget_latents.shape[0]
    n_batches = cfg.mask_batches or -(-nf // cfg.batch_size)
    unet, te = ctx.unet, ctx.text_encoder

    def batches():
        for i in range(n_batches):
            g = step_generator(cfg.seed, i, salt=17)
            idx = torch.arange(i * cfg.batch_size, (i + 1) * cfg.batch_size) % nf
            x_t, t, noise = add_noise(ctx.pipe.scheduler, data.forget_latents[idx].to(ctx.device), g)
            yield x_t, t, noise, data.forget_prompt[idx]

    def loss(b):
        x_t, t, noise, pi = b
        cond = adv.encode_ids(te, ids[pi])
        return mask_loss(unet, StepBatch(x_t, t, noise, cond, cond, data.uncond.to(ctx.device)), cfg.mask_guidance)

    scores = accumulate_gradients(te_params, batches(), loss, mode=cfg.mask_score, total=n_batches)
    return threshold_mask(scores, cfg.mask_ratio)


def _build_mask(ctx, ids: torch.Tensor, te_params: dict) -> dict[str, torch.Tensor]:
    """One mask over UNet names and ``text_encoder.``-prefixed names; modules that do not train are all False."""
    from erasure.diffusion.mask import resolve_mask

    cfg, args = ctx.config, ctx.args
    unet = ctx.unet
    if args.trains_unet():
        mask, _ = resolve_mask(cfg, unet, ctx.pipe.scheduler, ctx.data, cfg.trainable, ctx.run.partial, None,
                               ctx.progress)
    else:
        mask = {n: torch.zeros(p.shape, dtype=torch.bool) for n, p in unet.named_parameters()}
    te_named = dict(ctx.text_encoder.named_parameters())
    te_mask = {n: torch.zeros(p.shape, dtype=torch.bool) for n, p in te_named.items()}
    if args.trains_text_encoder():
        te_mask.update(_te_mask(ctx, ids, te_params))
    mask.update({TE_PREFIX + n: m.cpu() for n, m in te_mask.items()})
    return mask


# ------------------------------------------------------------------------------------------------ one step
def _retain_loss(ctx, rx, rt, rn, r_ids, r_orig, uncond_cond, uncond_orig) -> torch.Tensor:
    args = ctx.args
    trains_te = args.trains_text_encoder()
    cond = adv.encode_ids(ctx.text_encoder, r_ids) if trains_te else r_orig
    if args.retain_loss == "denoise":
        return F.mse_loss(ctx.unet(rx, rt, encoder_hidden_states=cond).sample.float(), rn.float())
    # distill: the current (UNet, encoder) on x_t must predict what the original pair predicts, cond and ""
    n = rx.shape[0]
    teacher = ctx.frozen_unet if ctx.frozen_unet is not None else ctx.unet
    x2, t2 = torch.cat([rx, rx]), torch.cat([rt, rt])
    with torch.no_grad():
        target = teacher(x2, t2, encoder_hidden_states=torch.cat([r_orig, uncond_orig.expand(n, -1, -1)])).sample
    pred = ctx.unet(x2, t2, encoder_hidden_states=torch.cat([cond, uncond_cond.expand(n, -1, -1)])).sample
    return F.mse_loss(pred.float(), target.float())


def _step(ctx, g: torch.Generator, ids: torch.Tensor, slot_ids: torch.Tensor, state: dict) -> dict[str, torch.Tensor]:
    """One outer step's losses (the inner attack runs first); ``state["prefix"]`` carries the warm start."""
    from erasure.diffusion.losses import add_noise

    cfg, args, data, dev = ctx.config, ctx.args, ctx.data, ctx.device
    unet, te = ctx.unet, ctx.text_encoder
    trains_te = args.trains_text_encoder()
    nf = data.forget_latents.shape[0]
    fi = torch.randint(0, nf, (cfg.batch_size,), generator=g)
    x_t, t, noise = add_noise(ctx.pipe.scheduler, data.forget_latents[fi].to(dev), g)
    pi = data.forget_prompt[fi]
    f_orig = data.embeddings[pi].to(dev)
    anchor = data.embeddings[data.anchor_prompt[fi]].to(dev)
    forget_cond = adv.encode_ids(te, ids[pi]) if trains_te else f_orig
    init = adv.random_prefix(te, 1, args.adv_tokens, g).to(dev)  # drawn every step: the stream stays the same
    conds = [forget_cond]
    if args.attack_steps > 0:
        if args.attack_space == "token":
            prefix = state["prefix"] if args.attack_init == "latest" and state.get("prefix") is not None else init
            prefix, c_adv = adv.attack(unet, te, x_t, t, noise, space="token", steps=args.attack_steps,
                                       lr=args.attack_lr, method=args.attack_method, slot_ids=slot_ids[pi],
                                       prefix=prefix)
            state["prefix"] = prefix
            if trains_te:  # the outer step trains the encoder against the prefix it was attacked with
                c_adv = adv.encode_with_prefix(te, slot_ids[pi], prefix)
        else:
            delta, c_adv = adv.attack(unet, te, x_t, t, noise, space="embedding", steps=args.attack_steps,
                                      lr=args.attack_lr, method=args.attack_method, cond=forget_cond.detach())
        conds.append(c_adv)
    n = x_t.shape[0]
    with torch.no_grad():
        target = unet(x_t, t, encoder_hidden_states=anchor).sample
    pred = unet(torch.cat([x_t] * len(conds)), torch.cat([t] * len(conds)),
                encoder_hidden_states=torch.cat(conds)).sample
    out = {"forget_loss": F.mse_loss(pred[:n].float(), target.float())}
    loss = out["forget_loss"]
    if len(conds) > 1:
        out["adv_loss"] = F.mse_loss(pred[n:].float(), target.float())
        loss = loss + args.adv_weight * out["adv_loss"]
        with torch.no_grad():  # the attack's own objective after the inner steps, for the log
            out["attack_loss"] = F.mse_loss(pred[n:].float(), noise.float())
    if data.retain_latents is not None and (args.alpha > 0 or (trains_te and args.te_retain_weight > 0)):
        ri = torch.randint(0, data.retain_latents.shape[0], (cfg.batch_size,), generator=g)
        rx, rt, rn = add_noise(ctx.pipe.scheduler, data.retain_latents[ri].to(dev), g)
        rp = data.retain_prompt[ri]
        r_orig = data.embeddings[rp].to(dev)
        uncond_orig = data.uncond.to(dev)
        uncond_cond = adv.encode_ids(te, state["uncond_ids"]) if trains_te else uncond_orig
        if args.alpha > 0:
            out["retain_loss"] = _retain_loss(ctx, rx, rt, rn, ids[rp], r_orig, uncond_cond, uncond_orig)
            loss = loss + args.alpha * out["retain_loss"]
        if trains_te and args.te_retain_weight > 0:
            emb = adv.encode_ids(te, ids[rp])
            out["te_retain_loss"] = (F.mse_loss(emb.float(), r_orig.float())
                                     + F.mse_loss(uncond_cond.float(), uncond_orig.float()))
            loss = loss + args.te_retain_weight * out["te_retain_loss"]
    out["loss"] = loss
    return out


# ------------------------------------------------------------------------------------------------ the loop
def _checkpoint(ctx, done: int, trainable: dict, optimizer, state: dict) -> None:
    from erasure.diffusion.train import save_checkpoint

    params = dict(trainable)
    if state.get("prefix") is not None:
        params["adv.prefix"] = state["prefix"]
    save_checkpoint(ctx.run, ctx.config, done, params, optimizer)


def salun_adv(ctx) -> dict[str, torch.Tensor]:
    """The whole erasure (mask, bi-level loop with checkpoints); returns the changed tensors by run-file name."""
    from erasure.diffusion.mask import step_generator
    from erasure.diffusion.train import EraseCancelled, NonFiniteLossError, build_optimizer, restore
    from erasure.masked import prepare_masked_params
    from erasure.progress import emit
    from erasure.saliency import mask_stats, save_mask

    cfg, args = ctx.config, ctx.args
    if cfg.mixed_precision != "no" or cfg.grad_accum != 1:
        raise ValueError("salun-adv runs in float32 without gradient accumulation: drop --mixed-precision and "
                         "--grad-accum")
    if ctx.data is None or ctx.run is None:
        raise ValueError("salun-adv needs the forget set and a run folder (call it through erasure.erase)")
    unet, te, dev = ctx.unet, ctx.text_encoder, ctx.device
    te.to(dev)
    tok = ctx.tokenizer
    eos = tok.eos_token_id
    ids = adv.tokenize(tok, ctx.data.prompts)
    slot_ids = adv.with_prefix_slots(ids, args.adv_tokens, eos)
    state: dict = {"prefix": None, "uncond_ids": adv.tokenize(tok, [""])}

    from erasure.diffusion.mask import trainable_filter

    unet_named = {n: p for n, p in unet.named_parameters()}
    te_named = {n: p for n, p in te.named_parameters()}
    for p in (*unet_named.values(), *te_named.values()):
        p.requires_grad_(False)
    te_cand = {n: p for n, p in te_named.items() if te_trainable(n)}
    for p in te_cand.values():
        p.requires_grad_(True)
    t0 = time.time()
    mask = _build_mask(ctx, ids, te_cand)
    named = {n: p for n, p in unet_named.items() if args.trains_unet() and trainable_filter(n, cfg.trainable)}
    if args.trains_text_encoder():
        named.update({TE_PREFIX + n: p for n, p in te_cand.items()})
    for p in (*unet_named.values(), *te_named.values()):
        p.requires_grad_(False)
    trainable = prepare_masked_params(named, {n: mask[n].to(p.device) for n, p in named.items()})
    stats = mask_stats(mask)
    save_mask(mask, ctx.run.partial / "mask.safetensors", metadata={
        "mask_ratio": cfg.mask_ratio, "trainable": cfg.trainable, "train": args.train, "kept": stats["kept"],
        "total": stats["total"]})
    ctx.mask = mask
    emit(ctx.progress, "mask", 1, 1, seconds=round(time.time() - t0, 2))

    optimizer, upd = build_optimizer(cfg, trainable, {n: mask[n].to(p.device) for n, p in trainable.items()})
    ck_state = dict(trainable)
    if args.attack_init == "latest" and args.attack_space == "token" and args.attack_steps > 0:
        ck_state["adv.prefix"] = torch.zeros(1, args.adv_tokens, te.get_input_embeddings().weight.shape[1], device=dev)
    start = restore(ctx.run, cfg, ck_state, optimizer)
    if start > 0 and "adv.prefix" in ck_state:
        state["prefix"] = ck_state["adv.prefix"]
    unet.train() if args.trains_unet() else unet.eval()
    te.train() if args.trains_text_encoder() else te.eval()
    with open(ctx.run.partial / "log.jsonl", "a", encoding="utf-8") as log:
        for step in range(start, cfg.steps):
            g = step_generator(cfg.seed, step)
            ctx.generator = g
            parts = _step(ctx, g, ids, slot_ids, state)
            loss = parts["loss"]
            if not bool(torch.isfinite(loss)):
                raise NonFiniteLossError(f"loss is {loss.item()} at step {step}; start again with a lower --lr and "
                                         "--overwrite")
            loss.backward()
            upd.mask_gradients()
            if cfg.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(list(trainable.values()), cfg.max_grad_norm)
            upd.apply_weight_decay(cfg.lr)
            optimizer.step()
            upd.after_step()
            optimizer.zero_grad(set_to_none=True)
            last = {"step": step + 1, **{k: round(float(v.detach()), 6) for k, v in parts.items()}}
            log.write(json.dumps(last) + "\n")
            log.flush()
            ctx.log.append(last)
            emit(ctx.progress, "fine-tuning", step + 1, cfg.steps, **last)
            done = step + 1
            stop = done < cfg.steps and ctx.cancelled()
            if done < cfg.steps and ((cfg.checkpoint_every and done % cfg.checkpoint_every == 0) or stop):
                _checkpoint(ctx, done, trainable, optimizer, state)
            if stop:
                raise EraseCancelled(f"erasure cancelled at step {done}; re-run with the same output folder to resume")
    unet.eval()
    te.eval()
    return {n: p.detach().float().cpu().contiguous() for n, p in trainable.items()}


register_method(
    MethodSpec(
        name="salun-adv",
        config_cls=SalUnAdvConfig,
        run=salun_adv,
        description="SalUn with an inner embedding-space attack each step (AdvUnlearn-style); UNet and/or text "
        "encoder, masked.",
        label="SalUn-Adv (adversarially robust SalUn)",
        paper="https://arxiv.org/abs/2405.15234",
        needs_mask=True,
        families=("sd",),  # calls the UNet with SD v1/v2 conditioning and trains the CLIP text encoder
    )
)
