"""Automatic erasure (erasure.auto): per-model defaults and their precedence, the automatic retain set, the
neighbour set, per-sample retain weights and budgeted tuning."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from erasure import ConceptSpec, EraseConfig, read_run
from erasure.auto.config import AutoConfig, TuneConfig
from erasure.auto.defaults import DEFAULTS_FILE, model_defaults, resolve_settings
from erasure.auto.text import carries, concept_words, embed, swap_word
from erasure.cli import _build_config, build_parser
from erasure.cli import main as cli_main


@pytest.fixture(scope="module")
def shapes_pipe():
    from erasure.diffusion.pipeline import load_pipeline

    return load_pipeline("default", device="cpu")


@pytest.fixture()
def model_with_defaults(tiny_model_dir, tmp_path):
    """A copy of the tiny pipeline folder that carries an erasure_defaults.json."""
    import shutil

    m = tmp_path / "model"
    shutil.copytree(tiny_model_dir, m)
    (m / DEFAULTS_FILE).write_text(json.dumps({"config": {"lr": 3e-4, "batch_size": 3, "steps": 7,
                                                          "method_args": {"alpha": 2.0}, "auto": {"neighbours": 1}}}))
    return m


def _parse(*argv):
    return build_parser().parse_args(["erase", "--out", "/tmp/never-written", *argv])


def test_precedence_builtin_model_preset_config_flag(model_with_defaults, tmp_path, monkeypatch):
    presets = tmp_path / "presets"
    presets.mkdir()
    (presets / "p.json").write_text(json.dumps({
        "concept": {"name": "c", "forget_prompts": ["a red circle"], "anchor_prompts": ["a red square"],
                    "retain_prompts": ["a blue star"]},
        "config": {"steps": 11, "batch_size": 5, "alpha": 4.0}}))
    monkeypatch.setenv("SALUN_PRESETS_DIR", str(presets))
    conf = tmp_path / "conf.json"
    conf.write_text(json.dumps({"batch_size": 6, "method_args": {"retain_loss": "distill"}}))
    cfg, src = _build_config(_parse("--model", str(model_with_defaults), "--preset", "p", "--config", str(conf),
                                    "--seed", "9"))
    assert (cfg.lr, src["lr"]) == (3e-4, "model")                      # model over built-in
    assert (cfg.steps, src["steps"]) == (11, "preset:p")               # preset over model
    assert (cfg.batch_size, src["batch_size"]) == (6, "config")        # --config over preset
    assert (cfg.seed, src["seed"]) == (9, "flag")                      # flag over everything
    assert (cfg.method_args.alpha, src["method_args.alpha"]) == (4.0, "preset:p")
    assert src["method_args.retain_loss"] == "config" and cfg.method_args.retain_loss == "distill"
    assert (cfg.auto.neighbours, src["auto.neighbours"]) == (1, "model")
    assert src["data_steps"] == "builtin" and cfg.data_steps == EraseConfig.__dataclass_fields__["data_steps"].default
    cfg2, src2 = _build_config(_parse("--model", str(model_with_defaults), "--forget-prompt", "a red circle",
                                      "--anchor-prompt", "a red square", "--retain-prompt", "x",
                                      "--no-model-defaults"))
    assert src2["lr"] == "builtin" and cfg2.lr == EraseConfig.__dataclass_fields__["lr"].default


def test_settings_source_recorded_in_run_json(model_with_defaults, tmp_path):
    out = tmp_path / "run"
    rc = cli_main(["erase", "--model", str(model_with_defaults), "--device", "cpu", "--out", str(out),
                   "--cache-dir", str(tmp_path / "cache"), "--forget-prompt", "a red circle", "--anchor-prompt",
                   "a red square", "--retain-prompt", "a blue star", "--steps", "1", "--data-steps", "1",
                   "--forget-images-per-prompt", "1", "--retain-images-per-prompt", "1", "--neighbours", "0"])
    assert rc == 0
    info = read_run(out)
    assert info["settings_source"]["lr"] == "model" and info["config"]["lr"] == 3e-4
    assert info["settings_source"]["steps"] == "flag" and info["config"]["steps"] == 1
    assert info["settings_source"]["auto.neighbours"] == "flag"


def test_paper_defaults_for_sd_v1_and_bad_defaults_file(model_with_defaults):
    assert model_defaults("CompVis/stable-diffusion-v1-4")[1] == "paper"
    assert model_defaults("CompVis/stable-diffusion-v1-4")[0]["lr"] == 1e-5
    (model_with_defaults / DEFAULTS_FILE).write_text("{not json")
    with pytest.raises(ValueError, match="erasure_defaults.json"):
        model_defaults(str(model_with_defaults))
    (model_with_defaults / DEFAULTS_FILE).write_text(json.dumps({"config": {"lrr": 1}}))
    with pytest.raises(ValueError, match="unknown settings"):
        model_defaults(str(model_with_defaults))


def test_method_args_of_another_method_are_dropped():
    data, src = resolve_settings([("model", {"method_args": {"alpha": 3.0}}), ("flag", {"method": "esd-x"})])
    assert "alpha" not in data["method_args"] and "method_args.alpha" not in src


def test_shapes_model_ships_defaults():
    d, s = model_defaults("default")
    assert s == "model" and d["method_args"]["retain_loss"] == "distill" and d["auto"]["min_retain"] >= 8


def test_text_rules():
    c = ConceptSpec(name="a blue star", forget_prompts=["a blue star"], anchor_prompts=["a blue heart"])
    assert concept_words(c) == ["blue", "star"]
    assert carries("a photo of a striped blue star", ["blue", "star"]) and not carries("a red star", ["blue", "star"])
    assert carries("two stars", ["star"])
    c2 = ConceptSpec(name="x", forget_prompts=["a star"], anchor_prompts=["a circle"])
    assert concept_words(c2) == ["star"]
    assert swap_word("a red shape", "red", "orange") == "an orange shape"


def test_auto_retain_excludes_concept_by_text_and_similarity(shapes_pipe, tmp_path):
    from erasure.auto.retain import build_retain

    model = str(shapes_pipe.name_or_path) if getattr(shapes_pipe, "name_or_path", None) else "default"
    c = ConceptSpec(name="star", forget_prompts=["a star", "a photo of a star"], anchor_prompts=["a circle"])
    prompts, info = build_retain(shapes_pipe, c, AutoConfig(retain_pool="shapes", retain_size=24), model)
    assert len(prompts) == 24 and len(set(prompts)) == 24
    assert not any("star" in p for p in prompts)
    assert info["dropped_by_text"] > 0 and info["pool_size"] > 1000 and "shapes" in info["pool"]
    # a low cut also drops captions that never name the concept but sit close to it; what is kept stays below it
    pool = tmp_path / "pool.txt"
    pool.write_text("\n".join(["a star", "a triangle", "a photo of a triangle", "a red square", "a dotted heart",
                               "a striped blue cross", "a picture of a green circle", "a yellow shape"]))
    prompts, info = build_retain(shapes_pipe, c, AutoConfig(retain_pool=str(pool), retain_size=8,
                                                            similarity_threshold=0.85), model)
    assert info["dropped_by_text"] == 1 and info["dropped_by_similarity"] >= 1 and "pool.txt" in info["pool"]
    sims = (embed(shapes_pipe, prompts) @ embed(shapes_pipe, c.forget_prompts).T).max(1).values
    assert bool((sims < 0.85).all()) and "a star" not in prompts


def test_neighbours_of_red_include_orange(shapes_pipe):
    from erasure.auto.neighbours import find_neighbours, neighbour_prompts

    c = ConceptSpec(name="red", forget_prompts=["a red shape", "a photo of a red circle"], anchor_prompts=["a blue shape",
                    "a photo of a blue circle"])
    nbrs, label = find_neighbours(shapes_pipe, c, 2, "shapes", "default")
    terms = [n["term"] for n in nbrs]
    assert "orange" in terms and "red" not in terms and "blue" not in terms  # never itself nor the anchor
    assert nbrs[0]["similarity"] >= nbrs[1]["similarity"]
    prompts = neighbour_prompts(c, nbrs)
    assert "an orange shape" in prompts and "a photo of an orange circle" in prompts
    assert not any(carries(p, ["red"]) for p in prompts)


def test_conjunction_keeps_its_halves_in_retain_and_neighbours(shapes_pipe):
    """"a blue star": other stars and other blue shapes are what it damages, so the retain set keeps captions naming
    one of its words (the similarity cut would drop them all) and the neighbours cover both words."""
    from erasure.auto.neighbours import find_neighbours
    from erasure.auto.retain import build_retain

    c = ConceptSpec(name="a blue star", forget_prompts=["a blue star"], anchor_prompts=["a blue heart"])
    prompts, info = build_retain(shapes_pipe, c, AutoConfig(retain_pool="shapes", retain_size=32), "default")
    assert not any(carries(p, ["blue", "star"]) for p in prompts)
    assert info["kept_partial_matches"] > 0
    assert any(carries(p, ["star"]) for p in prompts) and any(carries(p, ["blue"]) for p in prompts)
    nbrs, _ = find_neighbours(shapes_pipe, c, 2, "shapes", "default")
    assert sorted(n["replaces"] for n in nbrs) == ["blue", "blue", "star", "star"]
    assert "heart" not in [n["term"] for n in nbrs]  # the anchor is never a neighbour
    # a single-word concept is unchanged: k neighbours in all, nothing kept past the similarity cut
    c1 = ConceptSpec(name="star", forget_prompts=["a star"], anchor_prompts=["a circle"])
    assert len(find_neighbours(shapes_pipe, c1, 2, "shapes", "default")[0]) == 2
    assert build_retain(shapes_pipe, c1, AutoConfig(retain_pool="shapes"), "default")[1]["kept_partial_matches"] == 0


def test_retain_weights_reach_the_loss(tiny_model_dir, tmp_path):
    from erasure.diffusion.data import build_forget_retain
    from erasure.diffusion.losses import weighted_mse
    from erasure.diffusion.pipeline import load_pipeline

    pipe = load_pipeline(tiny_model_dir, device="cpu")
    c = ConceptSpec(name="c", forget_prompts=["a red circle"], anchor_prompts=["a red square"],
                    retain_prompts=["a blue star", "an orange star"])
    d = build_forget_retain(pipe, [c], "tiny", 1, 2, 1, 7.5, 16, 0, tmp_path, retain_weights={"an orange star": 3.0})
    w = d.retain_weight
    assert w is not None and torch.allclose(w.mean(), torch.tensor(1.0))
    assert torch.allclose(w, torch.tensor([0.5, 0.5, 1.5, 1.5]))
    a, b = torch.zeros(2, 3), torch.tensor([[1.0, 1, 1], [2.0, 2, 2]])
    assert torch.isclose(weighted_mse(a, b), torch.tensor(2.5))
    assert torch.isclose(weighted_mse(a, b, torch.tensor([0.0, 1.0])), torch.tensor(2.0))
    # a doubled batch (cond + uncond) repeats the weights
    assert torch.isclose(weighted_mse(torch.cat([a, a]), torch.cat([b, b]), torch.tensor([0.0, 1.0])), torch.tensor(2.0))


def test_tuning_budget_two_picks_by_the_rule_and_logs(tiny_model_dir, tmp_path, monkeypatch):
    from erasure.auto import tune

    class Judge:  # deterministic numbers from the pixels: different candidates score differently
        name = "fake"

        def forget_rate(self, images, prompts, concept):
            return [float(int(np.asarray(im.convert("L")).sum()) % 2) for im in images]

        def retain_score(self, images, prompts):
            return [float(np.asarray(im.convert("L")).mean()) / 2.55 for im in images]

    monkeypatch.setitem(tune.JUDGES, "fake", Judge)
    pool = tmp_path / "pool.txt"
    pool.write_text("a red circle in the sky\na photo of a red circle\na blue star\na green heart\na yellow cross\n")
    cfg = EraseConfig(model=str(tiny_model_dir), device="cpu", cache_dir=str(tmp_path / "cache"), steps=2, batch_size=2,
                      forget_images_per_prompt=1, retain_images_per_prompt=1, data_steps=1, lr=1e-3,
                      auto=AutoConfig(retain_pool=str(pool)),
                      concepts=[ConceptSpec(name="red circle", forget_prompts=["a red circle"],
                                            anchor_prompts=["a red square"], retain_prompts=["a blue star"])])
    out = tune.tune_and_erase(cfg, TuneConfig(tune=2, tune_seeds=2, tune_max_drop=5.0), tmp_path / "run",
                              judge="fake")
    t = read_run(out)["tuning"]
    assert len(t["log"]) == 2 and t["judge"] == "fake"
    assert t["chosen"] == t["log"][tune.choose(t["log"], 5.0)]
    assert t["held_out"]["forget"][0] == "a red circle"  # the user's own prompt first, then held-out captions
    assert len(t["held_out"]["forget"]) == 3 and all("red circle" in p for p in t["held_out"]["forget"])
    assert not (tmp_path / "run.tune").exists()
    assert read_run(out)["config"]["steps"] == 2  # the final run trains the full steps


def test_tuning_a_closed_form_moves_its_own_weights(tiny_model_dir, tmp_path, pixel_tune_judge):
    """UCE has no learning rate or steps: its candidates are its erase/preserve weights, and the chosen one is what
    the final edit uses."""
    from erasure.auto import tune
    from erasure.diffusion.methods.uce import UCEConfig

    judge, pool = pixel_tune_judge
    cfg = EraseConfig(model=str(tiny_model_dir), device="cpu", cache_dir=str(tmp_path / "cache"), method="uce",
                      auto=AutoConfig(retain_pool=str(pool)),
                      concepts=[ConceptSpec(name="red circle", forget_prompts=["a red circle"],
                                            anchor_prompts=["a red square"], retain_prompts=["a blue star"])])
    assert tune.candidates(cfg, 3) == [{}, {"erase_scale": 3.0}, {"preserve_scale": 3.0}]
    assert "lr" not in str(tune.candidates(cfg, 64))
    out = tune.tune_and_erase(cfg, TuneConfig(tune=3, tune_seeds=2, tune_max_drop=5.0), tmp_path / "run",
                              judge=judge)
    info = read_run(out)
    t = info["tuning"]
    assert [r["settings"] for r in t["log"]] == tune.candidates(cfg, 3)
    expected = {**UCEConfig().to_dict(), **t["chosen"]["settings"]}
    assert info["config"]["method_args"] == expected


def test_held_out_retain_covers_the_neighbours(tmp_path):
    """Tuning judges the retain side where damage lands: two held-out captions per neighbour term come first."""
    from erasure.auto.tune import _held_out

    pool = tmp_path / "pool.txt"
    pool.write_text("\n".join(["a red circle", "a photo of a red star", "a red heart on paper"]
                              + [f"an orange {s}" for s in ("square", "heart", "cross")]
                              + [f"a green {s}" for s in ("square", "heart", "cross", "star")]
                              + [f"a {c} triangle" for c in ("blue", "purple", "yellow")]
                              + ["a purple star", "a yellow heart", "a blue cross"]) + "\n")
    cfg = EraseConfig(model="default", auto=AutoConfig(retain_pool=str(pool)), concepts=[ConceptSpec(
        name="red", forget_prompts=["a red shape"], anchor_prompts=["a blue shape"], retain_prompts=["a green heart"])])
    forget, retain = _held_out(cfg, "default", 0, ["orange"])
    assert forget[0] == "a red shape" and all("red" in p for p in forget)
    assert all("orange" in p for p in retain[:2]) and len(set(retain)) == len(retain) == 2 + 8
    assert "a green heart" not in retain and not any("red" in p for p in retain)
    assert len(_held_out(cfg, "default", 0)[1]) == 8  # no neighbours: 8 random held-out captions


def test_choose_rule():
    from erasure.auto.tune import choose

    log = [{"forget": 10.0, "retain_drop": 1.0}, {"forget": 2.0, "retain_drop": 5.0}, {"forget": 4.0, "retain_drop": 2.9}]
    assert choose(log, 3.0) == 2          # lowest forget among drops <= 3
    assert choose(log, 10.0) == 1
    assert choose(log, 0.5) == 0          # none within: the smallest drop
    with pytest.raises(ValueError):
        choose([], 3.0)


@pytest.mark.parametrize("argv,needle", [
    (["--tune", "-1"], "--tune"),
    (["--neighbours", "-2"], "--neighbours"),
    (["--retain-pool", "/nonexistent/pool.csv"], "--retain-pool"),
    (["--vocabulary", "/nonexistent/vocab.txt"], "--vocabulary"),
    (["--similarity-threshold", "1.5"], "--similarity-threshold"),
])
def test_bad_input_one_line_errors(tiny_model_dir, tmp_path, capsys, argv, needle):
    rc = cli_main(["erase", "--model", str(tiny_model_dir), "--device", "cpu", "--out", str(tmp_path / "run"),
                   "--forget-prompt", "a red circle", "--anchor-prompt", "a red square", "--retain-prompt", "a blue star",
                   *argv])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and needle in err and len(err.splitlines()) == 1
    assert not (tmp_path / "run").exists()


def test_no_retain_prompts_is_no_longer_an_error_with_auto(tiny_model_dir):
    c = ConceptSpec(name="c", forget_prompts=["a red circle"], anchor_prompts=["a red square"])
    with pytest.raises(ValueError, match="min-retain"):
        EraseConfig(model=str(tiny_model_dir), concepts=[c])
    EraseConfig(model=str(tiny_model_dir), concepts=[c], auto=AutoConfig(min_retain=8))


def test_app_custom_form_starts_from_the_model_defaults(model_with_defaults, tmp_path):
    from erasure_app.service import AppService

    service = AppService(model=str(model_with_defaults), runs_dir=tmp_path / "runs", device="cpu", judge="none")
    form = service.custom_form()
    assert form["lr"] == 3e-4 and form["batch_size"] == 3 and form["method_args"]["alpha"] == 2.0
    assert form["retain"] == "" and form["forget"] == ""
    cfg = service.make_config("c", "a red circle", "a red square", "a blue star")
    assert cfg.lr == 3e-4 and cfg.steps == 7 and cfg.auto.neighbours == 1
    cfg = service.make_config("c", "a red circle", "a red square", "a blue star", lr=1e-4)  # the form wins
    assert cfg.lr == 1e-4
    # a model whose defaults pick another method: the custom form and a config without a method use it
    f = model_with_defaults / DEFAULTS_FILE
    f.write_text(json.dumps({"config": {**json.loads(f.read_text())["config"], "method": "uce"}}))
    service = AppService(model=str(model_with_defaults), runs_dir=tmp_path / "runs", device="cpu", judge="none")
    assert service.custom_form()["method"] == "uce"
    cfg = service.make_config("c", "a red circle", "a red square", "")
    assert cfg.method == "uce" and cfg.method_args.preserve_scale == 1.0
    # SalUn picked instead starts from the model's SalUn settings (as `erasure erase --method salun` does)
    assert service.custom_form()["model_method_args"]["alpha"] == 2.0
    cfg = service.make_config("c", "a red circle", "a red square", "a blue star", method="salun")
    assert cfg.method_args.alpha == 2.0


def test_report_has_a_neighbours_section(tmp_path):
    """Original vs erased folders scored by the shapes judge; the erased run's neighbour (orange) comes out red."""
    from erasure.shapes import render
    from erasure_eval.base import score_folder
    from erasure_eval.object_acc import ObjectAccuracyMetric
    from erasure_eval.report import build_report

    specs = [("circle", "orange", "solid"), ("star", "orange", "striped"), ("square", "blue", "solid")]
    run = tmp_path / "run"
    run.mkdir()
    (run / "run.json").write_text(json.dumps({"auto": {"concepts": {"red": {"neighbours": {"terms": [
        {"term": "orange", "replaces": "red", "prompt": "an orange shape", "similarity": 0.78}]}}}}}))
    dirs = []
    for name, drawn in (("original", None), ("erased", "red")):
        root = tmp_path / name
        (root / "images").mkdir(parents=True)
        lines = []
        for i, (s, c, f) in enumerate(specs):
            render(s, drawn if drawn and c == "orange" else c, f, seed=i, size=64).save(root / "images" / f"{i}.png")
            lines.append(json.dumps({"file": f"images/{i}.png", "case_number": str(i), "sample": 0, "seed": i,
                                     "prompt": f"a {f} {c} {s}", "extra": {"shape": s, "color": c, "fill": f}}))
        (root / "manifest.jsonl").write_text("\n".join(lines) + "\n")
        score_folder(root, ObjectAccuracyMetric(judge="shapes"))
        if name == "erased":  # what `erasure-eval generate --run` records (written after scoring: no image metadata)
            (root / "generation.json").write_text(json.dumps({"run_id": "erased", "run_dir": str(run)}))
        dirs.append(root)
    summary = build_report(dirs, tmp_path / "report")
    (row,) = summary["neighbours"]
    assert row["neighbour"] == "orange" and row["images"] == "2"
    assert float(row["original"]) > float(row["erased"])  # colour lost on the neighbour, shape and fill kept
    assert "## Neighbours" in (tmp_path / "report" / "report.md").read_text()


