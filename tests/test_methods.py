"""Every registered erasure method through one table on the tiny pipeline: erase, reload, what may change,
weights outside the mask bit-identical where a mask applies, and bit-identical resume where it trains.

Adding a method means adding its row to METHOD_CASES (a test fails until it has one)."""

from __future__ import annotations

import dataclasses
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
    load_erased_pipeline,
    load_mask,
    load_pipeline,
    read_run,
)
from erasure.methods import METHODS
from erasure.runs import TE_PREFIX

FORGET = "a red circle"

# method -> (extra config, which parameters may change: "all" | "xattn" | "noxattn" | "attn2_kv" | "text_encoder")
METHOD_CASES: dict[str, tuple[dict, str]] = {
    "salun": ({}, "all"),
    "rl": ({}, "all"),
    "esd-x": ({"method_args": {"sample_steps": 3}}, "xattn"),
    "esd-u": ({"method_args": {"sample_steps": 3}}, "noxattn"),
    "uce": ({}, "attn2_kv"),
    "rece": ({"method_args": {"epochs": 2}}, "attn2_kv"),
    "salun-adv": ({"method_args": {"attack_steps": 2}}, "all"),
    "text-remap": ({"method_args": {"iterations": 3}}, "text_encoder"),
}
# the training options of the engine, each on the masked method (mixed precision, accumulation, clipping, ...)
TRAINING_CASES: dict[str, dict] = {
    "bf16-adamw": {"mixed_precision": "bf16", "optimizer": "adamw", "weight_decay": 0.1},
    "accum-clip-sgd": {"grad_accum": 2, "max_grad_norm": 0.05, "optimizer": "sgd", "weight_decay": 0.01},
    "xattn-distill": {"trainable": "xattn", "method_args": {"retain_loss": "distill"}},
    "distill-retain-on-forget": {"method_args": {"retain_loss": "distill", "retain_on_forget": True}},
}


def _cfg(model, tmp_path, **kw) -> EraseConfig:
    base = dict(
        model=str(model),
        concepts=[ConceptSpec(name="circle", forget_prompts=[FORGET], anchor_prompts=["a red square"],
                              retain_prompts=["a blue star"])],
        steps=3, batch_size=2, forget_images_per_prompt=2, retain_images_per_prompt=2, data_steps=2,
        lr=1e-3, cache_dir=str(tmp_path.parent / "cache"), device="cpu", mask_ratio=0.3, checkpoint_every=0,
    )
    base.update(kw)
    return EraseConfig(**base)


def _may_change(name: str, rule: str) -> bool:
    if name.startswith(TE_PREFIX):  # text-encoder tensors: only a text-encoder method writes them
        return rule == "text_encoder" and "embeddings" not in name
    return {"text_encoder": False, "all": True, "xattn": ".attn2." in name, "attn2_kv": ".attn2.to_k." in name or ".attn2.to_v." in name,
            "noxattn": ".attn2." not in name and not name.startswith(("time_embedding", "conv_out", "conv_norm_out"))}[rule]


def test_every_method_has_a_row():
    assert set(METHOD_CASES) == set(METHODS), "add the new method to METHOD_CASES"


def _check_run(run, base_params, rule, masked):
    info = read_run(run)
    weights = load_file(str(run / "weights.safetensors"))
    assert weights and all(_may_change(n, rule) for n in weights), sorted(n for n in weights if not _may_change(n, rule))[:3]
    pipe = load_erased_pipeline(run, device="cpu")
    erased = dict(pipe.unet.named_parameters())
    erased.update({TE_PREFIX + n: p for n, p in pipe.text_encoder.named_parameters()})
    changed = 0
    mask = load_mask(run / "mask.safetensors") if masked else None
    for n, p in base_params.items():
        a, b = p.detach(), erased[n].detach()
        if not _may_change(n, rule):
            assert torch.equal(a.view(torch.int32), b.view(torch.int32)), f"{n} changed"
        if mask is not None:
            m = mask.get(n, torch.zeros(a.shape, dtype=torch.bool))  # no entry: nothing of it may change
            assert not bool(m.any()) or _may_change(n, rule)  # the saved mask shows only trainable weights
            assert torch.equal(a[~m].view(torch.int32), b[~m].view(torch.int32)), f"{n} changed outside the mask"
        changed += int((a != b).sum())
    assert changed > 0, "nothing changed"
    return info


