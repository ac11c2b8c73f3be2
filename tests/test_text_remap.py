"""text-remap: the text-encoder remapping on its salient weights. The loss against a hand computation, SalUn's mask
by an independent gradient, the remapping and preservation it trains, resume, bad input, and the embedded model's
"a blue star" -> "a blue heart" (a far anchor UCE's linear K/V edit could not reach)."""

from __future__ import annotations

import json
import threading

import pytest
import torch
from safetensors.torch import load_file

from erasure import (
    ConceptSpec,
    EraseCancelled,
    EraseConfig,
    erase,
    generate,
    load_erased_pipeline,
    load_mask,
    load_pipeline,
)
from erasure.diffusion.methods.text_remap import TextRemapConfig
from erasure.runs import TE_PREFIX
from erasure.saliency import save_mask
from erasure.shapes import default_model_path

FORGET, ANCHOR, KEEP = "a red circle", "a red square", "a blue star"


def _cfg(model, tmp_path, mask_ratio=1.0, **margs) -> EraseConfig:
    return EraseConfig(mask_ratio=mask_ratio,
        model=str(model), method="text-remap", method_args={"iterations": 100, "learning_rate": 3e-4, **margs},
        concepts=[ConceptSpec(name="circle", forget_prompts=[FORGET], anchor_prompts=[ANCHOR], retain_prompts=[KEEP])],
        cache_dir=str(tmp_path.parent / "cache"), device="cpu", checkpoint_every=0)


def _states(pipe, prompts):
    ids = pipe.tokenizer(prompts, padding="max_length", max_length=pipe.tokenizer.model_max_length,
                         return_tensors="pt").input_ids
    with torch.no_grad():
        return pipe.text_encoder(ids)[0], ids


def _span_start(pipe) -> int:
    _, a = _states(pipe, [FORGET])
    _, b = _states(pipe, [ANCHOR])
    return int((a[0] != b[0]).nonzero()[0, 0])


def test_remaps_the_span_and_keeps_the_preserve_prompts(tiny_model_dir, tmp_path):
    run = erase(_cfg(tiny_model_dir, tmp_path), tmp_path / "run")
    orig, pipe = load_pipeline(tiny_model_dir, device="cpu"), load_erased_pipeline(run, device="cpu")
    d = _span_start(orig)
    (f0, a0, k0, e0), _ = _states(orig, [FORGET, ANCHOR, KEEP, ""])
    (f1, k1, e1), _ = _states(pipe, [FORGET, KEEP, ""])
    before, after = ((f0[d:] - a0[d:]) ** 2).mean(), ((f1[d:] - a0[d:]) ** 2).mean()
    assert after < 0.05 * before, (before, after)  # the concept's span moved to the anchor's
    assert ((k1 - k0) ** 2).mean() < 0.05 * before and ((e1 - e0) ** 2).mean() < 0.05 * before
    assert not torch.equal(f1[:d], f0[:d]) or d == 0  # the encoder changed, not a copy of the anchor's states


def test_logged_loss_is_the_documented_loss(tiny_model_dir, tmp_path):
    """Step 2's logged loss equals the docstring's formula evaluated by hand on the encoder after one update (the
    one-iteration run), with the empty and the retain prompt weighted 1 and the erase term over the span only."""
    one = erase(_cfg(tiny_model_dir, tmp_path, iterations=1), tmp_path / "one")
    two = erase(_cfg(tiny_model_dir, tmp_path, iterations=2), tmp_path / "two")
    log = [json.loads(x) for x in (two / "log.jsonl").read_text().splitlines()]
    orig, w1 = load_pipeline(tiny_model_dir, device="cpu"), load_erased_pipeline(one, device="cpu")
    d = _span_start(orig)
    (f0, a0, k0, e0), _ = _states(orig, [FORGET, ANCHOR, KEEP, ""])
    (f1, k1, e1), _ = _states(w1, [FORGET, KEEP, ""])
    assert log[0]["erase_loss"] == pytest.approx(float(((f0[d:] - a0[d:]) ** 2).mean()), rel=1e-5)
    assert log[0]["preserve_loss"] == 0.0
    erase_term = float(((f1[d:] - a0[d:]) ** 2).mean())
    preserve_term = float((((e1 - e0) ** 2).mean() + ((k1 - k0) ** 2).mean()) / 2)
    assert log[1]["erase_loss"] == pytest.approx(erase_term, rel=1e-4)
    assert log[1]["preserve_loss"] == pytest.approx(preserve_term, rel=1e-4)
    assert log[1]["loss"] == pytest.approx(erase_term + preserve_term, rel=1e-4)