def test_uce_preserves_the_automatic_retain_and_neighbour_sets(tiny_model_dir, tmp_path):
    """A closed-form edit gets what erasure.auto builds: the retain set and the neighbours (at their weight) are its
    preserve prompts, the forget paraphrases its erase prompts; the run records them. Without a caption pool it
    still runs (UCE's preserve set may be empty) instead of failing like a method that trains on Dr."""
    from erasure import erase
    from erasure.diffusion.methods.uce import UCEConfig, uce_edit
    from erasure.diffusion.pipeline import load_pipeline
    from erasure.runs import load_run_weights

    c = ConceptSpec(name="red", forget_prompts=["a red shape"], anchor_prompts=["a blue shape"])
    auto = AutoConfig(min_retain=8, retain_size=12, retain_pool="shapes", neighbours=2, neighbour_weight=3.0,
                      vocabulary="shapes", augment_forget=2)
    cfg = EraseConfig(model=str(tiny_model_dir), concepts=[c], method="uce", auto=auto, cache_dir=str(tmp_path / "c"))
    run = erase(cfg, tmp_path / "run")
    rec = read_run(run)["auto"]["concepts"]["red"]
    assert rec["sizes"]["retain_prompts"] >= 12 and len(rec["neighbours"]["terms"]) == 2
    para = rec["forget_paraphrases"]["prompts"]
    assert para and rec["sizes"]["forget_prompts"] == 1 + len(para)
    # the same edit by hand, from what the run says it used
    pipe = load_pipeline(tiny_model_dir, device="cpu")
    from erasure.auto.prepare import prepare_concepts

    concepts, weights, _ = prepare_concepts(cfg, pipe, str(tiny_model_dir), True, retain_required=False)
    (c2,) = concepts
    assert set(rec["neighbours"]["prompts"]) <= set(c2.retain_prompts) and set(weights.values()) == {3.0}
    expected = uce_edit(pipe.unet, pipe.text_encoder, pipe.tokenizer, c2.forget_prompts,
                        [c2.anchor_for(i) for i in range(len(c2.forget_prompts))], c2.retain_prompts, UCEConfig(),
                        preserve_weights=weights)
    got = load_run_weights(run)
    assert expected and all(torch.equal(got[k], v) for k, v in expected.items())
    # no pool: a warning and an edit without an automatic preserve set, not an error
    cfg2 = EraseConfig.from_dict({**cfg.to_dict(), "auto": {**auto.to_dict(), "retain_pool": str(tmp_path / "none.txt"),
                                                            "neighbours": 0, "augment_forget": 0}})
    assert read_run(erase(cfg2, tmp_path / "run2"))["auto"]["concepts"]["red"]["retain"]["skipped"]
