"""Bad-input table for the command lines: every case exits 2 with one line on stderr and writes nothing.

Each row is (name, argv, text the error must contain). Rows run in-process on the tiny pipeline; most fail
before any model is loaded.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pytest

from erasure.cli import main as erasure_main
from erasure_eval.cli import main as eval_main

FORGET = "a photo of a circle"
PROGRESS_BAR = re.compile(r"^[\w /]+:\s+\d+%\|")  # tqdm stage bars on stderr are not error lines


@pytest.fixture(scope="module")
def env(tiny_model_dir, tmp_path_factory):
    """Input files (good and bad) in ``inputs/``; every command writes under ``work/``."""
    root = tmp_path_factory.mktemp("bad-input")
    inp = root / "inputs"
    inp.mkdir()
    (inp / "list.json").write_text("[1, 2]")
    (inp / "badjson.json").write_text("{oops")
    (inp / "latin1.json").write_bytes('{"name": "caf\xe9"}'.encode("latin-1"))
    (inp / "lr-str.json").write_text(json.dumps({"lr": "1e-4"}))
    (inp / "mask-guidance-str.json").write_text(json.dumps({"mask_guidance": "x"}))
    (inp / "concepts-str.json").write_text(json.dumps({"concepts": "abc"}))
    (inp / "concept-images.json").write_text(json.dumps(
        {"name": "c", "forget_prompts": [FORGET], "anchor_prompts": ["x"], "forget_images": 5}))
    (inp / "trunc.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{")
    (inp / "a-file.txt").write_text("user data\n")
    (inp / "a-dir").mkdir()
    (inp / "a-dir" / "keep.txt").write_text("user data\n")
    (inp / "dir.png").mkdir()
    no_unet = inp / "no-unet"
    shutil.copytree(tiny_model_dir, no_unet)
    shutil.rmtree(no_unet / "unet")
    (inp / "prompts.csv").write_text("prompt\na photo of a circle\n")
    (inp / "seed1e30.csv").write_text("prompt,evaluation_seed\na photo of a circle,1e30\n")
    (inp / "guid.csv").write_text("prompt,evaluation_guidance\na photo of a circle,1e300\n")
    work = root / "work"
    work.mkdir()
    return {"inp": inp, "work": work, "model": str(tiny_model_dir)}


def _erase(e, *extra):
    return ["erase", "--model", e["model"], "--device", "cpu", "--cache-dir", str(e["work"] / "cache"),
            "--forget-prompt", FORGET, "--anchor-prompt", "a red square", "--retain-prompt", "a blue star", "--steps", "2", "--data-steps", "2",
            "--forget-images-per-prompt", "2", "--out", str(e["work"] / "run"), *extra]


def _gen(e, *extra):
    return ["generate", "--model", e["model"], "--device", "cpu", "--prompt", FORGET, "--steps", "2",
            "--out", str(e["work"] / "x.png"), *extra]


def _mask(e, *extra):
    return ["mask", "--model", e["model"], "--device", "cpu", "--cache-dir", str(e["work"] / "cache"),
            "--forget-prompt", FORGET, "--data-steps", "2", "--forget-images-per-prompt", "2", *extra]


def _evalgen(e, *extra, prompts="prompts.csv"):
    return ["generate", "--model", e["model"], "--device", "cpu", "--prompts", str(e["inp"] / prompts),
            "--steps", "2", *extra]


CASES = [
    # erasure erase
    ("erase seed 2**63", "erase", lambda e: _erase(e, "--seed", str(2**63)), "--seed: seed must be >= 0 and <= 9223"),
    ("erase seed -1", "erase", lambda e: _erase(e, "--seed", "-1"), "--seed"),
    ("erase data guidance 1e300", "erase", lambda e: _erase(e, "--data-guidance", "1e300"), "--data-guidance"),
    ("erase mask ratio 2", "erase", lambda e: _erase(e, "--mask-ratio", "2"), "mask ratio"),
    ("erase steps 0", "erase", lambda e: _erase(e, "--steps", "0"), "steps"),
    ("erase lr nan", "erase", lambda e: _erase(e, "--lr", "nan"), "learning rate"),
    ("erase config missing", "erase", lambda e: _erase(e, "--config", f"{e['inp']}/nope.json"), "nope.json"),
    ("erase config list", "erase", lambda e: _erase(e, "--config", f"{e['inp']}/list.json"), "list.json"),
    ("erase config bad json", "erase", lambda e: _erase(e, "--config", f"{e['inp']}/badjson.json"), "badjson.json"),
    ("erase config latin-1", "erase", lambda e: _erase(e, "--config", f"{e['inp']}/latin1.json"), "latin1.json"),
    ("erase config lr string", "erase", lambda e: _erase(e, "--config", f"{e['inp']}/lr-str.json"), "learning rate"),
    ("erase config concepts string", "erase", lambda e: _erase(e, "--config", f"{e['inp']}/concepts-str.json"),
     "concepts"),
    ("erase concept file images 5", "erase",
     lambda e: _erase(e, "--concept-file", f"{e['inp']}/concept-images.json"), "concept-images.json"),
    ("erase concept file latin-1", "erase", lambda e: _erase(e, "--concept-file", f"{e['inp']}/latin1.json"),
     "latin1.json"),
    ("erase concept file bad json", "erase", lambda e: _erase(e, "--concept-file", f"{e['inp']}/badjson.json"),
     "badjson.json"),
    ("erase concept file list of numbers", "erase", lambda e: _erase(e, "--concept-file", f"{e['inp']}/list.json"),
     "list.json"),
    ("erase config mask guidance string", "erase",
     lambda e: _erase(e, "--config", f"{e['inp']}/mask-guidance-str.json"), "mask guidance"),
    ("erase mask path missing", "erase", lambda e: _erase(e, "--mask-path", f"{e['inp']}/nope.safetensors"),
     "nope.safetensors"),
    ("erase mask path truncated", "erase", lambda e: _erase(e, "--mask-path", f"{e['inp']}/trunc.safetensors"),
     "trunc.safetensors"),
    ("erase model missing", "erase", lambda e: _erase(e, "--model", f"{e['inp']}/no-model"), "no-model"),
    ("erase model without unet", "erase", lambda e: _erase(e, "--model", f"{e['inp']}/no-unet"), "unet"),
    ("erase out is a file", "erase", lambda e: _erase(e, "--out", f"{e['inp']}/a-file.txt", "--overwrite"),
     "a-file.txt"),
    ("erase out .partial", "erase", lambda e: _erase(e, "--out", f"{e['work']}/run.partial"), ".partial"),
    # erasure mask
    ("mask out is a dir", "mask", lambda e: _mask(e, "--out", f"{e['inp']}/a-dir", "--overwrite"), "a-dir"),
    ("mask seed 2**63", "mask", lambda e: _mask(e, "--seed", str(2**63), "--out", f"{e['work']}/m.safetensors"),
     "--seed"),
    # erasure generate
    ("generate seed 2**63", "generate", lambda e: _gen(e, "--seed", str(2**63)), "--seed"),
    ("generate seed -1", "generate", lambda e: _gen(e, "--seed", "-1"), "--seed"),
    ("generate guidance 1e300", "generate", lambda e: _gen(e, "--guidance", "1e300"), "--guidance"),
    ("generate guidance nan", "generate", lambda e: _gen(e, "--guidance", "nan"), "--guidance"),
    ("generate steps 0", "generate", lambda e: _gen(e, "--steps", "0"), "--steps"),
    ("generate out is a dir", "generate", lambda e: _gen(e, "--out", f"{e['inp']}/dir.png", "--overwrite"), "dir.png"),
    ("generate out not png", "generate", lambda e: _gen(e, "--out", f"{e['work']}/x.jpg"), "png"),
    ("generate run missing", "generate", lambda e: _gen(e, "--run", f"{e['work']}/no-run"), "no-run"),
    ("generate model without unet", "generate", lambda e: _gen(e, "--model", f"{e['inp']}/no-unet"), "unet"),
    # erasure export
    ("export out is a file", "export",
     lambda e: ["export", "--run", f"{e['work']}/no-run", "--out", f"{e['inp']}/a-file.txt", "--overwrite"],
     "a-file.txt"),
    ("export over user folder", "export",
     lambda e: ["export", "--run", f"{e['work']}/no-run", "--out", f"{e['inp']}/a-dir", "--overwrite"], "a-dir"),
    ("mask out under a file", "mask", lambda e: _mask(e, "--out", f"{e['inp']}/a-file.txt/m.safetensors"),
     "a-file.txt is a file"),
    ("erase out under a file", "erase", lambda e: _erase(e, "--out", f"{e['inp']}/a-file.txt/run"),
     "a-file.txt is a file"),
    ("generate out under a file", "generate", lambda e: _gen(e, "--out", f"{e['inp']}/a-file.txt/x.png"),
     "a-file.txt is a file"),
    # erasure-eval generate, score, report
    ("eval out under a file", "eval", lambda e: _evalgen(e, "--out", f"{e['inp']}/a-file.txt/g"), "a-file.txt is a file"),
    ("score out is a dir", "eval", lambda e: ["score", "--images", f"{e['inp']}/a-dir", "--metric", "nudenet", "--out",
                                              f"{e['inp']}/a-dir"], "a-dir is a folder"),
    ("report out is a file", "eval", lambda e: ["report", f"{e['inp']}/a-dir", "--out", f"{e['inp']}/a-file.txt"],
     "a-file.txt is a file"),
    ("eval out is a file", "eval", lambda e: _evalgen(e, "--out", f"{e['inp']}/a-file.txt"), "a-file.txt"),
    ("eval guidance 1e300", "eval", lambda e: _evalgen(e, "--guidance", "1e300", "--out", f"{e['work']}/g"),
     "--guidance"),
    ("eval seed 2**63", "eval", lambda e: _evalgen(e, "--seed", str(2**63), "--out", f"{e['work']}/g"), "--seed"),
    ("erase esd flag out of range", "erase",
     lambda e: _erase(e, "--method", "esd-x", "--esd-negative-guidance", "1e300"), "--esd-negative-guidance"),
    ("eval samples 0", "eval", lambda e: _evalgen(e, "--samples", "0", "--out", f"{e['work']}/g"), "samples"),
    ("eval prompts missing", "eval", lambda e: _evalgen(e, "--out", f"{e['work']}/g", prompts="nope.csv"),
     "nope.csv"),
    ("eval csv seed 1e30", "eval", lambda e: _evalgen(e, "--out", f"{e['work']}/g", prompts="seed1e30.csv"),
     "seed1e30.csv line 2"),
    ("eval csv guidance 1e300", "eval", lambda e: _evalgen(e, "--out", f"{e['work']}/g", prompts="guid.csv"),
     "guid.csv line 2"),
    ("eval model without unet", "eval",
     lambda e: _evalgen(e, "--model", f"{e['inp']}/no-unet", "--out", f"{e['work']}/g"), "unet"),
]


def _tree(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_size for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("name,cli,argv,needle", CASES, ids=[c[0] for c in CASES])
def test_bad_input_exits_2_with_one_line_and_writes_nothing(env, name, cli, argv, needle, capsys, caplog):
    for p in env["work"].iterdir():  # keep the table rows independent (the Df/Dr cache may stay)
        if p.name != "cache":
            shutil.rmtree(p) if p.is_dir() else os.unlink(p)
    before = _tree(env["inp"])
    capsys.readouterr()
    if cli == "eval":
        rc = eval_main(argv(env))
        lines = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    else:
        rc = erasure_main(argv(env))
        lines = [ln for ln in capsys.readouterr().err.replace("\r", "\n").splitlines()
                 if ln.strip() and not ln.startswith("WARNING") and not PROGRESS_BAR.match(ln)]
    assert rc == 2, name
    assert len(lines) == 1 and "Traceback" not in lines[0], lines
    assert needle in lines[0], lines[0]
    assert "\n" not in lines[0]
    assert _tree(env["inp"]) == before
    leftovers = [p for p in env["work"].rglob("*") if p.name != "cache" and "cache" not in p.relative_to(env["work"]).parts]
    assert not leftovers, leftovers
