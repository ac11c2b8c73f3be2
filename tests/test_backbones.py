"""Every model family (SD, SDXL, SD3, FLUX) through one table on tiny random pipelines built in code: family
detection, the mask, a 2-step erase with each applicable method, weights outside the trainable set and the mask
bit-identical, resume after a cancel, reload, generate, export, and an eval generate/score round trip.

Real checkpoints (never in CI): ``test_real_checkpoint`` runs when RUN_WEIGHTS=1 or one of its variables names a
diffusers pipeline folder: SALUN_SD2_DIR (e.g. stabilityai/stable-diffusion-2-1, v-prediction), SALUN_SDXL_DIR
(stable-diffusion-xl-base-1.0), SALUN_SD3_DIR (stable-diffusion-3-medium-diffusers), SALUN_FLUX_DIR (FLUX.1-dev or
-schnell). Each folder is what ``DiffusionPipeline.save_pretrained`` writes (model_index.json plus one subfolder per
component).
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from erasure import (
    ConceptSpec,
    EraseCancelled,
    EraseConfig,
    erase,
    load_erased_pipeline,
    load_mask,
    load_pipeline,
    read_run,
)
from erasure.backbones import BACKBONES, backbone_of, detect_family, get_backbone
from erasure.methods import METHODS

FAMILIES = ("sd", "sdxl", "sd3", "flux")
SIZE = 64
REPO = Path(__file__).resolve().parents[1]
# method -> (method_args, which parameters may change: "all" | "xattn" | "noxattn" | "attn2_kv")
METHOD_CASES = {
    "salun": ({}, "all"),
    "rl": ({}, "all"),
    "esd-x": ({"sample_steps": 2}, "xattn"),
    "esd-u": ({"sample_steps": 2}, "noxattn"),
    "uce": ({}, "attn2_kv"),
    "rece": ({"epochs": 1}, "attn2_kv"),
}
CASES = [(f, m) for f in FAMILIES for m in METHOD_CASES if f in METHODS[m].families]


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    from erasure.backbones.tiny import build_tiny

    root = tmp_path_factory.mktemp("tiny-families")
    dirs = {}
    for fam in (*FAMILIES, "sd3-no-t5"):
        dirs[fam] = root / fam
        build_tiny(fam, dirs[fam])
    return dirs


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def base_params(model_dirs):
    out = {}
    for fam in FAMILIES:
        pipe = load_pipeline(model_dirs[fam], device="cpu")
        out[fam] = {n: p.detach().clone() for n, p in backbone_of(pipe).denoiser(pipe).named_parameters()}
    return out


def _cfg(model, cache, method="salun", method_args=None, **kw) -> EraseConfig:
    base = dict(
        model=str(model), method=method, method_args=dict(method_args or {}),
        concepts=[ConceptSpec(name="circle", forget_prompts=["a red circle"], anchor_prompts=["a red square"],
                              retain_prompts=["a blue star"])],
        steps=2, batch_size=2, forget_images_per_prompt=2, retain_images_per_prompt=2, data_steps=2, resolution=SIZE,
        lr=1e-3, cache_dir=str(cache), device="cpu", mask_ratio=0.3, checkpoint_every=0,
    )
    base.update(kw)
    return EraseConfig(**base)


def _may_change(family: str, name: str, rule: str) -> bool:
    if rule == "all":
        return True
    if rule == "attn2_kv":
        return ".attn2.to_k." in name or ".attn2.to_v." in name
    return get_backbone(family).trainable(name, rule)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().view(torch.int32)


@pytest.fixture(scope="module")
def salun_runs(model_dirs, cache, tmp_path_factory):
    root = tmp_path_factory.mktemp("salun-runs")
    return {fam: erase(_cfg(model_dirs[fam], cache), root / fam) for fam in FAMILIES}


def test_registry_and_detection(model_dirs):
    assert set(BACKBONES) == set(FAMILIES)
    expect = {"sd": "unet", "sdxl": "unet", "sd3": "transformer", "flux": "transformer"}
    for fam in (*FAMILIES, "sd3-no-t5"):
        fam_name = fam.split("-")[0]
        assert detect_family(model_dirs[fam]) == fam_name
        pipe = load_pipeline(model_dirs[fam], device="cpu")
        b = backbone_of(pipe)
        assert b.name == fam_name and b.denoiser_attr == expect[fam_name]
        n_x = sum(b.is_xattn(n) for n, _ in b.denoiser(pipe).named_parameters())
        assert n_x > 0, f"{fam}: no cross-attention parameters"
    assert load_pipeline(model_dirs["sd3-no-t5"], device="cpu").text_encoder_3 is None
    assert load_pipeline(model_dirs["sd3"], device="cpu", drop_t5=True).text_encoder_3 is None


@pytest.mark.parametrize("family", FAMILIES)
def test_mask_covers_only_the_trainable_set(family, model_dirs, cache):
    from erasure.diffusion.train import compute_mask

    b = get_backbone(family)
    mask = compute_mask(_cfg(model_dirs[family], cache, trainable="xattn", mask_ratio=0.5))
    assert all(not bool(m.any()) for n, m in mask.items() if not b.is_xattn(n))
    kept = sum(int(m.sum()) for n, m in mask.items() if b.is_xattn(n))
    total = sum(m.numel() for n, m in mask.items() if b.is_xattn(n))
    assert abs(kept / total - 0.5) < 0.01


@pytest.mark.parametrize("family,method", CASES)
def test_erase_each_applicable_method(family, method, model_dirs, cache, base_params, tmp_path):
    args, rule = METHOD_CASES[method]
    spec = METHODS[method]
    run = erase(_cfg(model_dirs[family], cache, method=method, method_args=args), tmp_path / "run")
    info = read_run(run)
    assert info["family"] == family and info["method"] == method
    weights = load_file(str(run / "weights.safetensors"))
    assert weights and all(_may_change(family, n, rule) for n in weights)
    pipe = load_erased_pipeline(run, device="cpu")
    den = backbone_of(pipe).denoiser(pipe)
    erased = dict(den.named_parameters())
    assert set(weights) <= set(den.state_dict())  # keyed by the denoiser's own state_dict() names
    mask = load_mask(run / "mask.safetensors") if spec.needs_mask else None
    changed = 0
    for n, p in base_params[family].items():
        a, e = p, erased[n].detach()
        if not _may_change(family, n, rule):
            assert torch.equal(_bits(a), _bits(e)), f"{n} changed"
        if mask is not None:
            m = mask[n]
            assert torch.equal(_bits(a[~m]), _bits(e[~m])), f"{n} changed outside the mask"
        changed += int((a != e).sum())
    assert changed > 0
    from erasure.diffusion.pipeline import generate

    (im,) = generate(pipe, "a red circle", 0, steps=2, height=SIZE, width=SIZE)
    assert im.size == (SIZE, SIZE)


@pytest.mark.parametrize("family", FAMILIES)
def test_resume_after_cancel_matches_an_uninterrupted_run(family, model_dirs, cache, salun_runs, tmp_path):
    cfg = _cfg(model_dirs[family], cache)
    cancel = threading.Event()
    with pytest.raises(EraseCancelled):
        erase(cfg, tmp_path / "resumed", cancel=cancel,
              progress=lambda e: cancel.set() if e.stage == "fine-tuning" and e.done == 1 else None)
    out = erase(cfg, tmp_path / "resumed")
    assert read_run(out)["resumed_from_step"] == 1
    a, b = load_file(str(salun_runs[family] / "weights.safetensors")), load_file(str(out / "weights.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("family", FAMILIES)
def test_export_and_eval_round_trip(family, model_dirs, salun_runs, tmp_path):
    from erasure.cli import main
    from erasure_eval.base import score_folder
    from erasure_eval.generate import GenerateConfig, run_generation
    from erasure_eval.object_acc import ObjectAccuracyMetric

    run = salun_runs[family]
    assert main(["export", "--run", str(run), "--out", str(tmp_path / "exported")]) == 0
    exported = load_pipeline(tmp_path / "exported", device="cpu")
    assert detect_family(tmp_path / "exported") == family
    state = backbone_of(exported).denoiser(exported).state_dict()
    weights = load_file(str(run / "weights.safetensors"))
    assert all(torch.equal(state[n], w) for n, w in weights.items())
    out = tmp_path / "gen"
    res = run_generation(GenerateConfig(run=str(run), prompts=str(REPO / "prompts" / "shapes.csv"), out=str(out),
                                        limit=2, steps=1, height=SIZE, width=SIZE, device="cpu"))
    assert res["generated"] == 2
    scored = score_folder(out, ObjectAccuracyMetric(judge="shapes", forget=["shape=circle"]))
    assert scored["summary"]["judged_images"] == 2
    if family in ("sd3", "flux"):  # a UNet sampler is refused before anything is written
        with pytest.raises(ValueError, match="flow-matching scheduler: drop --scheduler"):
            run_generation(GenerateConfig(run=str(run), prompts=str(REPO / "prompts" / "shapes.csv"),
                                          out=str(tmp_path / "gen-lms"), limit=1, steps=1, scheduler="lms"))
        assert not (tmp_path / "gen-lms").exists()
    assert main(["generate", "--run", str(run), "--prompt", "a red circle", "--steps", "1", "--height", str(SIZE),
                 "--width", str(SIZE), "--device", "cpu", "--out", str(tmp_path / "x.png")]) == 0
    assert (tmp_path / "x.png").is_file()


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_method_that_does_not_apply_says_so_before_anything_is_generated(family, model_dirs, tmp_path, capsys):
    from erasure.cli import main

    cache = tmp_path / "cache"
    with pytest.raises(ValueError, match=r"method 'uce' does not apply to .* models \(it applies to sd, sdxl\)"):
        erase(_cfg(model_dirs[family], cache, method="uce"), tmp_path / "run")
    assert not (tmp_path / "run").exists() and not (tmp_path / "run.partial").exists() and not cache.exists()
    rc = main(["erase", "--model", str(model_dirs[family]), "--method", "rece", "--forget-prompt", "a red circle",
               "--anchor-prompt", "a red square", "--cache-dir", str(cache), "--device", "cpu", "--out",
               str(tmp_path / "run")])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip() and not line.startswith("loading")]
    assert rc == 2 and len(err) == 1 and "does not apply" in err[0] and "salun" in err[0]
    assert not (tmp_path / "run").exists() and not cache.exists()


def test_text_encoder_methods_refuse_sdxl(model_dirs, tmp_path):
    """text-remap trains one CLIP encoder: SDXL's pair is refused before anything is written."""
    with pytest.raises(ValueError, match=r"method 'text-remap' does not apply to .* models \(it applies to sd\)"):
        erase(_cfg(model_dirs["sdxl"], tmp_path / "cache", method="text-remap"), tmp_path / "run")
    assert not (tmp_path / "run").exists() and not (tmp_path / "run.partial").exists()


