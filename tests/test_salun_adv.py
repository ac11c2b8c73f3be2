"""salun-adv on the tiny pipeline: what trains for each ``train`` choice, weights outside the mask bit-identical
(UNet and text encoder), resume, the run's text-encoder tensors applied on load, and bad input."""

from __future__ import annotations

import dataclasses
import threading

import pytest
import torch
from safetensors.torch import load_file, save_file

from erasure import ConceptSpec, EraseCancelled, EraseConfig, erase, load_erased_pipeline, load_mask, load_pipeline
from erasure.diffusion import adv
from erasure.diffusion.pipeline import encode_prompts
from erasure.methods import METHODS
from erasure.runs import TE_PREFIX, RunDirError

PROMPTS = ["a red circle", "a blue star", ""]


def _cfg(model, tmp_path, train="unet", **kw) -> EraseConfig:
    margs = {"train": train, "attack_steps": 2, "attack_lr": 1e-2, "adv_tokens": 2, **kw.pop("method_args", {})}
    base = dict(
        model=str(model), method="salun-adv", method_args=margs,
        concepts=[ConceptSpec(name="circle", forget_prompts=["a red circle"], anchor_prompts=["a red square"],
                              retain_prompts=["a blue star"])],
        steps=2, batch_size=2, forget_images_per_prompt=2, retain_images_per_prompt=2, data_steps=2, lr=1e-3,
        cache_dir=str(tmp_path.parent / "cache"), device="cpu", mask_ratio=0.3, checkpoint_every=0,
    )
    base.update(kw)
    return EraseConfig(**base)


@pytest.fixture(scope="module")
def base(tiny_model_dir):
    pipe = load_pipeline(tiny_model_dir, device="cpu")
    return {n: p.detach().clone() for n, p in pipe.unet.named_parameters()}, {
        n: p.detach().clone() for n, p in pipe.text_encoder.named_parameters()}


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int32)


@pytest.mark.parametrize("train", ["unet", "text_encoder", "both"])
def test_train_choice_changes_only_salient_weights(train, tiny_model_dir, tmp_path, base):
    run = erase(_cfg(tiny_model_dir, tmp_path, train), tmp_path / "run")
    weights = load_file(str(run / "weights.safetensors"))
    te_names = {n for n in weights if n.startswith(TE_PREFIX)}
    assert bool(te_names) == (train != "unet")
    assert (len(weights) > len(te_names)) == (train != "text_encoder")
    assert not any("embeddings" in n for n in te_names)  # token and position embeddings never train
    mask = load_mask(run / "mask.safetensors")
    pipe = load_erased_pipeline(run, device="cpu")
    changed = {"unet": 0, "te": 0}
    for part, ref, cur, prefix in (("unet", base[0], pipe.unet, ""), ("te", base[1], pipe.text_encoder, TE_PREFIX)):
        for n, p in cur.named_parameters():
            a, b, m = ref[n], p.detach(), mask[prefix + n]
            assert torch.equal(_bits(a[~m]), _bits(b[~m])), f"{prefix}{n} changed outside the mask"
            changed[part] += int((a != b).sum())
    assert (changed["unet"] > 0) == (train != "text_encoder")
    assert (changed["te"] > 0) == (train != "unet")
    log = (run / "log.jsonl").read_text().splitlines()
    assert len(log) == 2 and '"adv_loss"' in log[-1]


