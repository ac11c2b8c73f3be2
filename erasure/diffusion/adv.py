"""The inner attack of adversarial erasure (salun-adv): a fast embedding-space attack against the current model.

AdvUnlearn (Zhang et al., NeurIPS 2024, https://arxiv.org/abs/2405.15234) finds, at every outer step, a soft
prompt that makes the model being erased produce the concept again: ``k`` free word embeddings put in front of
the forget prompt (its ``prefix_k`` / ``word_embd`` attack, through the text encoder), or a perturbation of the
prompt embedding the UNet sees (``condition_embd``). The objective here is UnlearnDiffAtk's: the current model's
own denoising loss on forget images, ``MSE(eps_theta(x_t, c_adv), noise)``; a low loss means the model still
denoises the concept's images under ``c_adv``.

Soft-prefix encoding replaces the outputs of the text encoder's input-embedding layer at the prefix positions
(a forward hook), so any CLIP-like encoder works without re-implementing its forward.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F

__all__ = ["tokenize", "with_prefix_slots", "encode_ids", "encode_with_prefix", "random_prefix", "attack"]


def tokenize(tokenizer, prompts: list[str]) -> torch.Tensor:
    """Token ids ``[N, max_length]`` padded as the pipeline pads them."""
    return tokenizer(list(prompts), padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids


def with_prefix_slots(ids: torch.Tensor, k: int, eos_id: int) -> torch.Tensor:
    """Insert ``k`` slot tokens after the start token (their embeddings are replaced by the attack); the sequence
    keeps its length and still ends with an end token."""
    if k == 0:
        return ids
    n, length = ids.shape
    slot = torch.full((n, k), eos_id, dtype=ids.dtype)
    out = torch.cat([ids[:, :1], slot, ids[:, 1:]], dim=1)[:, :length].clone()
    has_end = (out[:, k + 1:] == eos_id).any(dim=1)
    out[~has_end, -1] = eos_id  # a prompt that filled the context: its end token was cut
    return out


@contextlib.contextmanager
def _prefix_hook(text_encoder, prefix: torch.Tensor) -> Iterator[None]:
    emb = text_encoder.get_input_embeddings()
    k = prefix.shape[1]

    def hook(_module, _inputs, output):
        p = prefix.to(output.dtype).expand(output.shape[0], -1, -1)
        return torch.cat([output[:, :1], p, output[:, 1 + k:]], dim=1)

    handle = emb.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def encode_ids(text_encoder, ids: torch.Tensor) -> torch.Tensor:
    """Last hidden states ``[N, L, D]`` (what the UNet consumes)."""
    return text_encoder(ids.to(text_encoder.device))[0]


def encode_with_prefix(text_encoder, slot_ids: torch.Tensor, prefix: torch.Tensor) -> torch.Tensor:
    """Encode ``slot_ids`` (from :func:`with_prefix_slots`) with the slot embeddings replaced by ``prefix``
    (``[1 or N, k, D]`` word embeddings); gradients flow to ``prefix`` and to the encoder's weights."""
    with _prefix_hook(text_encoder, prefix):
        return encode_ids(text_encoder, slot_ids)


def random_prefix(text_encoder, n: int, k: int, generator: torch.Generator) -> torch.Tensor:
    """Word embeddings of ``k`` vocabulary tokens drawn at random (AdvUnlearn's random initialisation), ``[n, k, D]``."""
    table = text_encoder.get_input_embeddings().weight
    ids = torch.randint(0, table.shape[0], (n, k), generator=generator)
    return table.detach()[ids.to(table.device)].clone().float()


def _descend(x: torch.Tensor, grad: torch.Tensor, lr: float, method: str, opt) -> None:
    if method == "sign":
        x.sub_(lr * grad.sign())
    else:
        x.grad = grad
        opt.step()


def attack(
    unet, text_encoder, x_t: torch.Tensor, t: torch.Tensor, noise: torch.Tensor, *, space: str, steps: int, lr: float,
    method: str, slot_ids: torch.Tensor | None = None, prefix: torch.Tensor | None = None,
    cond: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``steps`` updates of the adversarial variable that lower ``MSE(eps(x_t, c_adv), noise)``.

    Args:
        space (`str`): ``token``: ``prefix`` (word embeddings at the slots of ``slot_ids``) passes through the
            text encoder; ``embedding``: a perturbation of ``cond`` (the prompt embedding), starting at zero.
        method (`str`): ``sign`` (signed-gradient steps of size ``lr``: FGSM with one step, PGD-style with more;
            AdvUnlearn's fast-AT signs its gradients) or ``adam`` (Adam at ``lr``, AdvUnlearn's default).

    Returns:
        `(variable, c_adv)`: the final adversarial variable (detached; the prefix, or the perturbation) and
        the adversarial prompt embedding it gives (detached).
    """
    if space == "token":
        var = prefix.detach().clone()
    else:
        var = torch.zeros_like(cond)
    var.requires_grad_(True)
    opt = torch.optim.Adam([var], lr=lr) if method == "adam" else None
    frozen = [p for p in (*unet.parameters(), *text_encoder.parameters()) if p.requires_grad]
    for p in frozen:  # the attack moves only its own variable
        p.requires_grad_(False)
    try:
        for _ in range(steps):
            c = encode_with_prefix(text_encoder, slot_ids, var) if space == "token" else cond + var
            loss = F.mse_loss(unet(x_t, t, encoder_hidden_states=c.to(x_t.dtype)).sample.float(), noise.float())
            (grad,) = torch.autograd.grad(loss, var)
            with torch.no_grad():
                _descend(var, grad, lr, method, opt)
        with torch.no_grad():
            c = encode_with_prefix(text_encoder, slot_ids, var) if space == "token" else cond + var
    finally:
        for p in frozen:
            p.requires_grad_(True)
    return var.detach(), c.detach()
