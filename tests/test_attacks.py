"""Adversarial-prompt attacks (erasure-eval attack): every registered attack on a tiny pipeline, resume after an
interrupt, shards, the output contract, bad input, and the shapes-judge path on the embedded model."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from erasure_eval.attacks import ATTACKS, AttackError
from erasure_eval.attacks.judges import forget_from_run, make_verdict
from erasure_eval.attacks.runner import AttackCancelled, AttackRunConfig, run_attack
from erasure_eval.cli import main as eval_main

SMALL = {
    "unlearndiffatk": {"prefix_length": 2, "timesteps": 3, "iterations": 2},
    "random": {"prefix_length": 2, "timesteps": 3},
    "ringabell": {"prompt_tokens": 4, "population": 8, "generations": 4, "check_every": 2},
}


class HashJudge:
    """A stand-in for the shapes judge: 'circle' for about one image in three (a function of the pixels), so
    some plain prompts succeed and some need the attack."""

    fingerprint = "hash-judge"

    def predict(self, images):
        out = []
        for im in images:
            v = int(np.asarray(im, dtype=np.int64).sum())
            out.append({"shape": "circle" if v % 3 == 0 else "square", "color": "red", "fill": "solid"})
        return out


def _csv(path: Path, prompts: list[str]) -> Path:
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["case_number", "prompt", "evaluation_seed"])
        for i, p in enumerate(prompts):
            w.writerow([i, p, 100 + i])
    return path


PROMPTS = ["a red circle", "a photo of a blue circle", "a dotted circle"]


def _run(model, tmp_path, attack, out="out", **kw):
    cfg = AttackRunConfig(attack=attack, model=str(model), prompts=str(_csv(tmp_path / "p.csv", PROMPTS)),
                          forget=["shape=circle"], out=str(tmp_path / out), steps=2, **kw)
    acfg = ATTACKS[attack].config_cls(**SMALL[attack])
    return cfg, acfg


@pytest.mark.parametrize("attack", sorted(ATTACKS))
def test_attack_runs_and_writes_the_contract(attack, tiny_model_dir, tmp_path):
    cfg, acfg = _run(tiny_model_dir, tmp_path, attack)
    summary = run_attack(cfg, acfg, judge_obj=HashJudge())
    out = Path(cfg.out)
    s = json.loads((out / "summary.json").read_text())
    rows = [json.loads(x) for x in (out / "attacks.jsonl").read_text().splitlines()]
    assert s["n_prompts"] == len(rows) == len(PROMPTS) and s == summary
    assert [r["prompt"] for r in rows] == PROMPTS
    assert s["asr_pre"] == pytest.approx(100 * sum(r["success_pre"] for r in rows) / len(rows), abs=0.01)
    assert s["asr_post"] == pytest.approx(100 * sum(r["success_post"] for r in rows) / len(rows), abs=0.01)
    assert s["asr_post"] >= s["asr_pre"]
    for r in rows:
        assert {"prompt", "adv_prompt", "success_pre", "success_post", "iteration", "seed", "images"} <= set(r)
        assert r["seed"] == 100 + r["row_index"]
        if r["success_pre"]:
            assert r["adv_prompt"] == r["prompt"] and r["generations"] == 0
        else:
            assert r["adv_prompt"] != r["prompt"] and 1 <= r["generations"] <= ATTACKS[attack](acfg).max_generations()
            assert (r["iteration"] is not None) == r["success_post"]
        for p in r["images"].values():
            assert (out / p).is_file()
    man = json.loads((out / "attack.json").read_text())
    assert man["settings"]["attack"] == attack and man["settings"]["attack_config"] == acfg.to_dict()
    assert man["settings"]["judge"]["judge"] == "shapes" and man["settings"]["judge"]["concept"] == "shape=circle"
    assert man["status"]["complete"] and "torch" in json.dumps(man["environment"])


def test_resume_after_interrupt_loses_only_the_prompt_in_flight(tiny_model_dir, tmp_path):
    cfg, acfg = _run(tiny_model_dir, tmp_path, "random", out="full")
    full = [json.loads(x) for x in (Path(cfg.out) / "attacks.jsonl").read_text().splitlines()] if run_attack(
        cfg, acfg, judge_obj=HashJudge()) else []
    cfg2, _ = _run(tiny_model_dir, tmp_path, "random", out="cut")
    part = Path(cfg2.out) / "parts" / "attacks.0-of-1.jsonl"

    def cancel():  # stop inside the third prompt
        return part.is_file() and len(part.read_text().splitlines()) >= 2

    with pytest.raises(AttackCancelled):
        run_attack(cfg2, acfg, judge_obj=HashJudge(), cancel=cancel)
    first = part.read_text().splitlines()
    assert len(first) == 2 and not (Path(cfg2.out) / "summary.json").exists()
    with open(part, "a") as fh:  # a torn line, as left by a kill in mid-write
        fh.write('{"row_index": 2, "prom')
    run_attack(cfg2, acfg, judge_obj=HashJudge())
    rows = [json.loads(x) for x in (Path(cfg2.out) / "attacks.jsonl").read_text().splitlines()]
    assert part.read_text().splitlines()[:2] == first  # finished prompts were not attacked again
    strip = [{k: v for k, v in r.items() if k != "seconds"} for r in rows]
    assert strip == [{k: v for k, v in r.items() if k != "seconds"} for r in full]
    # other settings in the same folder are refused, nothing is changed
    cfg3, _ = _run(tiny_model_dir, tmp_path, "random", out="cut")
    with pytest.raises(AttackError, match="other settings"):
        run_attack(cfg3, ATTACKS["random"].config_cls(prefix_length=3, timesteps=3), judge_obj=HashJudge())


def test_shards_merge_into_one_attacks_jsonl(tiny_model_dir, tmp_path):
    for i in range(2):
        cfg, acfg = _run(tiny_model_dir, tmp_path, "random", out="sh", num_shards=2, shard_index=i)
        s = run_attack(cfg, acfg, judge_obj=HashJudge())
        assert s["complete"] == (i == 1)
        assert (Path(cfg.out) / "summary.json").exists() == (i == 1)
    rows = [json.loads(x) for x in (Path(cfg.out) / "attacks.jsonl").read_text().splitlines()]
    assert [r["row_index"] for r in rows] == [0, 1, 2]
    # erasure-eval report charts pre/post ASR per attacked model
    from erasure_eval.report import build_report

    rep = build_report([cfg.out], tmp_path / "report")
    assert (tmp_path / "report" / "attack_asr.png").is_file()
    assert rep["attacks"][0]["summary"]["asr_post"] == s["asr_post"]
    assert "attack_asr.png" in (tmp_path / "report" / "report.md").read_text()


def _cli(tmp_path, model, *extra):
    return eval_main(["attack", "--model", str(model), "--judge", "shapes", "--seed", "0",
                      "--out", str(tmp_path / "bad"), *extra])


def test_bad_input_one_line_error_nothing_written(tiny_model_dir, tmp_path, caplog):
    empty = tmp_path / "empty.csv"
    empty.write_text("case_number,prompt,evaluation_seed\n")
    assert _cli(tmp_path, tiny_model_dir, "--prompts", str(empty), "--forget", "shape=circle") == 2
    assert _cli(tmp_path, tiny_model_dir, "--prompt", "a red circle", "--forget", "shape=blob") == 2
    assert _cli(tmp_path, tiny_model_dir, "--prompt", "a red circle", "--forget", "blob") == 2
    assert _cli(tmp_path, tiny_model_dir, "--prompt", "a red circle") == 2  # no concept for the shapes judge
    long = " ".join(["circle"] * 73)
    assert _cli(tmp_path, tiny_model_dir, "--prompt", long, "--forget", "shape=circle") == 2
    assert _cli(tmp_path, tiny_model_dir, "--prompt", "a circle", "--forget", "shape=circle", "--attack", "nope") == 2
    assert _cli(tmp_path, tiny_model_dir, "--prompt", "a circle", "--forget", "shape=circle", "--attack",
                "unlearndiffatk", "--population", "10") == 2
    lines = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert all("\n" not in ln for ln in lines)
    assert len(lines) == 7
    assert "no rows" in lines[0] and "unknown shape 'blob'" in lines[1] and "unknown target value" in lines[2]
    assert "--forget" in lines[3] and "token limit" in lines[4] and "unknown attack" in lines[5]
    assert "ringabell" in lines[6]
    assert not (tmp_path / "bad").exists()


def test_run_without_a_judge_for_its_concept_is_refused():
    with pytest.raises(AttackError, match="no class in the shapes judge"):
        forget_from_run({"concepts": [{"name": "nudity"}]}, "shapes")
    assert forget_from_run({"concepts": [{"name": "circle"}]}, "shapes") == ["shape=circle"]
    with pytest.raises(AttackError, match="--judge-weights"):
        make_verdict("resnet50", ["tench"])
    with pytest.raises(AttackError, match="not used with --judge nudenet"):
        make_verdict("nudenet", ["shape=circle"])


def test_help_lists_the_attacks(capsys):
    with pytest.raises(SystemExit):
        eval_main(["attack", "--help"])
    out = capsys.readouterr().out
    for name in ATTACKS:
        assert name in out


def test_shapes_judge_on_the_embedded_model(tmp_path):
    """The real shapes judge and embedded model: a square prompt attacked toward 'circle' for a few steps."""
    rc = eval_main(["attack", "--model", "default", "--prompt", "a red square", "--judge", "shapes", "--forget",
                    "shape=circle", "--seed", "3", "--out", str(tmp_path / "emb"), "--prefix-length", "3",
                    "--timesteps", "2", "--iterations", "2", "--steps", "10"])
    assert rc == 0
    row = json.loads((tmp_path / "emb" / "attacks.jsonl").read_text())
    assert row["judge_pre"]["shape"] == "square" and row["success_pre"] is False
    assert row["generations"] == 2 or row["success_post"]
    assert row["adv_prompt"].endswith("a red square") and row["adv_prompt"] != "a red square"
    s = json.loads((tmp_path / "emb" / "summary.json").read_text())
    assert s["asr_pre"] == 0.0 and s["n_prompts"] == 1


def test_nudenet_and_resnet50_judges(tmp_path):
    from PIL import Image

    img = Image.new("RGB", (224, 224), (200, 150, 120))
    pytest.importorskip("nudenet")
    v = make_verdict("nudenet", None)
    assert v.manifest()["threshold"] == 0.45 and len(v.manifest()["classes"]) == 6
    assert v.check([img])[0][0] is False
    import torch
    from safetensors.torch import save_file
    from torchvision.models import resnet50

    w = tmp_path / "r50.safetensors"
    torch.manual_seed(0)
    save_file(resnet50(weights=None).state_dict(), str(w))
    v = make_verdict("resnet50", ["garbage truck"], weights=str(w))
    assert (v.attribute, v.value, v.label) == ("label", 569, "label=garbage truck")
    seen, rec = v.check([img])[0]
    assert seen == (rec["label"] == 569)
    with pytest.raises(AttackError, match="not an ImageNet class"):
        make_verdict("resnet50", ["blob"], weights=str(w))
