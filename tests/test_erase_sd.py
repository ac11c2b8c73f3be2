"""End-to-end erasure on a tiny random Stable Diffusion pipeline: outputs, reload, resume and bad input."""

from __future__ import annotations

import json
import logging
import threading

import numpy as np
import pytest
import torch

from erasure import (
    ConceptSpec,
    EraseCancelled,
    EraseConfig,
    NonFiniteLossError,
    RunDirError,
    RunExistsError,
    erase,
    generate,
    load_erased_pipeline,
    load_mask,
    load_pipeline,
    read_run,
)
from erasure.cli import main as cli_main
from erasure.diffusion.pipeline import ModelLoadError
from erasure.methods import METHODS, MethodConfig, MethodSpec, register_method

FORGET = "a red circle"


def _cfg(model, tmp_path, **kw):
    base = dict(
        model=str(model),
        concepts=[ConceptSpec(name="circle", forget_prompts=[FORGET], anchor_prompts=["a red square"],
                              retain_prompts=["a blue star"])],
        steps=2, batch_size=2, forget_images_per_prompt=2, retain_images_per_prompt=2, data_steps=2,
        lr=1e-3, cache_dir=str(tmp_path / "cache"), device="cpu",
    )
    base.update(kw)
    return EraseConfig(**base)


def _img(pipe, prompt=FORGET, seed=0):
    return np.asarray(generate(pipe, prompt, seed, steps=2)[0], dtype=np.float64)


@pytest.fixture(scope="module")
def salun_run(tiny_model_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("salun")
    cfg = _cfg(tiny_model_dir, tmp, optimizer="adamw", weight_decay=0.1, mask_ratio=0.3)
    return erase(cfg, tmp / "run"), cfg


def test_run_directory_contract(salun_run, tiny_model_dir):
    run, cfg = salun_run
    assert {p.name for p in run.iterdir()} == {"run.json", "mask.safetensors", "weights.safetensors", "log.jsonl"}
    assert not run.with_name("run.partial").exists()
    info = read_run(run)
    assert info["method"] == "salun" and info["config"]["seed"] == 0 and info["base_model"] == str(tiny_model_dir)
    assert info["environment"]["versions"]["torch"]
    assert EraseConfig.from_dict(info["config"]) == cfg
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2] and all(np.isfinite(r["loss"]) for r in log)
    mask = load_mask(run / "mask.safetensors")
    base = load_pipeline(tiny_model_dir, device="cpu")
    names = dict(base.unet.named_parameters())
    assert set(mask) == set(names) and all(mask[n].shape == p.shape and mask[n].dtype == torch.bool for n, p in names.items())
    total = sum(m.numel() for m in mask.values())
    assert sum(int(m.sum()) for m in mask.values()) == round(0.3 * total)


def test_erase_changes_forget_output_and_reload_reproduces(salun_run, tiny_model_dir):
    run, _ = salun_run
    base = load_pipeline(tiny_model_dir, device="cpu")
    erased = load_erased_pipeline(run, device="cpu")
    b, e = _img(base), _img(erased)
    assert np.abs(b - e).mean() > 0.05, "the erased model's forget-prompt image did not change"
    again = load_erased_pipeline(run, device="cpu")
    assert np.array_equal(_img(again), e), "reloading the run does not reproduce the same image"


def test_weights_outside_mask_bit_identical_after_adamw(salun_run, tiny_model_dir):
    run, _ = salun_run
    base = dict(load_pipeline(tiny_model_dir, device="cpu").unet.named_parameters())
    erased = dict(load_erased_pipeline(run, device="cpu").unet.named_parameters())
    mask = load_mask(run / "mask.safetensors")
    moved = 0
    for n, p in base.items():
        m = mask[n]
        a, b = p.detach()[~m], erased[n].detach()[~m]
        assert torch.equal(a.view(torch.int32), b.view(torch.int32)), f"{n} changed outside the mask"
        moved += int((p.detach()[m] != erased[n].detach()[m]).sum())
    assert moved > 0


