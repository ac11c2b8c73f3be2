"""LoRA extraction (erasure.lora): SVD factors, peft and kohya files that diffusers loads, `erasure export --lora`."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch

from erasure import ConceptSpec, EraseConfig, erase, load_erased_pipeline
from erasure.cli import main as cli_main
from erasure.lora import extract_lora, lora_from_run, low_rank, save_lora

needs_peft = pytest.mark.skipif(importlib.util.find_spec("peft") is None,
                                reason="diffusers' load_lora_weights needs peft (pip install 'salun-erasure[lora]')")


def _images(pipe) -> np.ndarray:
    from diffusers import DDIMScheduler

    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe(["a red circle", "a blue star"], num_inference_steps=2, generator=torch.Generator().manual_seed(0),
                output_type="np", guidance_scale=5.0).images


@pytest.fixture(scope="module")
def runs(tiny_model_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lora")
    out = {}
    for trainable in ("xattn",):  # attn2: to_q/k/v weights, to_out weight and bias (full runs add norms: see above)
        cfg = EraseConfig(
            model=str(tiny_model_dir), concepts=[ConceptSpec(name="c", forget_prompts=["a red circle"],
                                                             anchor_prompts=["a red square"], retain_prompts=["a star"])],
            steps=3, batch_size=2, forget_images_per_prompt=2, retain_images_per_prompt=1, data_steps=2, lr=3e-3,
            cache_dir=str(tmp / "cache"), device="cpu", trainable=trainable, mask_ratio=0.5,
        )
        out[trainable] = erase(cfg, tmp / f"run-{trainable}")
    return out


def test_low_rank_full_rank_reproduces_and_energy_picks_rank():
    g = torch.Generator().manual_seed(0)
    d = torch.randn(24, 9, generator=g)
    up, down, kept = low_rank(d)
    assert up.shape == (24, 9) and down.shape == (9, 9) and kept == pytest.approx(1.0)
    torch.testing.assert_close(up @ down, d, rtol=0, atol=1e-5)
    lr = torch.randn(30, 3, generator=g) @ torch.randn(3, 40, generator=g)  # rank 3 exactly
    up, down, kept = low_rank(lr, energy=0.999999)
    assert down.shape[0] == 3 and kept > 0.999999
    torch.testing.assert_close(up @ down, lr, rtol=0, atol=1e-4)
    up, down, kept = low_rank(lr, rank=1)
    assert down.shape[0] == 1 and 0 < kept < 1
    # Eckart-Young: the rank-1 error is the discarded singular energy
    s = torch.linalg.svdvals(lr.double())
    assert float((lr - up @ down).pow(2).sum()) == pytest.approx(float(s[1:].pow(2).sum()), rel=1e-4)


def test_conv_and_linear_deltas_and_rank_clamp_warning():
    m = torch.nn.Sequential(torch.nn.Conv2d(3, 5, 3), torch.nn.Linear(4, 6), torch.nn.LayerNorm(6))
    base = {k: v.clone() for k, v in m.state_dict().items()}
    g = torch.Generator().manual_seed(1)
    erased = {k: v + torch.randn(v.shape, generator=g) for k, v in base.items()}
    with pytest.warns(UserWarning, match=r"clamped to their smallest dimension \(4, 5; e\.g\. 0: 5\)"):
        ext = extract_lora(m, base, erased, rank=64)
    assert ext.clamped == {"0": 5, "1": 4}
    for name in ("0", "1"):
        f = ext.factors[name]
        torch.testing.assert_close(f.delta(), erased[f"{name}.weight"] - base[f"{name}.weight"], rtol=0, atol=1e-5)
    # biases (without bias=True) and the LayerNorm cannot be carried, and are reported
    assert set(ext.leftover) == {"0.bias", "1.bias", "2.weight", "2.bias"}
    ext_b = extract_lora(m, base, erased, rank=2, bias=True)
    assert set(ext_b.leftover) == {"2.weight", "2.bias"} and ext_b.factors["0"].rank == 2
    torch.testing.assert_close(ext_b.factors["1"].bias, erased["1.bias"] - base["1.bias"])
    with pytest.raises(ValueError, match="rank must be at least 1"):
        extract_lora(m, base, erased, rank=0)
    with pytest.raises(ValueError, match="energy must be in"):
        extract_lora(m, base, erased, energy=1.5)


@needs_peft
def test_peft_lora_reproduces_the_erased_run(runs, tiny_model_dir, tmp_path):
    """xattn run (to_q/k/v weights, to_out weight+bias): full-rank peft LoRA with bias == the erased pipeline."""
    from erasure.diffusion.pipeline import load_pipeline

    run = runs["xattn"]
    ref = _images(load_erased_pipeline(run, device="cpu"))
    base = load_pipeline(str(tiny_model_dir), device="cpu")
    orig = _images(base)
    assert np.abs(orig - ref).max() > 1e-3, "the erasure must change the images for this test to mean anything"
    ext = lora_from_run(run, rank=10_000, bias=True, pipe=base)  # full rank (clamped)
    assert not ext.leftover
    path = save_lora(ext, tmp_path / "peft.safetensors", "peft")
    base.load_lora_weights(str(path))
    np.testing.assert_allclose(_images(base), ref, atol=2e-4)
    # a low rank changes the result, but less than removing the LoRA
    base.unload_lora_weights()
    low = lora_from_run(run, rank=1, bias=True, pipe=base)
    base.load_lora_weights(str(save_lora(low, tmp_path / "r1.safetensors", "peft")))
    assert np.abs(_images(base) - ref).max() > 1e-5


@needs_peft
def test_kohya_lora_round_trip_and_fuse(runs, tiny_model_dir, tmp_path):
    """Kohya keys load in diffusers; with bias changes dropped the result equals the run without its bias changes."""
    from erasure.diffusion.pipeline import load_pipeline
    from erasure.runs import load_run_weights

    run = runs["xattn"]
    base = load_pipeline(str(tiny_model_dir), device="cpu")
    weights = {k: v for k, v in load_run_weights(run).items() if k.endswith("weight")}
    ref_pipe = load_pipeline(str(tiny_model_dir), device="cpu")
    sd = ref_pipe.unet.state_dict()
    with torch.no_grad():
        for k, v in weights.items():
            sd[k].copy_(v)
    ref = _images(ref_pipe)
    ext = lora_from_run(run, rank=10_000, pipe=base)
    assert sorted(ext.leftover) == sorted(k for k in load_run_weights(run) if k.endswith("bias"))
    path = save_lora(ext, tmp_path / "kohya.safetensors", "kohya")
    from safetensors import safe_open

    with safe_open(str(path), "pt") as fh:
        keys = list(fh.keys())
        assert all(k.startswith("lora_unet_") and k.endswith((".lora_down.weight", ".lora_up.weight", ".alpha"))
                   for k in keys)
        assert fh.metadata()["lora_format"] == "kohya"
    base.load_lora_weights(str(path))
    np.testing.assert_allclose(_images(base), ref, atol=2e-4)
    base.fuse_lora()  # a weights-only LoRA fuses into the base weights
    base.unload_lora_weights()
    np.testing.assert_allclose(_images(base), ref, atol=2e-4)
    with pytest.raises(ValueError, match="kohya LoRA files carry no bias"):
        save_lora(lora_from_run(run, rank=2, bias=True, pipe=base), tmp_path / "k2.safetensors", "kohya")


def test_cli_export_lora_only_and_bad_input(runs, tmp_path, capsys):
    run = runs["xattn"]
    out = tmp_path / "e.safetensors"
    assert cli_main(["export", "--run", str(run), "--lora", str(out), "--lora-rank", "2"]) == 0
    assert out.is_file() and not any(p.name != out.name for p in tmp_path.iterdir())
    assert cli_main(["export", "--run", str(run), "--lora", str(out), "--lora-rank", "2"]) == 2  # exists
    assert "--overwrite" in capsys.readouterr().err
    assert cli_main(["export", "--run", str(run), "--lora", str(out), "--lora-energy", "0.9", "--lora-format",
                     "kohya", "--overwrite"]) == 0
    bad = [
        (["--lora", str(tmp_path / "x.safetensors")], "--lora-rank R"),
        (["--lora", str(tmp_path / "x.bin"), "--lora-rank", "2"], ".safetensors"),
        (["--lora", str(tmp_path / "x.safetensors"), "--lora-rank", "0"], "at least 1"),
        (["--lora", str(tmp_path / "x.safetensors"), "--lora-energy", "2"], "(0, 1]"),
        (["--lora", str(tmp_path / "x.safetensors"), "--lora-rank", "2", "--lora-format", "kohya", "--lora-bias"],
         "peft"),
        (["--lora-rank", "2"], "--out DIR"),
        (["--lora", str(tmp_path / "no" / "x.safetensors"), "--lora-rank", "2"], "does not exist"),
    ]
    for extra, msg in bad:
        assert cli_main(["export", "--run", str(run), *extra]) == 2, extra
        err = capsys.readouterr().err
        assert msg in err and len(err.strip().splitlines()) == 1, (extra, err)
    assert not (tmp_path / "x.safetensors").exists()


def test_export_help_documents_lora(capsys):
    with pytest.raises(SystemExit):
        cli_main(["export", "--help"])
    text = capsys.readouterr().out
    for flag in ("--lora ", "--lora-rank", "--lora-format", "--lora-energy", "--single-file"):
        assert flag in text


@needs_peft
@pytest.mark.parametrize("family", ["sdxl", "sd3", "flux"])
def test_lora_on_other_families(family, tmp_path):
    """Full-rank peft LoRA (with biases) of a tiny xattn run reproduces the erased denoiser's output on each family."""
    from erasure.backbones import backbone_of
    from erasure.backbones.tiny import build_tiny
    from erasure.diffusion.pipeline import load_pipeline

    build_tiny(family, tmp_path / "m")
    cfg = EraseConfig(
        model=str(tmp_path / "m"), concepts=[ConceptSpec(name="c", forget_prompts=["a red circle"],
                                                         anchor_prompts=["a red square"], retain_prompts=["a star"])],
        steps=2, batch_size=2, forget_images_per_prompt=2, retain_images_per_prompt=1, data_steps=2, lr=3e-3,
        resolution=64, cache_dir=str(tmp_path / "cache"), device="cpu", trainable="xattn", mask_ratio=0.5,
        checkpoint_every=0,
    )
    run = erase(cfg, tmp_path / "run")
    erased = load_erased_pipeline(run, device="cpu")
    base = load_pipeline(str(tmp_path / "m"), device="cpu")
    bb = backbone_of(base)
    den_e, den_b = bb.denoiser(erased), bb.denoiser(base)
    ext = lora_from_run(run, rank=10_000, bias=True, pipe=base)
    assert ext.factors and not ext.leftover
    prefix = "unet" if family == "sdxl" else "transformer"
    base.load_lora_weights(str(save_lora(ext, tmp_path / "l.safetensors", "peft", prefix=prefix)))
    # the LoRA-wrapped denoiser computes what the erased one does
    g = torch.Generator().manual_seed(0)
    n = den_b.config.in_channels
    if family == "flux":
        x = torch.randn(1, 16, n, generator=g)
        kw = dict(hidden_states=x, timestep=torch.tensor([0.5]), guidance=torch.tensor([3.5]),
                  pooled_projections=torch.randn(1, den_b.config.pooled_projection_dim, generator=g),
                  encoder_hidden_states=torch.randn(1, 4, den_b.config.joint_attention_dim, generator=g),
                  txt_ids=torch.zeros(4, 3), img_ids=torch.zeros(16, 3))
    elif family == "sd3":
        kw = dict(hidden_states=torch.randn(1, n, 8, 8, generator=g), timestep=torch.tensor([500.0]),
                  pooled_projections=torch.randn(1, den_b.config.pooled_projection_dim, generator=g),
                  encoder_hidden_states=torch.randn(1, 4, den_b.config.joint_attention_dim, generator=g))
    else:
        kw = dict(sample=torch.randn(1, n, 8, 8, generator=g), timestep=torch.tensor([500]),
                  encoder_hidden_states=torch.randn(1, 4, den_b.config.cross_attention_dim, generator=g),
                  added_cond_kwargs={"text_embeds": torch.randn(1, 16, generator=g),
                                     "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]])})
    with torch.no_grad():
        want, got = den_e(**kw)[0], den_b(**kw)[0]
        base.unload_lora_weights()
        orig = den_b(**kw)[0]
    assert (want - orig).abs().max() > 1e-6, "the erasure must change the output for this test to mean anything"
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