def test_unsupported_pipeline_class_names_the_supported_ones(tmp_path):
    from erasure.diffusion.pipeline import ModelLoadError

    d = tmp_path / "kandinsky"
    d.mkdir()
    (d / "model_index.json").write_text(json.dumps({"_class_name": "KandinskyV22Pipeline"}))
    with pytest.raises(ModelLoadError, match="StableDiffusionXLPipeline, StableDiffusion3Pipeline, FluxPipeline"):
        load_pipeline(d, device="cpu")


def test_v_prediction_target(model_dirs):
    """SD 2.x 768 (``prediction_type: v_prediction``) trains on v = alpha_t noise - sigma_t x0."""
    from diffusers import DDIMScheduler

    sched = DDIMScheduler(prediction_type="v_prediction")
    x0 = torch.randn(2, 4, 8, 8)
    x_t, t, target = get_backbone("sd").noise(sched, x0, torch.Generator().manual_seed(0))
    noise = torch.randn(2, 4, 8, 8, generator=_after_randint(2))
    assert torch.allclose(target, sched.get_velocity(x0, noise, t))


def _after_randint(n: int) -> torch.Generator:
    g = torch.Generator().manual_seed(0)
    torch.randint(0, 1000, (n,), generator=g)
    return g


def test_flow_target_is_noise_minus_x0():
    from diffusers import FlowMatchEulerDiscreteScheduler

    sched = FlowMatchEulerDiscreteScheduler(shift=3.0)
    x0 = torch.randn(3, 4, 8, 8)
    x_t, t, target = get_backbone("sd3").noise(sched, x0, torch.Generator().manual_seed(0))
    sigma = (t / 1000).view(-1, 1, 1, 1)
    noise = target + x0
    assert torch.allclose(x_t, (1 - sigma) * x0 + sigma * noise, atol=1e-5)
    assert bool(((t > 0) & (t <= 1000)).all())