def test_distill_retain_loss_starts_at_zero_and_pulls_toward_the_original(tiny_model_dir, tmp_path):
    """retain_loss="distill": the target is the frozen original UNet, so the term is exactly 0 before the first
    update and positive once the weights moved; the paper's denoising term is not 0 at the start."""
    logs = {}
    for kind in ("distill", "denoise"):
        run = erase(_cfg(tiny_model_dir, tmp_path / kind, steps=3, method_args={"retain_loss": kind}),
                    tmp_path / kind / "run")
        logs[kind] = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
        assert read_run(run)["config"]["method_args"]["retain_loss"] == kind
    assert logs["distill"][0]["retain_loss"] == 0.0
    assert logs["distill"][-1]["retain_loss"] > 0.0
    assert logs["denoise"][0]["retain_loss"] > 0.0


def test_resume_after_interruption_matches_uninterrupted(tiny_model_dir, tmp_path):
    cfg = _cfg(tiny_model_dir, tmp_path, steps=4, checkpoint_every=2)
    full = erase(cfg, tmp_path / "full")
    cancel = threading.Event()

    def progress(event):
        if event.stage == "fine-tuning" and event.done == 2:
            cancel.set()

    with pytest.raises(EraseCancelled):
        erase(cfg, tmp_path / "resumed", progress=progress, cancel=cancel)
    assert not (tmp_path / "resumed").exists() and (tmp_path / "resumed.partial" / "latest_checkpoint").is_file()
    out = erase(cfg, tmp_path / "resumed")
    assert read_run(out)["resumed_from_step"] == 2
    from safetensors.torch import load_file

    a, b = load_file(str(full / "weights.safetensors")), load_file(str(out / "weights.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert len((out / "log.jsonl").read_text().splitlines()) == 4
    # a different config may not silently resume someone else's checkpoint
    erase_partial = tmp_path / "other"
    cancel2 = threading.Event()
    with pytest.raises(EraseCancelled):
        erase(cfg, erase_partial, cancel=cancel2, progress=lambda e: cancel2.set() if e.stage == "fine-tuning" else None)
    with pytest.raises(RunExistsError, match="other settings.*lr"):
        erase(_cfg(tiny_model_dir, tmp_path, steps=4, checkpoint_every=2, lr=5e-4), erase_partial)


def test_cancel_during_data_generation_stops_before_training(tiny_model_dir, tmp_path):
    cancel = threading.Event()
    seen = []

    def progress(event):
        seen.append(event.stage)
        if event.stage == "generating Df/Dr":
            cancel.set()

    with pytest.raises(EraseCancelled, match="while generating"):
        erase(_cfg(tiny_model_dir, tmp_path, forget_images_per_prompt=4), tmp_path / "run", progress=progress, cancel=cancel)
    assert "fine-tuning" not in seen and "mask" not in seen and not (tmp_path / "run").exists()


def test_nonfinite_loss_stops_with_clear_error(tiny_model_dir, tmp_path):
    def nan_loss(ctx, b):
        out = ctx.unet(b.forget_x, b.forget_t, encoder_hidden_states=b.forget_cond).sample.mean()
        return {"loss": out * float("nan")}

    register_method(MethodSpec(name="nan-test", config_cls=MethodConfig, loss=nan_loss, description="test"))
    try:
        with pytest.raises(NonFiniteLossError, match="nan at step 0"):
            erase(_cfg(tiny_model_dir, tmp_path, method="nan-test"), tmp_path / "run")
        assert not (tmp_path / "run").exists()
    finally:
        METHODS.pop("nan-test")


def test_existing_run_refused_unless_overwrite(salun_run, tiny_model_dir, tmp_path):
    run, cfg = salun_run
    with pytest.raises(RunExistsError, match="--overwrite"):
        erase(cfg, run)
    out = erase(_cfg(tiny_model_dir, tmp_path, method="rl"), tmp_path / "r")
    out2 = erase(_cfg(tiny_model_dir, tmp_path, method="esd-x", method_args={"sample_steps": 2}), out, overwrite=True)
    assert read_run(out2)["method"] == "esd-x"


# ---------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(concepts=[dict(name="c", forget_prompts=["  "], anchor_prompts=["x"])]), "empty"),
        (dict(concepts=[dict(name="c", forget_prompts=[], anchor_prompts=["x"])]), "empty"),
        (dict(concepts=[dict(name="c", forget_prompts=["a", "b", "c"], anchor_prompts=["x", "y"])]), "anchor"),
        (dict(mask_ratio=0.0), "mask ratio"),
        (dict(mask_ratio=1.5), "mask ratio"),
        (dict(method="nope"), "unknown method"),
        (dict(steps=0), "steps"),
        (dict(lr=-1.0), "learning rate"),
        (dict(method_args={"retain_loss": "l2"}), "retain loss"),
        (dict(method_args={"nope": 1}), "unknown field"),
        (dict(lr="1e-4"), "learning rate must be a finite number"),
        (dict(concepts="abc"), "concepts"),
    ],
)
def test_config_rejects_bad_values(kw, match, tmp_path):
    data = _cfg("x", tmp_path).to_dict()
    data.update(kw)
    with pytest.raises(ValueError, match=match):
        EraseConfig.from_dict(data)


