"""UCE closed-form edit on the tiny random pipeline: what changes, the closed form's properties, config checks."""

from __future__ import annotations

import pytest
import torch

from erasure.config import ConceptSpec
from erasure.diffusion.methods.uce import (
    UCEConfig,
    concept_prompt_sets,
    cross_attention_kv,
    edit_matrix,
    encode_prompt_tokens,
    last_token_embeddings,
    uce_edit,
)
from erasure.diffusion.pipeline import load_pipeline

ERASE = ["a red circle", "a photo of a circle", "a circle in blue"]
GUIDE = ["a red square", "a photo of a square", "a square in blue"]
PRESERVE = ["a green triangle", "a photo of a star", "a striped heart", "a cross"]


@pytest.fixture()
def pipe(tiny_model_dir):
    return load_pipeline(tiny_model_dir, device="cpu")


def _kv(pipe) -> dict[str, torch.Tensor]:
    return {f"{n}.weight": m.weight.detach().clone() for n, m in cross_attention_kv(pipe.unet).items()}


def _moves(old: dict, new: dict, emb: torch.Tensor) -> float:
    """Total squared change of the projections of ``emb`` rows over all K/V weights."""
    return sum(((new[k].double() - old[k].double()) @ emb.T).pow(2).sum().item() for k in old)


def test_only_cross_attention_kv_changes(pipe):
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    te_before = {k: v.clone() for k, v in pipe.text_encoder.state_dict().items()}
    out = uce_edit(pipe.unet, pipe.text_encoder, pipe.tokenizer, ERASE, GUIDE, PRESERVE, UCEConfig())
    after = pipe.unet.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == set(out)
    assert changed and all(".attn2.to_k.weight" in k or ".attn2.to_v.weight" in k for k in changed)
    kv_names = {k for k in before if "attn2" in k and (k.endswith("to_k.weight") or k.endswith("to_v.weight"))}
    assert changed == kv_names  # every K/V projection is edited
    for k, v in out.items():
        assert v.dtype == before[k].dtype and torch.equal(v, after[k])
    assert all(torch.equal(v, pipe.text_encoder.state_dict()[k]) for k, v in te_before.items())


def test_erased_token_maps_to_guide_when_lamb_small(pipe):
    old = _kv(pipe)
    c = last_token_embeddings(pipe.text_encoder, pipe.tokenizer, ERASE)
    g = last_token_embeddings(pipe.text_encoder, pipe.tokenizer, GUIDE)
    new = uce_edit(pipe.unet, pipe.text_encoder, pipe.tokenizer, ERASE, GUIDE, [], UCEConfig(lamb=1e-8, token_span="last"))
    for k in old:
        target = old[k].double() @ g.T
        got = new[k].double() @ c.T
        before = old[k].double() @ c.T
        assert torch.allclose(got, target, atol=1e-4 * target.abs().max().item()), k
        assert (got - target).norm() < 1e-3 * (before - target).norm(), k


def test_preserve_set_reduces_collateral_change(tiny_model_dir):
    keep = last_token_embeddings(load_pipeline(tiny_model_dir, device="cpu").text_encoder,
                                 load_pipeline(tiny_model_dir, device="cpu").tokenizer, PRESERVE)
    moves = {}
    for name, preserve in (("without", []), ("with", PRESERVE)):
        p = load_pipeline(tiny_model_dir, device="cpu")
        old = _kv(p)
        new = uce_edit(p.unet, p.text_encoder, p.tokenizer, ERASE, GUIDE, preserve, UCEConfig(lamb=0.1))
        moves[name] = _moves(old, new, keep)
    assert moves["with"] < 0.5 * moves["without"], moves


def test_deterministic_and_single_guide_broadcast(tiny_model_dir):
    outs = []
    for guides in (["a square"], ["a square"] * len(ERASE), ["a square"]):
        p = load_pipeline(tiny_model_dir, device="cpu")
        outs.append(uce_edit(p.unet, p.text_encoder, p.tokenizer, ERASE, guides, PRESERVE, UCEConfig()))
    for other in outs[1:]:
        assert all(torch.equal(outs[0][k], other[k]) for k in outs[0])