def test_mask_is_salun_top_gradient_and_nothing_else_changes(tiny_model_dir, tmp_path):
    ratio = 0.2
    run = erase(_cfg(tiny_model_dir, tmp_path, mask_ratio=ratio, iterations=5), tmp_path / "run")
    mask = load_mask(run / "mask.safetensors")
    orig = load_pipeline(tiny_model_dir, device="cpu")
    te = orig.text_encoder
    d = _span_start(orig)
    (target,), _ = _states(orig, [ANCHOR])
    _, ids = _states(orig, [FORGET])
    named = {n: p for n, p in te.named_parameters() if "embeddings" not in n}
    for p in te.parameters():
        p.requires_grad_(True)
    loss = ((te(ids)[0][0, d:] - target[d:]) ** 2).mean()
    loss.backward()
    scores = torch.cat([p.grad.abs().flatten() for p in named.values()])
    k = round(ratio * scores.numel())
    tau = scores.topk(k).values[-1]
    te_mask = {n[len(TE_PREFIX):]: m for n, m in mask.items() if n.startswith(TE_PREFIX)}
    assert set(te_mask) == set(named)  # never the token or position embeddings
    assert sum(int(m.sum()) for m in te_mask.values()) == k
    for n, p in named.items():
        assert torch.equal(te_mask[n], p.grad.abs() >= tau) or (p.grad.abs() == tau).any()
    assert not any(bool(m.any()) for n, m in mask.items() if not n.startswith(TE_PREFIX))  # the UNet never trains
    pipe = load_erased_pipeline(run, device="cpu")
    cur = dict(pipe.text_encoder.named_parameters())
    changed = 0
    for n, p in orig.text_encoder.named_parameters():
        m = te_mask.get(n, torch.zeros(p.shape, dtype=torch.bool))
        assert torch.equal(p.detach()[~m].view(torch.int32), cur[n].detach()[~m].view(torch.int32)), n
        changed += int((p.detach() != cur[n].detach()).sum())
    assert changed > 0
    for a, b in zip(orig.unet.parameters(), pipe.unet.parameters()):
        assert torch.equal(a, b)
    assert all(n.startswith(TE_PREFIX) for n in load_file(str(run / "weights.safetensors")))


