"""`accelerate launch --multi_gpu --num_processes 2` on CPU (gloo): erase and eval generate on the tiny pipeline.

What holds for a two-process erase: both ranks train rank 0's mask, the main process alone writes the run, weights
outside the mask stay bit-identical, and the same command gives bit-identical weights again (each rank draws its
own batches, so it is not the single-process result: the effective batch is processes x batch size). A failure
on one rank, or a signal to one rank, ends both; a signal checkpoints first so the run resumes.
"""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

pytestmark = pytest.mark.slow

PLUGINS = Path(__file__).resolve().parent / "plugins"


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_"))}
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONPATH=os.pathsep.join([str(PLUGINS), env.get("PYTHONPATH", "")]),
               SALUN_ERASURE_PLUGINS="dist_probe", PROBE_DIR=str(tmp_path), **extra)
    return env


def _launch(module: str, args: list[str], env: dict, cwd: Path, port: int) -> subprocess.Popen:
    # on a machine without a GPU, --multi_gpu starts torchrun-style processes that fall back to CPU and gloo
    # (accelerate's --cpu alone runs one process)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(port), "-m", module, *args]
    return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _erase_args(model: Path, out: str, method: str = "salun", steps: int = 3, **flags: str) -> list[str]:
    args = ["erase", "--model", str(model), "--cache-dir", "cache", "--device", "cpu", "--data-steps", "2",
            "--forget-images-per-prompt", "2", "--batch-size", "2", "--steps", str(steps), "--forget-prompt",
            "a red circle", "--anchor-prompt", "a red square", "--retain-prompt", "a blue star",
            "--retain-images-per-prompt", "1", "--mask-ratio", "0.3", "--method", method, "--out", out]
    for k, v in flags.items():
        args += [f"--{k.replace('_', '-')}", v]
    return args


def _finish(p: subprocess.Popen, timeout: float = 420) -> tuple[int, str]:
    out, _ = p.communicate(timeout=timeout)
    return p.returncode, out


def test_two_process_erase_is_reproducible_and_keeps_frozen_weights(tiny_model_dir, tmp_path):
    from erasure import load_mask, load_pipeline, read_run

    for i, out in enumerate(("a", "b")):
        rc, log = _finish(_launch("erasure", _erase_args(tiny_model_dir, out), _env(tmp_path), tmp_path, 29610 + i))
        assert rc == 0, log[-3000:]
    assert not list(tmp_path.glob("*.partial"))
    wa, wb = load_file(str(tmp_path / "a" / "weights.safetensors")), load_file(str(tmp_path / "b" / "weights.safetensors"))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    info = read_run(tmp_path / "a")
    assert len((tmp_path / "a" / "log.jsonl").read_text().splitlines()) == 3 and info["config"]["steps"] == 3
    mask = load_mask(tmp_path / "a" / "mask.safetensors")
    base = dict(load_pipeline(tiny_model_dir, device="cpu").unet.named_parameters())
    moved = 0
    for n, w in wa.items():
        m, p = mask[n], base[n].detach()
        assert torch.equal(p[~m].view(torch.int32), w[~m].view(torch.int32)), n
        moved += int((p[m] != w[m]).sum())
    assert moved > 0


def test_an_error_on_one_rank_ends_both(tiny_model_dir, tmp_path):
    p = _launch("erasure", _erase_args(tiny_model_dir, "run", method="probe-fail"), _env(tmp_path, PROBE_FAIL_RANK="1"),
                tmp_path, 29620)
    rc, log = _finish(p)
    assert rc != 0 and "probe failure on rank 1" in log
    assert not (tmp_path / "run").exists()
    for f in tmp_path.glob("rank*.pid"):  # no rank is left running
        with pytest.raises(ProcessLookupError):
            os.kill(int(f.read_text()), 0)


def test_a_signal_to_one_rank_checkpoints_and_stops_both(tiny_model_dir, tmp_path):
    args = _erase_args(tiny_model_dir, "run", method="probe-slow", steps=40, checkpoint_every="1000")
    p = _launch("erasure", args, _env(tmp_path, PROBE_SLEEP="0.3"), tmp_path, 29630)
    deadline = time.time() + 300
    while time.time() < deadline and not (tmp_path / "run.partial" / "log.jsonl").is_file():
        time.sleep(0.5)
    time.sleep(2)
    assert (tmp_path / "rank1.pid").is_file()
    os.kill(int((tmp_path / "rank1.pid").read_text()), signal.SIGTERM)  # rank 1 only
    rc, log = _finish(p)
    assert rc != 0 and "cancelled at step" in log, log[-3000:]
    ck = list((tmp_path / "run.partial").glob("checkpoint-*"))
    assert len(ck) == 1 and int(ck[0].name.split("-")[1]) < 40  # the main process checkpointed the step both stopped at
    rc, log = _finish(_launch("erasure", args, _env(tmp_path, PROBE_SLEEP="0"), tmp_path, 29631))
    assert rc == 0, log[-3000:]
    from erasure import read_run

    assert read_run(tmp_path / "run")["resumed_from_step"] == int(ck[0].name.split("-")[1])


def test_two_process_eval_generate_covers_every_row_once(tiny_model_dir, tmp_path):
    rows = [{"prompt": f"a red circle {i}", "evaluation_seed": str(i)} for i in range(5)]
    with open(tmp_path / "p.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["prompt", "evaluation_seed"])
        w.writeheader()
        w.writerows(rows)
    args = ["generate", "--model", str(tiny_model_dir), "--prompts", "p.csv", "--out", "gen", "--steps", "2"]
    rc, log = _finish(_launch("erasure_eval", args, _env(tmp_path), tmp_path, 29640))
    assert rc == 0, log[-3000:]
    with open(tmp_path / "gen" / "manifest.csv", newline="") as fh:
        manifest = list(csv.DictReader(fh))
    assert sorted(r["prompt"] for r in manifest) == sorted(r["prompt"] for r in rows)
    assert len({r["file"] if "file" in r else r.get("path") for r in manifest}) == 5