def test_edit_matrix_equals_per_layer_closed_form(pipe):
    """W @ M equals the paper's (and official script's) per-layer (lamb W + sum v c^T)(lamb I + sum c c^T)^-1."""
    cfg = UCEConfig(lamb=0.3, erase_scale=2.0, preserve_scale=0.7)
    c = last_token_embeddings(pipe.text_encoder, pipe.tokenizer, ERASE)
    g = last_token_embeddings(pipe.text_encoder, pipe.tokenizer, GUIDE)
    p = last_token_embeddings(pipe.text_encoder, pipe.tokenizer, PRESERVE)
    m = edit_matrix(c, g, p, cfg.lamb, cfg.erase_scale, cfg.preserve_scale)
    for _, mod in cross_attention_kv(pipe.unet).items():
        w = mod.weight.detach().double()
        eye = torch.eye(w.shape[1], dtype=torch.float64)
        mat1 = cfg.lamb * w + cfg.erase_scale * sum(torch.outer(w @ gi, ci) for ci, gi in zip(c, g))
        mat1 = mat1 + cfg.preserve_scale * sum(torch.outer(w @ pj, pj) for pj in p)
        mat2 = cfg.lamb * eye + cfg.erase_scale * sum(torch.outer(ci, ci) for ci in c)
        mat2 = mat2 + cfg.preserve_scale * sum(torch.outer(pj, pj) for pj in p)
        assert torch.allclose(w @ m, mat1 @ torch.linalg.inv(mat2), rtol=1e-9, atol=1e-12)


def test_last_token_index(pipe):
    hidden, last = encode_prompt_tokens(pipe.text_encoder, pipe.tokenizer, ["a circle", "", "a photo of a circle"])
    assert hidden.dtype == torch.float64 and hidden.shape[:2] == (3, pipe.tokenizer.model_max_length)
    # [BOS] a circle [EOS]: the word "circle" is at 2; "" has only [BOS] [EOS] -> 0 (the official script's -2)
    assert last.tolist() == [2, 0, 5]


def test_bad_inputs(pipe):
    with pytest.raises(ValueError, match="1 guide prompt or one per erase prompt"):
        uce_edit(pipe.unet, pipe.text_encoder, pipe.tokenizer, ERASE, GUIDE[:2], [], UCEConfig())
    with pytest.raises(ValueError, match="no erase prompts"):
        uce_edit(pipe.unet, pipe.text_encoder, pipe.tokenizer, [], GUIDE, [], UCEConfig())
    with pytest.raises(ValueError, match="lists of strings"):
        uce_edit(pipe.unet, pipe.text_encoder, pipe.tokenizer, "a circle", GUIDE, [], UCEConfig())
    with pytest.raises(ValueError, match="no cross-attention"):
        cross_attention_kv(torch.nn.Sequential(torch.nn.Linear(2, 2)))


def test_config_round_trip_and_validation():
    cfg = UCEConfig(lamb=0.1, erase_scale=2.0, preserve_scale=0.0, token_span="last_to_end")
    assert UCEConfig.from_json(cfg.to_json()) == cfg
    assert UCEConfig.from_dict({}) == UCEConfig()
    for bad in ({"lamb": 0}, {"lamb": -1.0}, {"lamb": float("nan")}, {"lamb": True}, {"lamb": "0.5"},
                {"erase_scale": 0.0}, {"preserve_scale": -0.1}, {"preserve_scale": float("inf")}):
        with pytest.raises(ValueError):
            UCEConfig.from_dict(bad)
    with pytest.raises(ValueError, match="unknown field"):
        UCEConfig.from_dict({"technique": "replace"})


def test_concept_prompt_sets():
    a = ConceptSpec(name="circle", forget_prompts=["a circle", "a red circle"], anchor_prompts=["a square"],
                    retain_prompts=["a star"])
    b = ConceptSpec(name="red", forget_prompts=["a red star", "red"], anchor_prompts=["a blue star", "blue"])
    erase, guide, preserve = concept_prompt_sets([a, b])
    assert erase == ["a circle", "a red circle", "a red star", "red"]
    assert guide == ["a square", "a square", "a blue star", "blue"]
    assert preserve == ["a star"]