REAL = ("SALUN_SD2_DIR", "SALUN_SDXL_DIR", "SALUN_SD3_DIR", "SALUN_FLUX_DIR")


@pytest.mark.parametrize("var", [pytest.param(v, marks=pytest.mark.weights(v)) for v in REAL])
def test_real_checkpoint(var, tmp_path):
    """A real checkpoint of each family loads, generates, and takes a 1-step SalUn erase on its xattn weights."""
    folder = os.environ.get(var)
    if not folder:
        pytest.skip(f"{var} is not set")
    pipe = load_pipeline(folder, device="auto")
    from erasure.diffusion.pipeline import generate

    (im,) = generate(pipe, "a photo of a church", 0, steps=2, height=256, width=256)
    assert im.size == (256, 256)
    del pipe
    cfg = _cfg(folder, tmp_path / "cache", trainable="xattn", steps=1, batch_size=1, forget_images_per_prompt=1,
               retain_images_per_prompt=1, resolution=256, mask_batches=1, device="auto")
    run = erase(cfg, tmp_path / "run")
    assert read_run(run)["family"] == detect_family(folder)


def test_sd3_without_t5(model_dirs, cache, tmp_path):
    """``drop_t5`` erases and reloads SD3 on CLIP alone; on another family it is refused before anything runs."""
    run = erase(_cfg(model_dirs["sd3"], cache, method="esd-x", method_args={"sample_steps": 2}, drop_t5=True),
                tmp_path / "run")
    assert load_erased_pipeline(run, device="cpu").text_encoder_3 is None
    with pytest.raises(ValueError, match="SD3 models only"):
        erase(_cfg(model_dirs["sdxl"], cache, drop_t5=True), tmp_path / "x")
    assert not (tmp_path / "x").exists() and not (tmp_path / "x.partial").exists()


