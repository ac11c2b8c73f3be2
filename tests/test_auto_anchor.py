"""The automatic anchor (erasure.auto.anchor): a concept given without an anchor prompt is remapped to its nearest
vocabulary term of the same kind, or to the empty prompt; the run records the choice."""

from __future__ import annotations

import pytest
import torch

from erasure import ConceptSpec, EraseConfig, read_run
from erasure.auto.anchor import choose_anchor, with_anchor
from erasure.auto.config import AutoConfig
from erasure.auto.text import embed
from erasure.cli import main as cli_main


@pytest.fixture(scope="module")
def shapes_pipe():
    from erasure.diffusion.pipeline import load_pipeline

    return load_pipeline("default", device="cpu")


@pytest.mark.parametrize("name,forget,word,kind_terms", [
    ("triangle", "a triangle", "triangle", ["circle", "square", "star", "heart", "cross"]),
    ("yellow", "a yellow shape", "yellow", ["red", "green", "blue", "purple", "orange"]),
])
def test_nearest_anchor_is_the_most_similar_swap(shapes_pipe, name, forget, word, kind_terms):
    from erasure.auto.text import swap_word

    c = ConceptSpec(name=name, forget_prompts=[forget, f"a photo of {forget[2:]}", "something pointy"])
    anchors, rec = choose_anchor(shapes_pipe, c, "nearest", "shapes", "default")
    swaps = [swap_word(forget, word, t) for t in kind_terms]
    sims = (embed(shapes_pipe, swaps) @ embed(shapes_pipe, [forget]).T).squeeze(1)
    best = kind_terms[int(sims.argmax())]
    assert rec["term"] == best and rec["replaces"] == word and rec["similarity"] == pytest.approx(float(sims.max()),
                                                                                                  abs=1e-4)
    assert anchors[0] == swap_word(forget, word, best) and anchors[1] == swap_word(c.forget_prompts[1], word, best)
    assert anchors[2] == anchors[0]  # a prompt without the word takes the first prompt's anchor
    assert [x["similarity"] for x in rec["candidates"]] == sorted((x["similarity"] for x in rec["candidates"]),
                                                                  reverse=True)
    assert name not in [x["term"] for x in rec["candidates"]]


def test_embedded_model_choices(shapes_pipe):
    """What the bench measured (bench/results/auto_erase_anchor.md): the nearest shape of a triangle is a star, the
    nearest colour of yellow is orange."""
    for name, forget, expected in (("triangle", "a triangle", "a star"), ("yellow", "a yellow shape", "an orange shape")):
        c = ConceptSpec(name=name, forget_prompts=[forget])
        assert choose_anchor(shapes_pipe, c, "nearest", "shapes", "default")[0] == [expected]


def test_no_vocabulary_word_empty_rule_and_given_anchor(shapes_pipe, tmp_path):
    c = ConceptSpec(name="spaceship", forget_prompts=["a spaceship"])
    anchors, rec = choose_anchor(shapes_pipe, c, "nearest", "shapes", "default")
    assert anchors == [""] and "no concept word" in rec["fallback"]
    missing = tmp_path / "none.txt"
    anchors, rec = choose_anchor(shapes_pipe, ConceptSpec(name="star", forget_prompts=["a star"]), "nearest",
                                 str(missing), "default")
    assert anchors == [""] and "no such file" in rec["fallback"]
    assert choose_anchor(shapes_pipe, c, "empty", "shapes", "default")[0] == [""]
    with pytest.raises(ValueError, match="anchor_rule"):
        choose_anchor(shapes_pipe, c, "none", "shapes", "default")
    given = ConceptSpec(name="star", forget_prompts=["a star"], anchor_prompts=["a circle"])
    assert with_anchor(shapes_pipe, given, "nearest", "shapes", "default") == (given, None)


def test_an_anchor_is_required_unless_a_rule_chooses(tiny_model_dir):
    c = ConceptSpec(name="c", forget_prompts=["a red circle"], retain_prompts=["a blue star"])
    with pytest.raises(ValueError, match="--anchor-prompt"):
        c.anchor_for(0)
    with pytest.raises(ValueError, match="--anchor-prompt"):
        EraseConfig(model=str(tiny_model_dir), concepts=[c])
    cfg = EraseConfig(model=str(tiny_model_dir), concepts=[c], auto=AutoConfig(anchor_rule="nearest"))
    assert EraseConfig.from_json(cfg.to_json()) == cfg
    with pytest.raises(ValueError):
        AutoConfig(anchor_rule="farthest")