@pytest.fixture(scope="module")
def base_params(tiny_model_dir):
    pipe = load_pipeline(tiny_model_dir, device="cpu")
    return {**dict(pipe.unet.named_parameters()),
            **{TE_PREFIX + n: p for n, p in pipe.text_encoder.named_parameters()}}


@pytest.mark.parametrize("method", list(METHOD_CASES))
def test_method_table(method, tiny_model_dir, tmp_path, base_params):
    extra, rule = METHOD_CASES[method]
    spec = METHODS[method]
    cfg = _cfg(tiny_model_dir, tmp_path, method=method, **extra)
    run = erase(cfg, tmp_path / "run")
    info = _check_run(run, base_params, rule, spec.needs_mask)
    assert info["method"] == method and info["method_shape"] == spec.shape
    assert EraseConfig.from_dict(info["config"]) == cfg  # the run carries its recipe, method_args included
    assert (run / "mask.safetensors").exists() == spec.needs_mask
    if spec.shape == "loss":  # resume after a cancel gives the same weights as an uninterrupted run
        cancel = threading.Event()
        with pytest.raises(EraseCancelled):
            erase(cfg, tmp_path / "resumed", cancel=cancel,
                  progress=lambda e: cancel.set() if e.stage == "fine-tuning" and e.done == 1 else None)
        state = json.loads((tmp_path / "resumed.partial" / "checkpoint-1" / "state.json").read_text())
        assert state["config"]["checkpoint_every"] == 0  # the checkpoint records every setting, for resuming
        out = erase(cfg, tmp_path / "resumed")
        assert read_run(out)["resumed_from_step"] == 1
        a, b = load_file(str(run / "weights.safetensors")), load_file(str(out / "weights.safetensors"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("case", list(TRAINING_CASES))
def test_training_options_keep_frozen_weights(case, tiny_model_dir, tmp_path, base_params):
    kw = TRAINING_CASES[case]
    cfg = _cfg(tiny_model_dir, tmp_path, **kw)
    run = erase(cfg, tmp_path / "run")
    info = _check_run(run, base_params, "xattn" if kw.get("trainable") == "xattn" else "all", masked=True)
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert len(log) == cfg.steps and all(torch.isfinite(torch.tensor(r["loss"])) for r in log)
    assert info["config"] == cfg.to_dict()


def test_mask_path_is_intersected_with_the_trainable_filter(tiny_model_dir, tmp_path, base_params):
    """A supplied mask that covers every weight is cut to the trainable set before it is saved and used."""
    full = {n: torch.ones(p.shape, dtype=torch.bool) for n, p in base_params.items()}
    from erasure.saliency import save_mask

    save_mask(full, tmp_path / "full.safetensors")
    cfg = _cfg(tiny_model_dir, tmp_path, trainable="xattn", mask_path=str(tmp_path / "full.safetensors"))
    run = erase(cfg, tmp_path / "run")
    saved = load_mask(run / "mask.safetensors")
    assert all(bool(m.any()) == (".attn2." in n) for n, m in saved.items())
    _check_run(run, base_params, "xattn", masked=True)


def test_stale_mask_of_an_interrupted_run_is_not_reused(tiny_model_dir, tmp_path):
    """Kill after the mask was saved, rerun with another mask ratio: the new ratio's mask is computed and used."""
    cfg = _cfg(tiny_model_dir, tmp_path, mask_ratio=0.5)
    cancel = threading.Event()
    with pytest.raises(EraseCancelled):
        erase(cfg, tmp_path / "run", cancel=cancel, progress=lambda e: cancel.set() if e.stage == "fine-tuning" else None)
    import shutil

    for ck in (tmp_path / "run.partial").glob("checkpoint-*"):  # as if killed before the first checkpoint
        shutil.rmtree(ck)
    (tmp_path / "run.partial" / "latest_checkpoint").unlink()
    out = erase(dataclasses.replace(cfg, mask_ratio=0.1), tmp_path / "run")
    mask = load_mask(out / "mask.safetensors")
    kept = sum(int(m.sum()) for m in mask.values()) / sum(m.numel() for m in mask.values())
    assert abs(kept - 0.1) < 0.01 and read_run(out)["config"]["mask_ratio"] == 0.1


def test_legacy_config_keys_still_load():
    """run.json files and presets written before method_args (alpha, retain_loss, esd_* at the top level)."""
    concept = {"name": "c", "forget_prompts": ["a"], "anchor_prompts": ["b"], "retain_prompts": ["r"]}
    cfg = EraseConfig.from_dict({"concepts": [concept], "alpha": 3.0, "retain_loss": "distill",
                                 "esd_negative_guidance": 2.0, "esd_sample_steps": 7})
    assert cfg.method_args.alpha == 3.0 and cfg.method_args.retain_loss == "distill"
    esd = EraseConfig.from_dict({"concepts": [concept], "method": "esd-x", "alpha": 0.5, "esd_negative_guidance": 2.0})
    assert esd.method_args.negative_guidance == 2.0 and not hasattr(esd.method_args, "alpha")
    assert EraseConfig.from_dict(json.loads(json.dumps(esd.to_dict()))) == esd


def test_cli_method_flags(tiny_model_dir, tmp_path, capsys):
    from erasure.cli import build_parser, main

    help_text = build_parser()._subparsers._group_actions[0].choices["erase"].format_help()
    for flag in ("--alpha", "--retain-loss", "--esd-negative-guidance", "--esd-sample-steps"):
        assert flag in help_text
    common = ["erase", "--model", str(tiny_model_dir), "--cache-dir", str(tmp_path / "cache"), "--device", "cpu",
              "--data-steps", "2", "--forget-images-per-prompt", "2", "--batch-size", "2", "--steps", "1",
              "--forget-prompt", FORGET, "--anchor-prompt", "a red square"]
    rc = main([*common, "--method", "esd-x", "--esd-sample-steps", "2", "--esd-negative-guidance", "1.5",
               "--out", str(tmp_path / "esd")])
    assert rc == 0 and read_run(tmp_path / "esd")["config"]["method_args"] == {"negative_guidance": 1.5, "sample_steps": 2,
                                                                             "start_guidance": 3.0, "xt_model": "current"}
    rc = main([*common, "--method", "salun", "--alpha", "0", "--esd-sample-steps", "2", "--out", str(tmp_path / "x")])
    err = capsys.readouterr().err
    assert rc == 2 and "--esd-sample-steps is a setting of method esd" in err and not (tmp_path / "x").exists()


def test_retain_on_forget_adds_the_retain_prompts_on_forget_images(tiny_model_dir):
    """retain_on_forget = the Dr distillation plus the same distillation of the retain prompts on the Df x_t."""
    import copy
    from types import SimpleNamespace

    from erasure.diffusion.losses import StepBatch, distill_loss, unet_eps
    from erasure.diffusion.methods.salun import SalUnConfig, remap_with_retain

    with pytest.raises(ValueError, match="needs retain_loss='distill'"):
        SalUnConfig(retain_on_forget=True)
    pipe = load_pipeline(tiny_model_dir, device="cpu")
    frozen = copy.deepcopy(pipe.unet).requires_grad_(False)
    with torch.no_grad():
        for p in pipe.unet.parameters():
            p.add_(0.01 * torch.randn_like(p))
    g = torch.Generator().manual_seed(0)
    c = pipe.unet.config
    x = lambda: torch.randn(2, c.in_channels, c.sample_size, c.sample_size, generator=g)  # noqa: E731
    cond = lambda: torch.randn(2, 4, c.cross_attention_dim, generator=g)  # noqa: E731
    b = StepBatch(forget_x=x(), forget_t=torch.tensor([10, 500]), forget_noise=x(), forget_cond=cond(),
                  anchor_cond=cond(), uncond=cond()[:1], retain_x=x(), retain_t=torch.tensor([3, 900]),
                  retain_noise=x(), retain_cond=cond())
    losses = {}
    for on in (False, True):
        ctx = SimpleNamespace(unet=pipe.unet, frozen_unet=frozen, predict=unet_eps,
                              args=SalUnConfig(alpha=2.0, retain_loss="distill", retain_on_forget=on))
        losses[on] = {k: float(v) for k, v in remap_with_retain(ctx, b).items()}
    extra = float(distill_loss(pipe.unet, frozen, b.forget_x, b.forget_t, b.retain_cond))
    assert extra > 0
    assert losses[True]["retain_loss"] == pytest.approx(losses[False]["retain_loss"] + extra, rel=1e-5)
    assert losses[True]["loss"] == pytest.approx(losses[False]["loss"] + 2.0 * extra, rel=1e-5)
