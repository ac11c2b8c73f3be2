"""RECE on the tiny random pipeline: the adversarial embedding's defining property, epochs weaken the attack,
only cross-attention K/V change, config checks."""

from __future__ import annotations

import pytest
import torch

from erasure.diffusion.methods.rece import (
    RECEConfig,
    adversarial_embedding,
    kv_reconstruction_error,
    rece_edit,
)
from erasure.diffusion.methods.uce import UCEConfig, cross_attention_kv, encode_prompt_tokens, uce_edit
from erasure.diffusion.pipeline import load_pipeline

ERASE = ["a red circle", "a photo of a circle", "a circle in blue"]
GUIDE = ["a red square", "a photo of a square", "a square in blue"]
PRESERVE = ["a green triangle", "a photo of a star", "a striped heart", "a cross"]
EPOCHS = 3


def _weights(pipe) -> dict[str, torch.Tensor]:
    return {n: m.weight.detach().double().clone() for n, m in cross_attention_kv(pipe.unet).items()}


@pytest.fixture(scope="module")
def trajectory(tiny_model_dir):
    """Original weights, the erase prompts' embeddings, and the K/V weights after 0..EPOCHS epochs."""
    base = load_pipeline(tiny_model_dir, device="cpu")
    concept, _ = encode_prompt_tokens(base.text_encoder, base.tokenizer, ERASE)
    weights = []
    for k in range(EPOCHS + 1):
        p = load_pipeline(tiny_model_dir, device="cpu")
        rece_edit(p.unet, p.text_encoder, p.tokenizer, ERASE, GUIDE, PRESERVE, RECEConfig(epochs=k))
        weights.append(_weights(p))
    return _weights(base), concept, weights


def test_adversarial_embedding_reproduces_original_kv(trajectory):
    original, concept, weights = trajectory
    reg = RECEConfig().adv_reg
    for k in range(EPOCHS):
        adv = adversarial_embedding(concept, weights[k], original, reg)
        attack = kv_reconstruction_error(adv, weights[k], concept, original)
        plain = kv_reconstruction_error(concept, weights[k], concept, original)
        assert attack < 0.2 * plain, (k, attack, plain)
        # it is the minimiser: the gradient of sum ||W' c' - W c||^2 + reg ||c'||^2 vanishes
        grad = reg * adv
        for n in original:
            grad = grad + (adv @ weights[k][n].T - concept @ original[n].T) @ weights[k][n]
        assert grad.abs().max() < 1e-8 * (concept @ original[n].T).abs().max()
    # with a vanishing regulariser the edited K/V reproduce the original ones exactly (the edit is invertible)
    adv = adversarial_embedding(concept, weights[1], original, 1e-12)
    assert kv_reconstruction_error(adv, weights[1], concept, original) < 1e-8


def test_each_epoch_defeats_its_attack_and_weakens_new_ones(trajectory):
    original, concept, weights = trajectory
    reg = RECEConfig().adv_reg
    fresh = []
    for k in range(EPOCHS):
        adv = adversarial_embedding(concept, weights[k], original, reg)
        before = kv_reconstruction_error(adv, weights[k], concept, original)
        after = kv_reconstruction_error(adv, weights[k + 1], concept, original)
        assert after > 5 * before, (k, before, after)
        fresh.append(before)
    final = adversarial_embedding(concept, weights[EPOCHS], original, reg)
    fresh.append(kv_reconstruction_error(final, weights[EPOCHS], concept, original))
    assert all(a < b for a, b in zip(fresh, fresh[1:])), fresh


def test_only_cross_attention_kv_change_and_epochs_zero_is_uce(tiny_model_dir):
    p = load_pipeline(tiny_model_dir, device="cpu")
    before = {k: v.clone() for k, v in p.unet.state_dict().items()}
    calls = []
    out = rece_edit(p.unet, p.text_encoder, p.tokenizer, ERASE, GUIDE[:1], PRESERVE, RECEConfig(epochs=2),
                    progress=lambda i, n: calls.append((i, n)))
    after = p.unet.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == set(out) and all(".attn2.to_k.weight" in k or ".attn2.to_v.weight" in k for k in changed)
    assert calls == [(0, 2), (1, 2), (2, 2)]

    p0, p1 = load_pipeline(tiny_model_dir, device="cpu"), load_pipeline(tiny_model_dir, device="cpu")
    cfg = RECEConfig(epochs=0, uce_lamb=0.2, uce_preserve_scale=0.5)
    a = rece_edit(p0.unet, p0.text_encoder, p0.tokenizer, ERASE, GUIDE, PRESERVE, cfg)
    b = uce_edit(p1.unet, p1.text_encoder, p1.tokenizer, ERASE, GUIDE, PRESERVE, UCEConfig(0.2, 1.0, 0.5, "last_to_end"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_deterministic(tiny_model_dir):
    outs = []
    for _ in range(2):
        p = load_pipeline(tiny_model_dir, device="cpu")
        outs.append(rece_edit(p.unet, p.text_encoder, p.tokenizer, ERASE, GUIDE, [], RECEConfig(epochs=2)))
    assert all(torch.equal(outs[0][k], outs[1][k]) for k in outs[0])


def test_preserve_set_reduces_collateral_change(tiny_model_dir):
    base = load_pipeline(tiny_model_dir, device="cpu")
    original = _weights(base)
    keep, _ = encode_prompt_tokens(base.text_encoder, base.tokenizer, PRESERVE + [""])
    errors = {}
    for name, preserve, uncond in (("without", [], False), ("with", PRESERVE, True)):
        p = load_pipeline(tiny_model_dir, device="cpu")
        cfg = RECEConfig(epochs=2, preserve_uncond=uncond, uce_preserve_scale=1.0)
        rece_edit(p.unet, p.text_encoder, p.tokenizer, ERASE, GUIDE, preserve, cfg)
        errors[name] = kv_reconstruction_error(keep, _weights(p), keep, original)
    assert errors["with"] < 0.75 * errors["without"], errors


def test_adversarial_embedding_checks_names():
    w = {"a": torch.eye(2)}
    with pytest.raises(ValueError, match="same projections"):
        adversarial_embedding(torch.ones(1, 2), w, {"b": torch.eye(2)}, 1e-3)


def test_config_round_trip_and_validation():
    cfg = RECEConfig(epochs=3, adv_reg=0.1, preserve_uncond=False, uce_lamb=0.1, uce_token_span="last")
    assert RECEConfig.from_json(cfg.to_json()) == cfg
    assert cfg.uce_config() == UCEConfig(lamb=0.1, erase_scale=1.0, preserve_scale=1.0, token_span="last")
    for bad in ({"epochs": -1}, {"epochs": 1.5}, {"epochs": True}, {"adv_reg": 0.0}, {"adv_reg": float("nan")},
                {"lamb": 0}, {"erase_scale": -1.0}, {"preserve_scale": -0.1}, {"preserve_uncond": "yes"},
                {"uce_lamb": 0.0}, {"uce_preserve_scale": -1.0}, {"uce_token_span": "first"}):
        with pytest.raises(ValueError):
            RECEConfig.from_dict(bad)
