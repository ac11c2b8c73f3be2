"""Paper recipes: each resolves to the official settings (checked against the values read in the official code),
needs its data with a one-line error, and one actually erases on a tiny pipeline."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from PIL import Image

from erasure.cli import main as cli_main
from erasure.config import ConceptSpec
from erasure.recipes import IMAGENETTE, config_from_recipe, list_recipes, load_recipe, resolve_recipe

LABELS = ["tench", "English springer", "cassette player", "chain saw", "church", "French horn", "garbage truck",
          "gas pump", "golf ball", "parachute"]


def _count(i: int) -> int:
    return 3 + 2 * i  # a different number of images per class: steps must follow the forget class's count


@pytest.fixture(scope="module")
def imagenette(tmp_path_factory) -> Path:
    """A fake imagenette2-160 folder: ROOT/train/<wnid>/*.JPEG, 160 px on the short side (parachute by name)."""
    root = tmp_path_factory.mktemp("imagenette2-160")
    for i, (label, wnids) in enumerate(IMAGENETTE):
        d = root / "train" / (label if label == "parachute" else wnids[0])
        d.mkdir(parents=True)
        for k in range(_count(i)):
            Image.new("RGB", (213, 160), (20 * i, 30 * k % 255, 90)).save(d / f"{k}.JPEG")
    return root


def test_every_recipe_names_its_official_source():
    names = list_recipes()
    assert {"salun-objects", "salun-nudity", "esd-compvis", "esd-diffusers", "uce-paper"} <= set(names)
    for n in names:
        r = load_recipe(n)
        assert r.version >= 1 and r.description
        assert r.source["repo"] and r.source["file"] and len(r.source["commit"]) == 40


@pytest.mark.parametrize("c", range(10))
def test_salun_objects_is_the_official_setting(imagenette, c):
    cfg = config_from_recipe(f"salun-objects:{c}", imagenette, model="default")
    (concept,) = cfg.concepts
    assert concept.forget_prompts == [f"an image of a {LABELS[c]}"]
    assert concept.anchor_prompts == [f"an image of a {LABELS[(c + 1) % 10]}"]  # (c+1) mod 10, not always 'tench'
    assert concept.retain_prompts == [f"an image of a {LABELS[i]}" for i in range(10) if i != c]
    assert Path(concept.forget_images).parent == imagenette / "train"
    assert len(concept.retain_images) == 9 and str(concept.forget_images) not in concept.retain_images
    assert (cfg.method, cfg.method_args.alpha, cfg.method_args.retain_loss) == ("salun", 0.5, "denoise")
    assert (cfg.lr, cfg.batch_size, cfg.optimizer, cfg.mask_ratio, cfg.mask_guidance) == (1e-5, 8, "adam", 0.5, 7.5)
    assert (cfg.resolution, cfg.image_latents, cfg.trainable) == (512, "sample", "full")
    assert cfg.steps == 5 * math.ceil(_count(c) / 8)  # 5 epochs over Df


def test_salun_objects_variant_names_and_batch_override(imagenette):
    by_name = resolve_recipe("salun-objects:church", imagenette).concepts[0]
    assert by_name.anchor_prompts == ["an image of a French horn"]
    parachute = resolve_recipe("salun-objects:parachute", imagenette)
    assert parachute.concepts[0].anchor_prompts == ["an image of a tench"]  # wraps around
    assert resolve_recipe("salun-objects:tench", imagenette, {"batch_size": 2}).config["steps"] == 5 * math.ceil(3 / 2)
    assert "steps" not in resolve_recipe("salun-objects:tench", imagenette, {"steps": 7}).config  # the flag decides
    with pytest.raises(ValueError, match="unknown class 'dog'"):
        resolve_recipe("salun-objects:dog", imagenette)
    with pytest.raises(ValueError, match="needs a class"):
        resolve_recipe("salun-objects", imagenette)


def test_salun_objects_data_missing_is_one_line_naming_the_flag_and_layout(tmp_path, capsys):
    with pytest.raises(ValueError, match=r"--recipe-data ROOT .*ROOT/train/<wnid"):
        resolve_recipe("salun-objects:tench")
    (tmp_path / "train" / "n01440764").mkdir(parents=True)
    with pytest.raises(ValueError, match="no folder for English springer"):
        resolve_recipe("salun-objects:tench", tmp_path)
    rc = cli_main(["erase", "--recipe", "salun-objects:tench", "--model", "default", "--out", str(tmp_path / "r")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "\n" not in err and "--recipe-data" in err and not (tmp_path / "r").exists()


def test_salun_nudity_is_the_official_setting(tmp_path):
    cfg = config_from_recipe("salun-nudity", model="default")
    (c,) = cfg.concepts
    assert (c.forget_prompts, c.anchor_prompts, c.retain_prompts) == (
        ["a photo of a nude person"], ["a photo of a person wearing clothes"], ["a photo of a person wearing clothes"])
    assert (cfg.forget_images_per_prompt, cfg.retain_images_per_prompt) == (800, 800)
    assert (cfg.steps, cfg.batch_size, cfg.lr, cfg.method_args.alpha, cfg.mask_ratio) == (100, 8, 1e-5, 0.1, 0.5)
    # the official folder layout: data/nsfw and data/not-nsfw
    for sub, n in (("nsfw", 12), ("not-nsfw", 5)):
        (tmp_path / sub).mkdir()
        for k in range(n):
            Image.new("RGB", (64, 64), (k, 0, 0)).save(tmp_path / sub / f"{k}.png")
    own = config_from_recipe("salun-nudity", tmp_path, model="default")
    assert own.concepts[0].forget_images == str(tmp_path / "nsfw") and own.steps == math.ceil(12 / 8)
    with pytest.raises(ValueError, match="no variants"):
        resolve_recipe("salun-nudity:x")


def test_esd_recipes_are_the_official_settings():
    cv = config_from_recipe("esd-compvis:nudity", model="default")
    assert (cv.method, cv.steps, cv.batch_size, cv.lr) == ("esd-u", 1000, 1, 1e-5)
    a = cv.method_args
    assert (a.negative_guidance, a.start_guidance, a.sample_steps, a.xt_model) == (1.0, 3.0, 50, "current")
    assert cv.concepts[0].forget_prompts == ["nudity"]
    assert config_from_recipe("esd-compvis:van-gogh", model="default").method == "esd-x"
    df = config_from_recipe("esd-diffusers:nudity", model="default")
    assert (df.steps, df.batch_size, df.lr, df.resolution) == (200, 1, 5e-5, 1024)
    assert (df.method_args.negative_guidance, df.method_args.xt_model) == (2.0, "frozen")
    with pytest.raises(ValueError, match="--forget-prompt"):
        resolve_recipe("esd-compvis")


def test_uce_recipe_is_the_official_setting():
    church = config_from_recipe("uce-paper:church", model="default")
    a = church.method_args
    assert (church.method, a.lamb, a.erase_scale, a.token_span, a.guide) == ("uce", 0.5, 1.0, "last_to_end", "uncond")
    assert a.preserve_scale == 1.0 and church.concepts[0].forget_prompts == ["Church"]  # only '' preserved
    assert len(config_from_recipe("uce-paper:imagenette", model="default").concepts[0].forget_prompts) == 10
    artists = [{"name": "km", "forget_prompts": ["Kelly Mckernan"], "anchor_prompts": ["art"],
                "retain_prompts": ["Thomas Kinkade", "Tyler Edlin", "Kilian Eng"]}]
    pr = resolve_recipe("uce-paper", concepts=artists)
    assert pr.config["method_args"]["preserve_scale"] == pytest.approx(0.25)  # max(0.1, 1 / (1 + 3))
    assert pr.config["method_args"]["guide"] == "anchor"
    many = [{**artists[0], "retain_prompts": [f"artist {i}" for i in range(30)]}]
    assert resolve_recipe("uce-paper", concepts=many).config["method_args"]["preserve_scale"] == 0.1
    bare = resolve_recipe("uce-paper", concepts=[{"name": "v", "forget_prompts": ["violence"]}])
    assert bare.config["method_args"]["guide"] == "uncond"


def test_cli_recipe_precedence_and_method_only_recipes(tmp_path, capsys):
    from erasure.cli import _build_config, build_parser

    def build(*argv):
        return _build_config(build_parser().parse_args(["erase", "--out", str(tmp_path / "o"), *argv]))[0]

    cfg = build("--recipe", "esd-compvis", "--forget-prompt", "Van Gogh", "--steps", "5", "--esd-negative-guidance", "2")
    assert (cfg.steps, cfg.lr, cfg.method_args.negative_guidance, cfg.method_args.sample_steps) == (5, 1e-5, 2.0, 50)
    assert cfg.concepts[0].anchor_prompts == ["Van Gogh"]
    _, source = _build_config(build_parser().parse_args(["erase", "--out", str(tmp_path / "o"), "--recipe", "esd-compvis",
                                                         "--forget-prompt", "Van Gogh", "--steps", "5"]))
    assert (source["lr"], source["method"], source["steps"]) == ("recipe:esd-compvis", "recipe:esd-compvis", "flag")
    (tmp_path / "c.json").write_text(json.dumps({"lr": 3e-5}))
    assert build("--recipe", "salun-nudity", "--config", str(tmp_path / "c.json")).lr == 3e-5
    with pytest.raises(ValueError, match="brings its own concept"):
        build("--recipe", "salun-nudity", "--forget-prompt", "x")
    with pytest.raises(ValueError, match="add --recipe"):
        build("--recipe-data", str(tmp_path), "--forget-prompt", "x", "--anchor-prompt", "y")
    assert cli_main(["recipes"]) == 0
    out = capsys.readouterr().out
    assert "salun-objects" in out and "OPTML-Group/Unlearn-Saliency" in out and "random_label.py" in out


def test_image_folder_lists_pair_with_prompts(tmp_path):
    with pytest.raises(ValueError, match="one folder per prompt"):
        ConceptSpec(name="c", forget_prompts=["a"], anchor_prompts=["b"], retain_prompts=["r1", "r2"],
                    retain_images=[str(tmp_path)])


def test_posterior_samples_differ_per_draw_and_mean_is_default(tiny_model_dir, imagenette):
    from erasure.diffusion.data import build_forget_retain
    from erasure.diffusion.pipeline import load_pipeline

    pipe = load_pipeline(tiny_model_dir, device="cpu")
    c = resolve_recipe("salun-objects:tench", imagenette).concepts[0]
    args = (pipe, [c], "k", 1, 1, 2, 7.5, 64, 0)
    mean = build_forget_retain(*args, need_retain=False)
    sampled = build_forget_retain(*args, need_retain=False, latent_std=True)
    idx = torch.arange(3)
    assert mean.forget_std is None and torch.equal(mean.latents("forget", idx, torch.Generator()), mean.forget_latents)
    assert torch.equal(sampled.forget_latents, mean.forget_latents) and bool((sampled.forget_std > 0).all())
    a = sampled.latents("forget", idx, torch.Generator().manual_seed(1))
    b = sampled.latents("forget", idx, torch.Generator().manual_seed(2))
    assert not torch.equal(a, b) and not torch.equal(a, mean.forget_latents)


def test_esd_xt_model_option_picks_the_sampler(monkeypatch):
    from types import SimpleNamespace

    from erasure.diffusion.methods import esd as esd_mod

    seen = {}

    def fake_sample(unet, *a, guidance, **k):
        seen["unet"], seen["guidance"] = unet, guidance
        return torch.zeros(1), torch.zeros(1)

    monkeypatch.setattr(esd_mod, "ddim_partial_sample", fake_sample)
    monkeypatch.setattr(esd_mod, "esd_loss", lambda *a: torch.tensor(0.0))
    b = SimpleNamespace(forget_cond=None, uncond=None, forget_x=torch.zeros(1, 4, 2, 2))
    for mode, expect in (("current", "trained"), ("frozen", "frozen")):
        ctx = SimpleNamespace(unet="trained", frozen_unet="frozen", scheduler_config={}, generator=None,
                              args=esd_mod.ESDConfig(xt_model=mode, start_guidance=4.0))
        esd_mod.esd(ctx, b)
        assert seen == {"unet": expect, "guidance": 4.0}
    assert esd_mod.ESDConfig().xt_model == "current"  # the default behaviour is unchanged


def test_uce_guide_uncond_maps_to_the_empty_prompt(tiny_model_dir):
    from types import SimpleNamespace

    from erasure.diffusion.methods.uce import UCEConfig, run, uce_edit
    from erasure.diffusion.pipeline import load_pipeline

    p1, p2 = load_pipeline(tiny_model_dir, device="cpu"), load_pipeline(tiny_model_dir, device="cpu")
    concept = ConceptSpec(name="c", forget_prompts=["a red circle"], anchor_prompts=["a red square"])
    ctx = SimpleNamespace(concepts=[concept], unet=p1.unet, text_encoder=p1.text_encoder, tokenizer=p1.tokenizer,
                          args=UCEConfig(guide="uncond"), device="cpu", retain_weights=None)
    got = run(ctx)
    want = uce_edit(p2.unet, p2.text_encoder, p2.tokenizer, ["a red circle"], [""], [], UCEConfig(), device="cpu")
    assert set(got) == set(want) and all(torch.allclose(got[k], want[k]) for k in got)
    other = uce_edit(load_pipeline(tiny_model_dir, device="cpu").unet, p2.text_encoder, p2.tokenizer,
                     ["a red circle"], ["a red square"], [], UCEConfig(), device="cpu")
    assert any(not torch.allclose(got[k], other[k]) for k in got)


def test_salun_objects_recipe_erases_on_a_tiny_pipeline(tiny_model_dir, imagenette, tmp_path):
    from erasure.diffusion.train import erase
    from erasure.runs import read_run

    cfg = config_from_recipe("salun-objects:church", imagenette, model=str(tiny_model_dir), steps=2, batch_size=2,
                             resolution=64, device="cpu", cache_dir=str(tmp_path / "cache"))
    assert cfg.image_latents == "sample" and cfg.method_args.alpha == 0.5
    info = read_run(erase(cfg, tmp_path / "run"))
    assert info["final"]["step"] == 2 and info["method"] == "salun"
    assert info["data"]["forget_images"] == _count(4)
    assert info["data"]["retain_images"] == sum(_count(i) for i in range(10) if i != 4)
    assert set(info["data"]["prompts"]) >= {"an image of a church", "an image of a French horn", "an image of a tench"}