@pytest.mark.parametrize("family", ["sdxl", "sd3"])
def test_app_service_generates_with_each_family(family, model_dirs, salun_runs, tmp_path):
    """The app's model loading: the original model and a saved run of another family generate through the service."""
    import shutil

    from erasure_app.service import AppService

    runs = tmp_path / "runs"
    runs.mkdir()
    shutil.copytree(salun_runs[family], runs / "erased")
    service = AppService(model=str(model_dirs[family]), runs_dir=runs, device="cpu", judge="shapes")
    for key in ("original", "erased"):
        (im,) = service.generate(key, "a red circle", "0", steps=1)
        assert im.size == (SIZE, SIZE)


def test_flux_packing_and_schnell_without_guidance_embedding():
    from erasure.backbones.flux import pack, unpack
    from erasure.backbones.tiny import build_tiny_flux

    x = torch.randn(2, 4, 8, 6)
    assert pack(x).shape == (2, 12, 16) and torch.equal(unpack(pack(x), 8, 6), x)
    pipe = build_tiny_flux(guidance_embeds=False)  # FLUX.1-schnell style
    b = backbone_of(pipe)
    cond = b.encode(pipe, ["a red circle"])
    x_t, t, target = b.noise(pipe.scheduler, torch.randn(1, 4, 8, 8), torch.Generator().manual_seed(0))
    assert b.predict(pipe.transformer, x_t, t, cond).shape == target.shape