def test_long_prompt_warns_with_cut_count(tiny_model_dir, caplog):
    pipe = load_pipeline(tiny_model_dir, device="cpu")
    long = " ".join(["red"] * 100)
    with caplog.at_level(logging.WARNING):
        generate(pipe, long, 0, steps=1)
    assert any("over the 77-token limit" in r.message and "last 25 tokens are cut" in r.message for r in caplog.records)


def test_model_errors(tmp_path, monkeypatch):
    with pytest.raises(ModelLoadError, match="not found"):
        load_pipeline(tmp_path / "nope", device="cpu")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="model_index.json"):
        load_pipeline(tmp_path / "empty", device="cpu")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match="offline"):
        load_pipeline("someone/not-cached-model", device="cpu")


SDXL_INDEX = {  # the model_index.json of stabilityai/stable-diffusion-xl-base-1.0 (no weights needed)
    "_class_name": "StableDiffusionXLPipeline", "_diffusers_version": "0.19.0.dev0",
    "force_zeros_for_empty_prompt": True, "add_watermarker": None,
    "scheduler": ["diffusers", "EulerDiscreteScheduler"], "text_encoder": ["transformers", "CLIPTextModel"],
    "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"], "tokenizer": ["transformers", "CLIPTokenizer"],
    "tokenizer_2": ["transformers", "CLIPTokenizer"], "unet": ["diffusers", "UNet2DConditionModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}


def test_unsupported_pipeline_folder_names_the_supported_pipelines(tmp_path, capsys):
    cascade = tmp_path / "cascade"
    cascade.mkdir()
    (cascade / "model_index.json").write_text(json.dumps(dict(SDXL_INDEX, _class_name="StableCascadeCombinedPipeline")))
    with pytest.raises(ModelLoadError, match=r"cascade is a StableCascadeCombinedPipeline folder; supported: "
                                             r"StableDiffusionPipeline \(SD v1/v2\), StableDiffusionXLPipeline"):
        load_pipeline(cascade, device="cpu")
    sdxl = tmp_path / "sdxl"  # a supported class whose folder lacks its components names the first missing one
    sdxl.mkdir()
    (sdxl / "model_index.json").write_text(json.dumps(SDXL_INDEX))
    with pytest.raises(ModelLoadError, match="has no scheduler/ folder"):
        load_pipeline(sdxl, device="cpu")
    (sdxl / "model_index.json").write_text("{truncated")
    with pytest.raises(ModelLoadError, match="model_index.json is not readable JSON"):
        load_pipeline(sdxl, device="cpu")
    # the CLI: exit code 2, the message on one stderr line, nothing written
    for argv in (["erase", "--forget-prompt", FORGET, "--anchor-prompt", "a red square", "--alpha", "0",
                  "--out", str(tmp_path / "run")],
                 ["generate", "--prompt", FORGET, "--out", str(tmp_path / "x.png")]):
        capsys.readouterr()
        rc = cli_main([*argv, "--model", str(cascade), "--device", "cpu"])
        err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        # `erase` draws its "loading" bar before the engine resolves the model (train._prepare); apart from
        # that bar the error is one line
        err = [line for line in err if not line.startswith("loading:")]
        assert rc == 2
        assert len(err) == 1 and err[0].startswith(f"erasure {argv[0]}: error: ") and "StableCascadeCombinedPipeline" in err[0]
        assert "StableDiffusion3Pipeline, FluxPipeline" in err[0]
    assert not (tmp_path / "run").exists()
    assert not (tmp_path / "x.png").exists()


def test_failed_erase_leaves_no_run(tmp_path):
    with pytest.raises(ModelLoadError):
        erase(_cfg(tmp_path / "missing-model", tmp_path), tmp_path / "run")
    assert not (tmp_path / "run").exists() and not (tmp_path / "run.partial").exists()
    (tmp_path / "bad-mask.safetensors").write_bytes(b"not a mask")
    from erasure.io import CorruptFileError

    with pytest.raises(CorruptFileError):
        erase(_cfg(tmp_path / "missing-model", tmp_path, mask_path=str(tmp_path / "bad-mask.safetensors")),
              tmp_path / "run2")
    assert not (tmp_path / "run2.partial").exists()
    with pytest.raises(RunExistsError, match="may not end"):
        erase(_cfg(tmp_path / "missing-model", tmp_path), tmp_path / "x.partial")


def test_damaged_run_weights_are_refused(salun_run, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    run, _ = salun_run
    for kind in ("nan", "int"):
        bad = tmp_path / kind
        shutil.copytree(run, bad)
        w = load_file(str(bad / "weights.safetensors"))
        k = next(iter(w))
        w[k] = torch.full_like(w[k], float("nan")) if kind == "nan" else w[k].to(torch.int32)
        save_file(w, str(bad / "weights.safetensors"))
        with pytest.raises(RunDirError, match="damaged"):
            load_erased_pipeline(bad, device="cpu")


def test_cli_config_files_fail_with_their_name(tmp_path, capsys):
    (tmp_path / "c.json").write_bytes(b"\xff\xfe[")
    (tmp_path / "d.json").write_text('[{"name": "c", "forget_prompts": ["a"], "anchor_prompts": ["b"], "forget_images": 5}]')
    (tmp_path / "e.json").write_text('{"lr": "1e-4"}')
    (tmp_path / "f.json").write_text('[1, 2]')
    for flag, f, msg in (("--concept-file", "c.json", "not UTF-8"), ("--concept-file", "d.json", "forget images"),
                         ("--config", "e.json", "learning rate must be a finite number"),
                         ("--config", "f.json", "expected a JSON object")):
        args = ["erase", "--out", str(tmp_path / "run"), flag, str(tmp_path / f)]
        if flag == "--config":
            args += ["--forget-prompt", "a", "--anchor-prompt", "b", "--method", "salun", "--alpha", "0"]
        assert cli_main(args) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert msg in err[-1] and (f in err[-1] or flag == "--config" and "must" in err[-1]), err
    assert not list(tmp_path.glob("run*"))


def test_cli_export_validates_outputs_first(salun_run, tmp_path, capsys):
    run, _ = salun_run
    user = tmp_path / "user"
    user.mkdir()
    (user / "notes.txt").write_text("mine")
    rc = cli_main(["export", "--run", str(run), "--out", str(user), "--overwrite"])
    assert rc == 2 and "did not write" in capsys.readouterr().err and (user / "notes.txt").read_text() == "mine"
    rc = cli_main(["export", "--run", str(run), "--out", str(tmp_path / "exp"), "--single-file", str(tmp_path / "x.ckpt")])
    assert rc == 2 and ".safetensors" in capsys.readouterr().err and not (tmp_path / "exp").exists()
    (tmp_path / "afile").write_text("x")
    assert cli_main(["export", "--run", str(run), "--out", str(tmp_path / "afile"), "--overwrite"]) == 2
    assert (tmp_path / "afile").read_text() == "x"
    assert cli_main(["export", "--run", str(run), "--out", str(tmp_path / "exp")]) == 0
    assert cli_main(["export", "--run", str(run), "--out", str(tmp_path / "exp"), "--overwrite"]) == 0  # its own output


def test_bad_run_directories(salun_run, tiny_model_dir, tmp_path):
    import shutil

    run, _ = salun_run
    with pytest.raises(RunDirError, match="not found"):
        load_erased_pipeline(tmp_path / "none")
    broken = tmp_path / "broken"
    shutil.copytree(run, broken)
    (broken / "weights.safetensors").unlink()
    with pytest.raises(RunDirError, match="incomplete.*weights.safetensors"):
        load_erased_pipeline(broken)
    corrupt = tmp_path / "corrupt"
    shutil.copytree(run, corrupt)
    data = (corrupt / "weights.safetensors").read_bytes()
    (corrupt / "weights.safetensors").write_bytes(data[:100])
    with pytest.raises(RunDirError, match="not a readable safetensors"):
        load_erased_pipeline(corrupt, device="cpu")
    other = tmp_path / "other-model"
    shutil.copytree(run, other)
    from safetensors.torch import load_file, save_file

    w = load_file(str(other / "weights.safetensors"))
    k = next(iter(w))
    w[k] = torch.zeros(3, 3, 3, 3, 3)
    save_file(w, str(other / "weights.safetensors"))
    with pytest.raises(RunDirError, match="another model"):
        load_erased_pipeline(other, device="cpu")


# ---------------------------------------------------------------- CLI
def test_cli_erase_mask_generate(tiny_model_dir, tmp_path, capsys):
    common = ["--model", str(tiny_model_dir), "--cache-dir", str(tmp_path / "cache"), "--device", "cpu",
              "--data-steps", "2", "--forget-images-per-prompt", "2", "--batch-size", "2"]
    rc = cli_main(["erase", *common, "--forget-prompt", FORGET, "--anchor-prompt", "a red square",
                   "--retain-prompt", "a blue star", "--retain-images-per-prompt", "1", "--method", "salun", "--mask-ratio", "0.2", "--steps", "2",
                   "--seed", "3", "--optimizer", "sgd", "--weight-decay", "0.01", "--out", str(tmp_path / "run")])
    assert rc == 0 and read_run(tmp_path / "run")["config"]["mask_ratio"] == 0.2
    rc = cli_main(["mask", *common, "--forget-prompt", FORGET, "--mask-ratio", "0.1", "--out", str(tmp_path / "m.safetensors")])
    assert rc == 0 and load_mask(tmp_path / "m.safetensors")
    rc = cli_main(["generate", "--run", str(tmp_path / "run"), "--prompt", FORGET, "--seed", "1", "--steps", "2",
                   "--out", str(tmp_path / "x.png")])
    assert rc == 0 and (tmp_path / "x.png").stat().st_size > 0
    # bad input: one-line error, exit code 2, nothing written
    rc = cli_main(["erase", *common, "--forget-prompt", FORGET, "--anchor-prompt", "x", "--retain-prompt", "y",
                   "--mask-ratio", "2", "--out", str(tmp_path / "bad")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err[-1].startswith("erasure erase: error: --mask-ratio: mask ratio") and not (tmp_path / "bad").exists()
    rc = cli_main(["erase", *common, "--forget-prompt", FORGET, "--anchor-prompt", "x", "--retain-prompt", "y",
                   "--steps", "1", "--out", str(tmp_path / "run")])
    assert rc == 2 and "--overwrite" in capsys.readouterr().err


def test_dfdr_cache_resume_regenerates_whole_batch_bit_identically(tiny_model_dir, tmp_path):
    """A kill mid-batch leaves some images of a batch: the resumed run regenerates that batch whole (pixels depend on
    the batch), so every image equals the uninterrupted run's; temp files of dead writers are removed."""
    import numpy as np
    from PIL import Image

    from erasure.diffusion.data import generate_cached

    pipe = load_pipeline(tiny_model_dir, device="cpu")
    prompts, seeds = [FORGET, "a red square", "a blue star"] * 2, list(range(6))

    def run(cache):
        return generate_cached(pipe, "m", prompts, seeds, 2, 7.5, 64, cache, batch_size=4)

    ref = run(tmp_path / "a")
    part = run(tmp_path / "b")
    for p in part[1:3]:  # killed after writing images 0 and 3 of the first batch
        p.unlink()
    from erasure.io import temp_prefix

    stale = part[0].parent / f"{temp_prefix(part[1].name, 2**22 + 99)}x1y2.tmp.png"
    stale.write_bytes(b"half")
    again = run(tmp_path / "b")
    assert [p.name for p in again] == [p.name for p in ref]
    for a, b in zip(ref, again):
        assert np.array_equal(np.asarray(Image.open(a)), np.asarray(Image.open(b)))
    assert not stale.exists()
