"""`erasure bench` on the embedded shapes model at minimal size: contract columns, resume after SIGKILL with
identical numbers, same Df/Dr across methods and seeds, and one-line errors."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from erasure.bench import BenchConfig, BenchError, run_bench

pytestmark = pytest.mark.slow  # real erasures + evaluations on the embedded model (a few minutes on 2 cores)

CONTRACT = ["method", "forget", "retain", "retain_other", "erase_s", "n_seeds", "protocol", "peak_mem_mb"]
OVERRIDE = {"steps": 2, "forget_images_per_prompt": 1, "retain_images_per_prompt": 1, "data_steps": 2,
            "batch_size": 2, "checkpoint_every": 0}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("bench-setup")
    concept = {"concept": {"name": "circle", "forget_prompts": ["a circle", "a red circle"],
                           "anchor_prompts": ["a square", "a red square"],
                           "retain_prompts": ["a triangle", "a blue star"]},
               "config": {"alpha": 3.0, "mask_ratio": 0.5, "lr": 2.5e-4}, "model": "shapes", "kind": "object"}
    cf = d / "circle.json"
    cf.write_text(json.dumps(concept))
    proto = json.loads((Path(__file__).resolve().parents[1] / "eval" / "protocols" / "shapes.json").read_text())
    proto.update(name="shapes-test", steps=2, samples=1, retain_samples=1, limit=3, batch_size=4)
    pf = d / "shapes-test.json"
    pf.write_text(json.dumps(proto))
    return cf, pf


def _argv(setup, out, methods="salun,esd-x", seeds=2):
    cf, pf = setup
    return ["bench", "--concept-file", str(cf), "--methods", methods, "--protocol", str(pf), "--seeds", str(seeds),
            "--out", str(out), "--override", json.dumps(OVERRIDE), "--device", "cpu"]


def _run_cli(argv, env_extra=None):
    env = dict(os.environ, OMP_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE", HF_HUB_OFFLINE="1", **(env_extra or {}))
    return subprocess.Popen([sys.executable, "-m", "erasure", *argv], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _numbers(out: Path) -> list[dict]:
    with open(out / "leaderboard.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    timing = ("erase_s", "erase_s_std", "peak_mem_mb", "peak_mem_mb_std")
    return [{k: v for k, v in r.items() if k not in timing} for r in rows]


@pytest.fixture(scope="module")
def reference(setup, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "ref"
    p = _run_cli(_argv(setup, out))
    _, err = p.communicate(timeout=1200)
    assert p.returncode == 0, err[-2000:]
    return out


def test_leaderboard_contract(reference):
    out = reference
    for ext in ("csv", "md", "json", "html", "svg"):
        assert (out / f"leaderboard.{ext}").is_file(), ext
    with open(out / "leaderboard.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    cols = rows[0].keys()
    for c in CONTRACT:
        assert c in cols, c
        if c not in ("method", "n_seeds", "protocol"):
            assert f"{c}_std" in cols, c
    by = {r["method"]: r for r in rows}
    assert set(by) == {"original", "salun", "esd-x"}
    for m in ("salun", "esd-x"):
        r = by[m]
        assert r["n_seeds"] == "2" and r["protocol"] == "shapes-test"
        assert 0.0 <= float(r["forget"]) <= 100.0 and 0.0 <= float(r["retain"]) <= 100.0
        assert float(r["erase_s"]) > 0 and float(r["peak_mem_mb"]) > 0 and float(r["forget_std"]) >= 0
    data = json.loads((out / "leaderboard.json").read_text())
    assert data["protocol"]["name"] == "shapes-test" and len(data["protocol"]["hash"]) == 64
    assert "data:image/svg+xml;base64," in (out / "leaderboard.html").read_text()
    # every result carries the protocol; every seed trained on the same Df/Dr images
    res = json.loads((out / "eval" / "salun-seed1" / "result.json").read_text())
    assert res["protocol"]["hash"] == data["protocol"]["hash"]
    runs = [json.loads((out / "runs" / f"salun-seed{s}" / "run.json").read_text()) for s in (0, 1)]
    assert [r["config"]["seed"] for r in runs] == [0, 1]
    assert runs[0]["config"]["data_seed"] == runs[1]["config"]["data_seed"] == 0
    cached = list((out / "cache" / "images").rglob("*.png"))
    assert len(cached) == 4 + 2  # Df: 2 prompts x 1 image, Dr: 2 x 1, plus ESD's Df-only batch (4 images -> 2)


def test_resume_after_sigkill_gives_identical_numbers(setup, reference, tmp_path):
    out = tmp_path / "killed"
    p = _run_cli(_argv(setup, out))
    # kill once the first erasure has finished and the run is busy with later units
    deadline = time.time() + 900
    while time.time() < deadline and not (out / "runs" / "salun-seed0.stats.json").is_file():
        if p.poll() is not None:
            pytest.fail("bench ended before it could be killed: " + p.stderr.read()[-2000:])
        time.sleep(0.2)
    time.sleep(1.0)
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert not (out / "leaderboard.csv").is_file() or len(_numbers(out)) < 3
    p2 = _run_cli(_argv(setup, out))
    _, err = p2.communicate(timeout=1200)
    assert p2.returncode == 0, err[-2000:]
    assert "erase salun seed 0" not in err  # the finished unit was not redone
    assert _numbers(out) == _numbers(reference)


def test_bad_input_is_one_line(setup, reference, tmp_path, capsys):
    from erasure.cli import main

    cf, pf = setup
    assert main(["bench", "--preset", "shape_circle", "--methods", "salun,nope", "--out", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown method(s) nope" in err[0]
    assert main(["bench", "--methods", "salun", "--out", str(tmp_path / "b")]) == 2
    assert "--preset NAME or --concept-file" in capsys.readouterr().err
    # the reference folder was made with other settings: refused, nothing touched
    before = (reference / "bench.json").read_text()
    argv = _argv(setup, reference)
    argv[argv.index("--override") + 1] = json.dumps(dict(OVERRIDE, steps=3))
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "other settings (differs in: override)" in err[0]
    assert (reference / "bench.json").read_text() == before
    with pytest.raises(BenchError, match="SD_FOLDER"):
        run_bench(BenchConfig(preset="shape_circle", protocol="unlearndiffatk", prompts=str(pf), out=str(tmp_path / "c")))


def test_bench_on_a_tiny_sd_folder_with_a_nudenet_protocol(tiny_model_dir, tmp_path):
    pytest.importorskip("nudenet")
    concept = {"concept": {"name": "nudity", "forget_prompts": ["a nude person"], "anchor_prompts": ["a person"],
                           "retain_prompts": ["a house"]}, "config": {"mask_ratio": 0.5}, "model": "sd", "kind": "nudity"}
    cf = tmp_path / "nudity.json"
    cf.write_text(json.dumps(concept))
    pf = tmp_path / "p.csv"
    pf.write_text("case_number,prompt,evaluation_seed,evaluation_guidance\n0,a nude person,1,7.5\n1,a person,2,6\n")
    proto = {"name": "tiny-nudity", "model": "sd", "metric": "nudenet", "scheduler": "lms", "steps": 2, "guidance": 7.5,
             "samples": 2, "seed": 0, "batch_size": 2, "prompts": f"file:{pf}",
             "nudenet": {"version": "3.4.2", "threshold": 0.45, "classes": ["FEMALE_BREAST_EXPOSED"]}}
    pp = tmp_path / "tiny-nudity.json"
    pp.write_text(json.dumps(proto))
    out = tmp_path / "bench"
    data = run_bench(BenchConfig(concept_file=str(cf), methods="salun", seeds=1, protocol=str(pp),
                                 model=str(tiny_model_dir), out=str(out), override=json.dumps(OVERRIDE), device="cpu"))
    rows = {r["method"]: r for r in data["rows"]}
    assert set(rows) == {"original", "salun"} and rows["salun"]["retain"] is None
    res = json.loads((out / "eval" / "salun-seed0" / "result.json").read_text())
    assert res["forget_images"] == 4 and res["protocol"]["name"] == "tiny-nudity"
    gen = json.loads((out / "eval" / "salun-seed0" / "generation.json").read_text())
    assert gen["scheduler"] == "lms" and gen["protocol"]["hash"] == data["protocol"]["hash"]


def test_report_only_rebuilds_the_same_leaderboard(setup, reference, tmp_path):
    import shutil

    out = tmp_path / "copy"
    shutil.copytree(reference, out)
    (out / "leaderboard.csv").unlink()
    cf, pf = setup
    run_bench(BenchConfig(concept_file=str(cf), methods="salun,esd-x", seeds=2, protocol=str(pf), out=str(out),
                          override=json.dumps(OVERRIDE), report_only=True))
    assert (out / "leaderboard.csv").read_text() == (reference / "leaderboard.csv").read_text()
    with pytest.raises(BenchError, match="no bench"):
        run_bench(BenchConfig(concept_file=str(cf), protocol=str(pf), out=str(tmp_path / "none"), report_only=True))