def test_resume_matches_an_uninterrupted_run(tiny_model_dir, tmp_path):
    cfg = _cfg(tiny_model_dir, tmp_path, "both", steps=3, method_args={"attack_init": "latest"})
    full = erase(cfg, tmp_path / "full")
    cancel = threading.Event()
    with pytest.raises(EraseCancelled):
        erase(cfg, tmp_path / "resumed", cancel=cancel,
              progress=lambda e: cancel.set() if e.stage == "fine-tuning" and e.done == 1 else None)
    assert (tmp_path / "resumed.partial" / "checkpoint-1").is_dir()
    out = erase(cfg, tmp_path / "resumed")
    a, b = load_file(str(full / "weights.safetensors")), load_file(str(out / "weights.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert len((out / "log.jsonl").read_text().splitlines()) == 3


def test_load_applies_the_text_encoder_tensors(tiny_model_dir, tmp_path, monkeypatch):
    """The reloaded run gives the prompt embeddings (and UNet outputs) of the model that was trained in memory."""
    spec = METHODS["salun-adv"]
    kept = {}

    def keep(ctx):
        out = spec.run(ctx)
        kept["te"], kept["unet"] = ctx.text_encoder, ctx.unet
        return out

    monkeypatch.setitem(METHODS, "salun-adv", dataclasses.replace(spec, run=keep))
    run = erase(_cfg(tiny_model_dir, tmp_path, "both"), tmp_path / "run")
    monkeypatch.setitem(METHODS, "salun-adv", spec)
    orig = load_pipeline(tiny_model_dir, device="cpu")
    pipe = load_erased_pipeline(run, device="cpu")
    with torch.no_grad():
        e0, e1 = encode_prompts(orig, PROMPTS), encode_prompts(pipe, PROMPTS)
        mem = adv.encode_ids(kept["te"], adv.tokenize(orig.tokenizer, PROMPTS))
        assert not torch.equal(e0, e1)
        assert torch.equal(e1, mem)
        x = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
        t = torch.tensor([500])
        o1 = pipe.unet(x, t, encoder_hidden_states=e1[:1]).sample
        assert torch.equal(o1, kept["unet"](x, t, encoder_hidden_states=mem[:1]).sample)
        assert not torch.equal(o1, orig.unet(x, t, encoder_hidden_states=e0[:1]).sample)


def test_prefix_slots_keep_the_end_token():
    ids = torch.tensor([[49406, 5, 6, 49407, 49407], [49406, 1, 2, 3, 49407]])
    out = adv.with_prefix_slots(ids, 2, 49407)
    assert out.shape == ids.shape and out[0, 0] == 49406 and out[0, 3].item() == 5
    assert (out[1] == 49407).any() and out[1, -1] == 49407


def test_bad_input(tiny_model_dir, tmp_path, base):
    with pytest.raises(ValueError, match="cannot train the text encoder"):
        _cfg(tiny_model_dir, tmp_path, "text_encoder", method_args={"attack_space": "embedding"})
    with pytest.raises(ValueError, match="attack steps"):
        _cfg(tiny_model_dir, tmp_path, method_args={"attack_steps": -1})
    with pytest.raises(ValueError, match="drop --mixed-precision"):
        erase(_cfg(tiny_model_dir, tmp_path, mixed_precision="bf16"), tmp_path / "bf16")
    assert not (tmp_path / "bf16").exists() and not (tmp_path / "bf16.partial").exists()
    # a run whose text-encoder tensor does not fit the base model: one line, naming the parameter
    run = erase(_cfg(tiny_model_dir, tmp_path, "text_encoder", steps=1), tmp_path / "run")
    w = load_file(str(run / "weights.safetensors"))
    name = next(iter(w))
    w[name] = torch.zeros(3)
    save_file(w, str(run / "weights.safetensors"))
    with pytest.raises(RunDirError, match="text encoder"):
        load_erased_pipeline(run, device="cpu")


def test_attack_harness_swaps_text_encoder_tensors(tiny_model_dir, tmp_path):
    """erasure-eval attack's model pair restores the original text encoder for its target images."""
    eval_base = pytest.importorskip("erasure_eval.attacks.base")
    run = erase(_cfg(tiny_model_dir, tmp_path, "text_encoder"), tmp_path / "run")
    pair = eval_base.ModelPair.from_run(str(run), device="cpu")
    orig = load_pipeline(tiny_model_dir, device="cpu")
    with torch.no_grad():
        erased = encode_prompts(pair.pipe, PROMPTS)
        with pair.original() as pipe:
            assert torch.equal(encode_prompts(pipe, PROMPTS), encode_prompts(orig, PROMPTS))
        assert torch.equal(encode_prompts(pair.pipe, PROMPTS), erased)
        assert not torch.equal(erased, encode_prompts(orig, PROMPTS))