def test_cli_without_anchor_one_line_error(tiny_model_dir, tmp_path, capsys):
    rc = cli_main(["erase", "--model", str(tiny_model_dir), "--device", "cpu", "--out", str(tmp_path / "run"),
                   "--forget-prompt", "a red circle", "--retain-prompt", "a blue star"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "--anchor-prompt" in err and "--anchor-rule" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "run").exists()


def test_engine_erases_towards_the_chosen_anchor(tiny_model_dir, tmp_path):
    """UCE without an anchor prompt: the run records the nearest colour, the neighbours exclude it, and the weights
    are the edit towards it by hand."""
    from erasure import erase
    from erasure.auto.prepare import prepare_concepts
    from erasure.diffusion.methods.uce import UCEConfig, uce_edit
    from erasure.diffusion.pipeline import load_pipeline
    from erasure.runs import load_run_weights

    c = ConceptSpec(name="red", forget_prompts=["a red shape"], retain_prompts=["a green star"])
    auto = AutoConfig(anchor_rule="nearest", vocabulary="shapes", neighbours=2)
    cfg = EraseConfig(model=str(tiny_model_dir), concepts=[c], method="uce", auto=auto, cache_dir=str(tmp_path / "c"))
    run = erase(cfg, tmp_path / "run")
    info = read_run(run)
    rec = info["auto"]["concepts"]["red"]
    assert info["config"]["concepts"][0]["anchor_prompts"] == []  # the user's config, as given
    term = rec["anchor"]["term"]
    assert rec["anchor"]["prompts"] == [f"{'an' if term[0] in 'aeiou' else 'a'} {term} shape"]
    assert term not in [n["term"] for n in rec["neighbours"]["terms"]]
    pipe = load_pipeline(tiny_model_dir, device="cpu")
    (c2,), weights, _ = prepare_concepts(cfg, pipe, str(tiny_model_dir), True, retain_required=False)
    assert c2.anchor_prompts == rec["anchor"]["prompts"]
    expected = uce_edit(pipe.unet, pipe.text_encoder, pipe.tokenizer, c2.forget_prompts, c2.anchor_prompts,
                        c2.retain_prompts, UCEConfig(), preserve_weights=weights)
    got = load_run_weights(run)
    assert expected and all(torch.equal(got[k], v) for k, v in expected.items())


def test_app_custom_form_without_anchor(tmp_path):
    from erasure_app.service import AppService

    service = AppService(model="default", runs_dir=tmp_path / "runs", device="cpu", judge="none")
    cfg = service.make_config("", "a triangle", "", "")
    assert cfg.concepts[0].anchor_prompts == [] and cfg.auto.anchor_rule == "nearest"
    md = service.auto_preview("", "a triangle", "", "")
    assert "**Anchor** (none typed): 'a star': star is the shapes world term nearest triangle" in md
    assert "star (" not in md.split("**Neighbours**")[1].split("\n")[0]  # the anchor is not kept as a neighbour


def test_empty_rule_without_preserve_set(tiny_model_dir, tmp_path):
    """A method that reads no retain prompts (UCE with preserve scale 0) still gets its anchor from the rule."""
    from erasure import erase
    from erasure.diffusion.methods.uce import UCEConfig, uce_edit
    from erasure.diffusion.pipeline import load_pipeline
    from erasure.runs import load_run_weights

    c = ConceptSpec(name="red", forget_prompts=["a red shape"])
    cfg = EraseConfig(model=str(tiny_model_dir), concepts=[c], method="uce", method_args={"preserve_scale": 0.0},
                      auto=AutoConfig(anchor_rule="empty"), cache_dir=str(tmp_path / "c"))
    run = erase(cfg, tmp_path / "run")
    assert read_run(run)["auto"]["concepts"]["red"]["anchor"] == {"rule": "empty", "prompts": [""]}
    pipe = load_pipeline(tiny_model_dir, device="cpu")
    expected = uce_edit(pipe.unet, pipe.text_encoder, pipe.tokenizer, ["a red shape"], [""], [],
                        UCEConfig(preserve_scale=0.0))
    got = load_run_weights(run)
    assert expected and all(torch.equal(got[k], v) for k, v in expected.items())