def test_resume_after_cancel_matches_an_uninterrupted_run(tiny_model_dir, tmp_path):
    cfg = _cfg(tiny_model_dir, tmp_path, mask_ratio=0.5, iterations=6)
    full = erase(cfg, tmp_path / "full")
    cancel = threading.Event()
    with pytest.raises(EraseCancelled, match="resume"):
        erase(cfg, tmp_path / "resumed", cancel=cancel,
              progress=lambda e: cancel.set() if e.stage == "fine-tuning" and e.done == 2 else None)
    assert (tmp_path / "resumed.partial" / "checkpoint-2").is_dir()
    saved = load_mask(tmp_path / "resumed.partial" / "mask.safetensors")
    out = erase(cfg, tmp_path / "resumed")
    assert all(torch.equal(saved[n], m) for n, m in load_mask(out / "mask.safetensors").items())
    a, b = load_file(str(full / "weights.safetensors")), load_file(str(out / "weights.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert len((out / "log.jsonl").read_text().splitlines()) == 6
    # a resumed run trains in the mask saved beside its checkpoint, not in a recomputed one
    cancel.clear()
    with pytest.raises(EraseCancelled):
        erase(cfg, tmp_path / "again", cancel=cancel,
              progress=lambda e: cancel.set() if e.stage == "fine-tuning" and e.done == 2 else None)
    cancel.clear()
    path = tmp_path / "again.partial" / "mask.safetensors"
    mask = load_mask(path)
    name = next(n for n, m in mask.items() if n.startswith(TE_PREFIX) and int(m.sum()) >= 2)
    flat = mask[name].reshape(-1)
    flat[int(flat.nonzero()[0, 0])] = False
    save_mask(mask, path)
    assert torch.equal(load_mask(erase(cfg, tmp_path / "again") / "mask.safetensors")[name], mask[name])


def test_bad_input(tiny_model_dir, tmp_path):
    with pytest.raises(ValueError, match="learning rate must be > 0"):
        TextRemapConfig(learning_rate=0.0)
    with pytest.raises(ValueError, match="(?i)iterations must be"):
        TextRemapConfig(iterations=0)
    cfg = TextRemapConfig(iterations=7, preserve_scale=0.0)
    assert TextRemapConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    assert not cfg.uses_retain_prompts()
    same = EraseConfig(model=str(tiny_model_dir), method="text-remap", device="cpu", cache_dir=str(tmp_path / "c"),
                       concepts=[ConceptSpec(name="c", forget_prompts=[FORGET], anchor_prompts=[FORGET])])
    with pytest.raises(ValueError, match="give an anchor that differs"):
        erase(same, tmp_path / "same")
    assert not (tmp_path / "same").exists() and not (tmp_path / "same.partial").exists()


@pytest.mark.slow
@pytest.mark.skipif(not (default_model_path() / "model_index.json").is_file(), reason="models/shapes-sd not built")
def test_embedded_model_blue_star_to_far_heart_anchor(tmp_path):
    """The app's custom case with the typed far anchor: UCE left 86% of blue stars (bench/README.md); text-remap
    removes them while red stars and blue triangles stay (the judge, 8 seeds each)."""
    from erasure.auto.defaults import default_config
    from erasure.shapes import load_judge

    spec = ConceptSpec(name="a blue star", forget_prompts=["a blue star"], anchor_prompts=["a blue heart"])
    cfg, _ = default_config(concepts=[spec], cache_dir=str(tmp_path / "cache"), method_args={"iterations": 150})
    assert cfg.method == "text-remap"  # the embedded model's defaults (the app's custom form starts from them)
    run = erase(cfg, tmp_path / "run")
    judge = load_judge()
    seeds = list(range(8))

    def count(pipe, prompt, shape, color):
        return sum(p["shape"] == shape and p["color"] == color for p in judge.predict(generate(pipe, prompt, seeds, steps=15)))

    base, pipe = load_pipeline("default", device="cpu"), load_erased_pipeline(run, device="cpu")
    assert count(base, "a blue star", "star", "blue") >= 7
    assert count(pipe, "a blue star", "star", "blue") <= 1
    for prompt, shape, color in (("a red star", "star", "red"), ("a blue triangle", "triangle", "blue")):
        assert count(pipe, prompt, shape, color) >= count(base, prompt, shape, color) - 1, prompt


def test_export_carries_the_encoder_and_lora_is_refused(tiny_model_dir, tmp_path, capsys):
    from erasure.cli import main as cli_main

    run = erase(_cfg(tiny_model_dir, tmp_path, iterations=5), tmp_path / "run")
    assert cli_main(["export", "--run", str(run), "--out", str(tmp_path / "pipe")]) == 0
    exported, erased = load_pipeline(str(tmp_path / "pipe"), device="cpu"), load_erased_pipeline(run, device="cpu")
    assert torch.equal(_states(exported, [FORGET])[0], _states(erased, [FORGET])[0])
    assert not torch.equal(_states(exported, [FORGET])[0], _states(load_pipeline(tiny_model_dir, device="cpu"), [FORGET])[0])
    capsys.readouterr()
    lora = tmp_path / "x.safetensors"
    assert cli_main(["export", "--run", str(run), "--lora", str(lora), "--lora-rank", "2"]) == 2
    err = capsys.readouterr().err
    assert "changed the text encoder" in err and "erasure export" in err and len(err.strip().splitlines()) == 1
    assert not lora.exists()


def test_app_inspect_shows_encoder_layers_and_an_untouched_denoiser(tiny_model_dir, tmp_path):
    from erasure_app.service import AppService

    erase(_cfg(tiny_model_dir, tmp_path, mask_ratio=0.4, iterations=2), tmp_path / "runs" / "r")
    rows = AppService(model=str(tiny_model_dir), runs_dir=str(tmp_path / "runs"), device="cpu").mask_sparsity("r")
    te_rows = [r for r in rows if r["layer"].startswith(TE_PREFIX)]
    assert [r["layer"] for r in rows if not r["layer"].startswith(TE_PREFIX)] == ["denoiser (untouched)"]
    assert any(".layers.0" in r["layer"] for r in te_rows) and any(".layers.1" in r["layer"] for r in te_rows)
    kept = sum(r["kept"] * r["weights"] for r in te_rows) / sum(r["weights"] for r in te_rows)
    assert kept == pytest.approx(0.4, abs=0.01)
    unet = load_pipeline(tiny_model_dir, device="cpu").unet
    assert rows[-1]["weights"] == sum(p.numel() for p in unet.parameters())


def test_tuning_moves_its_weights_and_iterations(tiny_model_dir, tmp_path, pixel_tune_judge):
    """--tune with text-remap: its own grid (preserve, erase, iterations as an integer), the chosen settings are what
    the final run uses."""
    from erasure.auto import tune
    from erasure.auto.config import AutoConfig, TuneConfig
    from erasure.runs import read_run

    judge, pool = pixel_tune_judge
    cfg = _cfg(tiny_model_dir, tmp_path, iterations=3)
    cfg.auto = AutoConfig(retain_pool=str(pool))
    cands = tune.candidates(cfg, 4)
    assert cands == [{}, {"preserve_scale": 3.0}, {"erase_scale": 3.0}, {"iterations": 6}]
    assert isinstance(cands[3]["iterations"], int)
    out = tune.tune_and_erase(cfg, TuneConfig(tune=4, tune_seeds=2, tune_max_drop=5.0), tmp_path / "run",
                              judge=judge)
    info = read_run(out)
    t = info["tuning"]
    assert [r["settings"] for r in t["log"]] == cands
    assert info["config"]["method_args"] == {**cfg.method_args.to_dict(), **t["chosen"]["settings"]}
    assert len((out / "log.jsonl").read_text().splitlines()) == info["config"]["method_args"]["iterations"]


def test_run_json_and_app_summary_say_which_module_the_mask_covers(tiny_model_dir, tmp_path):
    from erasure.runs import read_run
    from erasure_app.tabs.erase import _mask_words

    run = erase(_cfg(tiny_model_dir, tmp_path, mask_ratio=0.5, iterations=1), tmp_path / "run")
    mask = read_run(run)["mask"]
    te, unet = mask["modules"]["text_encoder"], mask["modules"]["denoiser"]
    assert te["ratio"] == pytest.approx(0.5, abs=0.01) and unet["kept"] == 0 and mask["ratio"] < 0.5
    assert te["total"] + unet["total"] == mask["total"]
    assert _mask_words(mask) == f"; mask keeps {te['ratio']:.1%} of the text encoder's weights (the denoiser untouched)"
    assert _mask_words({"ratio": 0.25, "total": 8, "kept": 2}) == "; mask keeps 25.0% of weights"  # a UNet-only mask
    from erasure_app.service import AppService

    (tmp_path / "runs").mkdir()
    run.rename(tmp_path / "runs" / "r")
    (row,) = AppService(model=str(tiny_model_dir), runs_dir=str(tmp_path / "runs"), device="cpu").list_runs()
    assert row["mask kept"] == pytest.approx(te["ratio"], abs=1e-4)
    assert row["steps"] is None and "iterations=1" in row["method settings"]  # its own iterations, not the engine's steps


def test_two_concepts_in_one_run_and_the_cli(tiny_model_dir, tmp_path, capsys):
    from erasure.cli import main as cli_main
    from erasure.runs import read_run

    concepts = [ConceptSpec(name="circle", forget_prompts=[FORGET], anchor_prompts=[ANCHOR], retain_prompts=[KEEP]),
                ConceptSpec(name="cross", forget_prompts=["a green cross"], anchor_prompts=["a green heart"])]
    cfg = EraseConfig(model=str(tiny_model_dir), method="text-remap", concepts=concepts, device="cpu",
                      cache_dir=str(tmp_path / "c"), method_args={"iterations": 100, "learning_rate": 3e-4})
    run = erase(cfg, tmp_path / "two")
    orig, pipe = load_pipeline(tiny_model_dir, device="cpu"), load_erased_pipeline(run, device="cpu")
    for forget, anchor in ((FORGET, ANCHOR), ("a green cross", "a green heart")):
        (f0, a0), ids = _states(orig, [forget, anchor])
        d = int((ids[0] != ids[1]).nonzero()[0, 0])
        (f1,), _ = _states(pipe, [forget])
        assert ((f1[d:] - a0[d:]) ** 2).mean() < 0.25 * ((f0[d:] - a0[d:]) ** 2).mean(), forget
    common = ["erase", "--model", str(tiny_model_dir), "--device", "cpu", "--cache-dir", str(tmp_path / "c"),
              "--method", "text-remap", "--forget-prompt", FORGET, "--anchor-prompt", ANCHOR]
    assert cli_main([*common, "--remap-iterations", "2", "--out", str(tmp_path / "cli")]) == 0
    assert read_run(tmp_path / "cli")["config"]["method_args"]["iterations"] == 2
    capsys.readouterr()
    assert cli_main([*common, "--remap-learning-rate", "0", "--out", str(tmp_path / "bad")]) == 2
    err = capsys.readouterr().err.strip()
    assert "learning rate must be > 0" in err and len(err.splitlines()) == 1 and not (tmp_path / "bad").exists()


def test_bench_units_start_from_the_model_settings_of_their_method(tiny_model_dir, tmp_path):
    """`erasure bench --methods text-remap` on a preset made for SalUn: text-remap's settings come from the model's
    erasure_defaults.json (not its built-in SD ones); what the preset or --override sets wins over the model's."""
    import dataclasses
    import shutil

    from erasure.bench import _with_model_method_args

    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    (model / "erasure_defaults.json").write_text(json.dumps(
        {"config": {"method_args": {"iterations": 5, "learning_rate": 0.002, "alpha": 2.0}}}))
    concept = [ConceptSpec(name="c", forget_prompts=[FORGET], anchor_prompts=[ANCHOR], retain_prompts=[KEEP])]
    remap = EraseConfig(model=str(model), method="text-remap", concepts=concept)
    out = _with_model_method_args(remap, {"alpha": 3.0, "lr": 2.5e-4})
    assert (out.method_args.iterations, out.method_args.learning_rate) == (5, 0.002)
    given = EraseConfig(model=str(model), method="text-remap", concepts=concept, method_args={"iterations": 9})
    out = _with_model_method_args(given, {"method_args": {"iterations": 9}})
    assert (out.method_args.iterations, out.method_args.learning_rate) == (9, 0.002)
    salun = EraseConfig(model=str(model), method="salun", concepts=concept, method_args={"alpha": 3.0})
    assert _with_model_method_args(salun, {"alpha": 3.0}).method_args.alpha == 3.0  # the preset's alpha stays
    plain = dataclasses.replace(salun, model=str(tiny_model_dir))
    assert _with_model_method_args(plain, {}) == plain  # a model without defaults: unchanged