def test_last_to_end_span(pipe):
    """Paper-era spans: erase tokens from the last word on, paired with the guide's, cut to equal length; every
    token of the preserve prompts and of the empty prompt is kept."""
    from erasure.diffusion.methods.uce import uce_keys

    hidden_e, _ = encode_prompt_tokens(pipe.text_encoder, pipe.tokenizer, ["a circle"])
    hidden_g, _ = encode_prompt_tokens(pipe.text_encoder, pipe.tokenizer, ["a red square"])
    erase, guide, keep = uce_keys(pipe.text_encoder, pipe.tokenizer, ["a circle"], ["a red square"], ["a star"],
                                  "last_to_end")
    n = pipe.tokenizer.model_max_length
    # "a circle": last word at 2; "a red square": at 3 -> spans [2, n-1) and [3, n)
    assert torch.equal(erase, hidden_e[0, 2 : n - 1]) and torch.equal(guide, hidden_g[0, 3:n])
    assert keep.shape == (2 * n, erase.shape[1])
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    out = uce_edit(pipe.unet, pipe.text_encoder, pipe.tokenizer, ERASE, GUIDE, PRESERVE,
                   UCEConfig(token_span="last_to_end"))
    after = pipe.unet.state_dict()
    assert {k for k in before if not torch.equal(before[k], after[k])} == set(out)
    with pytest.raises(ValueError, match="UCE tokens"):
        UCEConfig(token_span="all")


def test_concept_to_end_span(pipe):
    """The default span starts where the erase prompt first differs from its guide: for "a striped shape" ->
    "a solid shape" the word "striped" is edited (the paper-era span starts at "shape", the last word)."""
    from erasure.diffusion.methods.uce import first_difference, uce_keys

    te, tok = pipe.text_encoder, pipe.tokenizer
    assert UCEConfig().token_span == "concept_to_end"
    erase_p, guide_p = ["a striped shape", "a circle"], ["a solid shape", "a red square"]
    assert first_difference(tok, erase_p, guide_p) == [2, 2]  # 0 start-of-text, 1 "a"
    hidden_e, _ = encode_prompt_tokens(te, tok, erase_p)
    hidden_g, _ = encode_prompt_tokens(te, tok, guide_p)
    erase, guide, keep = uce_keys(te, tok, erase_p, guide_p, ["a star"], "concept_to_end")
    n = tok.model_max_length
    assert torch.equal(erase, torch.cat([hidden_e[0, 2:], hidden_e[1, 2:]]))
    assert torch.equal(guide, torch.cat([hidden_g[0, 2:], hidden_g[1, 2:]]))
    assert keep.shape == (2 * n, erase.shape[1])
    last_e, _, _ = uce_keys(te, tok, erase_p[:1], guide_p[:1], [], "last_to_end")
    assert torch.equal(last_e, hidden_e[0, 3:n]) and erase.shape[0] == 2 * (n - 2)  # one token more per prompt
    # a pair that tokenizes identically adds nothing; only such pairs: a clear error
    e2, _, _ = uce_keys(te, tok, erase_p + ["a star"], guide_p + ["a star"], [], "concept_to_end")
    assert torch.equal(e2, erase)
    with pytest.raises(ValueError, match="differs from the forget prompt"):
        uce_keys(te, tok, ["a star"], ["a star"], [], "concept_to_end")


@pytest.mark.parametrize("span", ["last", "last_to_end", "concept_to_end"])
def test_preserve_weight_equals_repeating_the_prompt(pipe, span):
    """A preserve prompt of weight 2 (a neighbour of erasure.auto) is the same closed form as that prompt twice."""
    from erasure.diffusion.methods.uce import uce_keys

    te, tok = pipe.text_encoder, pipe.tokenizer
    e, g, p2 = uce_keys(te, tok, ERASE, GUIDE, PRESERVE + [PRESERVE[0]], span)
    _, _, pw = uce_keys(te, tok, ERASE, GUIDE, PRESERVE, span, preserve_weights={PRESERVE[0]: 2.0})
    m_repeat = edit_matrix(e, g, p2, 0.5, 1.0, 1.0)
    m_weight = edit_matrix(e, g, pw, 0.5, 1.0, 1.0)
    m_plain = edit_matrix(e, g, uce_keys(te, tok, ERASE, GUIDE, PRESERVE, span)[2], 0.5, 1.0, 1.0)
    assert torch.allclose(m_weight, m_repeat, atol=1e-9)
    assert not torch.allclose(m_weight, m_plain, atol=1e-6)
    with pytest.raises(ValueError, match=">= 0"):
        uce_keys(te, tok, ERASE, GUIDE, PRESERVE, span, preserve_weights={PRESERVE[1]: -1.0})
