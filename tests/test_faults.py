"""Fault injection: kill -9 and SIGTERM at each stage of ``erasure erase`` and ``erasure-eval generate``, then
re-run the same command and compare with an uninterrupted run (tensors and pixels, not file bytes).

Each interrupted command is the CLI's ``main`` in a forked child of the test process (the same code as
``python -m erasure erase``, without paying the ~10 s torch/diffusers import per run on a loaded CPU); one
test runs the real ``python -m erasure erase`` to check SIGTERM's exit code. Stages are detected from files
appearing; the ``fault_probe`` plugin (tests/plugins) sleeps to widen the windows.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from erasure.cli import main as erasure_main
from erasure_eval.cli import main as eval_main

PLUGINS = Path(__file__).parent / "plugins"

FORGET = "a photo of a circle"
SLOW = {"FAULT_SAVE_SLEEP": "0.4", "FAULT_STEP_SLEEP": "0.7", "FAULT_PUBLISH_SLEEP": "3"}
DEAD_PID = 2**22 + 12345  # above Linux's pid_max default: a temp file of a writer that is surely gone


def _erase_argv(model, cache, out):
    return ["erase", "--model", str(model), "--device", "cpu", "--cache-dir", str(cache), "--forget-prompt", FORGET,
            "--anchor-prompt", "a red square", "--retain-prompt", "a blue star", "--forget-images-per-prompt", "6",
            "--retain-images-per-prompt", "4", "--data-steps", "2", "--steps", "4", "--checkpoint-every", "2",
            "--batch-size", "2", "--mask-batches", "1", "--method", "fault-slow", "--out", str(out)]


def _fork(main, argv, log: Path, slow: bool) -> int:
    """Run ``main(argv)`` in a forked child (stderr to ``log``); returns its pid."""
    pid = os.fork()
    if pid == 0:  # child: never return into pytest
        rc = 1
        try:
            fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
            os.dup2(fd, 2)
            os.dup2(fd, 1)
            sys.stdout = sys.stderr = open(fd, "w", buffering=1, closefd=False)  # not pytest's capture objects
            for s in (signal.SIGINT, signal.SIGTERM):
                signal.signal(s, signal.SIG_DFL)
            os.environ.update(SLOW if slow else {k: "0" for k in SLOW})
            torch.set_num_threads(1)  # the parent's OpenMP pool does not survive fork
            sys.path.insert(0, str(PLUGINS))
            import fault_probe  # registers fault-slow in this child only (the suite's registry stays as it is)

            fault_probe.patch()
            rc = main(argv)
        except BaseException:  # noqa: BLE001 - report and exit
            import traceback

            traceback.print_exc()
        finally:
            os._exit(rc if isinstance(rc, int) else 1)
    return pid


def _wait(pid: int, timeout: float = 120) -> int:
    t0 = time.time()
    while time.time() - t0 < timeout:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.05)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    raise AssertionError("child did not finish")


def _kill_when(pid: int, ready, sig: int, log: Path, timeout: float = 120) -> int:
    """Send ``sig`` once ``ready()`` is true; returns the child's exit code (negative: killed by a signal)."""
    t0 = time.time()
    while not ready():
        done, status = os.waitpid(pid, os.WNOHANG)
        assert not done, f"finished before the stage was reached:\n{log.read_text()[-3000:]}"
        assert time.time() - t0 < timeout, "stage not reached"
        time.sleep(0.02)
    os.kill(pid, sig)
    return _wait(pid)


def _pngs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*.png") if not p.name.startswith("."))


def _weights(run: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(run / "weights.safetensors"))


def _same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> list[str]:
    assert a.keys() == b.keys()
    return [k for k in a if not torch.equal(a[k], b[k])]


@pytest.fixture(scope="module")
def reference_run(tiny_model_dir, tmp_path_factory):
    """An uninterrupted erase (fresh cache)."""
    tmp = tmp_path_factory.mktemp("fault-ref")
    pid = _fork(erasure_main, _erase_argv(tiny_model_dir, tmp / "cache", tmp / "run"), tmp / "log.txt", slow=False)
    assert _wait(pid) == 0, (tmp / "log.txt").read_text()[-3000:]
    return tmp / "run"


def _stale_temp(folder: Path) -> Path:
    """A temp file as a killed writer leaves it (atomic_path's name, with a dead writer's pid)."""
    folder.mkdir(parents=True, exist_ok=True)
    from erasure.io import temp_prefix

    p = folder / f"{temp_prefix('leftover.png', DEAD_PID)}abc123.tmp.png"
    p.write_bytes(b"\x89PNG half-written")
    return p


def test_erase_kill9_at_each_stage_then_resume_matches_uninterrupted(tiny_model_dir, tmp_path, reference_run):
    cache, out = tmp_path / "cache", tmp_path / "run"
    part = out.with_name("run.partial")
    argv, log = _erase_argv(tiny_model_dir, cache, out), tmp_path / "log.txt"
    stages = [
        ("Df/Dr generation, 3 of 10 images written", lambda: len(_pngs(cache)) >= 3),
        ("mask saved, before the first checkpoint", lambda: (part / "mask.safetensors").is_file()),
        ("fine-tuning, between checkpoints", lambda: (part / "latest_checkpoint").is_file()),
        ("saving, before the rename", lambda: (part / "weights.safetensors").is_file()),
    ]
    for name, ready in stages:
        rc = _kill_when(_fork(erasure_main, argv, log, slow=True), ready, signal.SIGKILL, log)
        assert rc == -signal.SIGKILL, name
        assert not out.exists(), name
    leftover = _stale_temp(next((cache / "images").iterdir()))
    _stale_temp(part)  # a kill while writing weights or a checkpoint leaves these in the partial folder
    (part / ".checkpoint-3.tmp").mkdir()
    assert _wait(_fork(erasure_main, argv, log, slow=False)) == 0, log.read_text()[-3000:]
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]
    differ = _same_tensors(_weights(out), _weights(reference_run))
    assert not differ, f"{len(differ)} tensors differ from the uninterrupted run, e.g. {differ[:3]}"
    assert not part.exists() and not leftover.exists()
    assert not [p for p in cache.rglob("*") if ".tmp" in p.name]


def test_erase_sigterm_at_each_stage_then_resume_matches_uninterrupted(tiny_model_dir, tmp_path, reference_run):
    cache, out = tmp_path / "cache", tmp_path / "run"
    part = out.with_name("run.partial")
    argv, log = _erase_argv(tiny_model_dir, cache, out), tmp_path / "log.txt"

    def checkpoint_at(step):
        f = part / "latest_checkpoint"
        return lambda: f.is_file() and int(f.read_text().strip().rsplit("-", 1)[-1] or 0) >= step

    # SIGTERM during Df/Dr generation stops after the image batch in progress (exit 130); the images stay cached
    rc = _kill_when(_fork(erasure_main, argv, log, slow=True), lambda: len(_pngs(cache)) >= 3, signal.SIGTERM, log)
    assert rc == 130 and not checkpoint_at(1)() and len(_pngs(cache)) >= 3, log.read_text()[-3000:]
    assert "cancelled while generating" in log.read_text()
    # during training it checkpoints at the end of the step in progress and exits 130
    rc = _kill_when(_fork(erasure_main, argv, log, slow=True), checkpoint_at(2), signal.SIGTERM, log)
    assert rc == 130 and not out.exists()
    rc = _kill_when(_fork(erasure_main, argv, log, slow=True), lambda: (part / "weights.safetensors").is_file(),
                    signal.SIGTERM, log)
    assert rc in (0, 130)  # training is over: the run may finish
    if rc == 130:
        assert _wait(_fork(erasure_main, argv, log, slow=False)) == 0
    differ = _same_tensors(_weights(out), _weights(reference_run))
    assert not differ, f"{len(differ)} tensors differ from the uninterrupted run, e.g. {differ[:3]}"
    assert not part.exists()


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["kill9", "sigterm"])
def test_eval_generate_killed_then_resumed_is_bit_identical(tiny_model_dir, tmp_path, sig):
    from PIL import Image

    csv = tmp_path / "p.csv"
    csv.write_text("case_number,prompt,evaluation_seed\n" + "".join(
        f"{i},{p},{10 + i}\n" for i, p in enumerate(["a photo of a circle", "a red square", "a blue star",
                                                      "a green triangle", "a circle on grass"])))

    def argv(out):
        return ["generate", "--model", str(tiny_model_dir), "--device", "cpu", "--prompts", str(csv), "--steps", "2",
                "--batch-size", "4", "--out", str(out)]

    log = tmp_path / "log.txt"
    assert _wait(_fork(eval_main, argv(tmp_path / "ref"), log, slow=False)) == 0, log.read_text()[-3000:]
    out = tmp_path / "resumed"
    rc = _kill_when(_fork(eval_main, argv(out), log, slow=True), lambda: len(_pngs(out / "images")) >= 2, sig, log)
    assert rc == -sig
    assert len(_pngs(out / "images")) < 5
    leftover = _stale_temp(out / "images")
    assert _wait(_fork(eval_main, argv(out), log, slow=False)) == 0, log.read_text()[-3000:]
    ref, got = _pngs(tmp_path / "ref" / "images"), _pngs(out / "images")
    assert [p.name for p in ref] == [p.name for p in got] and len(ref) == 5
    differ = {a.name: int((np.asarray(Image.open(a)) != np.asarray(Image.open(b))).sum()) for a, b in zip(ref, got)}
    assert not {k: v for k, v in differ.items() if v}, "pixel values that differ from the uninterrupted run"
    assert not leftover.exists() and not [p for p in out.rglob("*") if ".tmp" in p.name]


def test_real_cli_sigterm_checkpoints_and_exits_130(tiny_model_dir, tmp_path):
    """The installed entry point (``python -m erasure erase``): SIGTERM mid-training -> checkpoint, exit 130."""
    out = tmp_path / "run"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(PLUGINS), os.environ.get("PYTHONPATH", "")]),
               SALUN_ERASURE_PLUGINS="fault_probe", FAULT_STEP_SLEEP="1", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    proc = subprocess.Popen([sys.executable, "-m", "erasure", *_erase_argv(tiny_model_dir, tmp_path / "cache", out)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    t0 = time.time()
    while not (out.with_name("run.partial") / "mask.safetensors").is_file():
        assert proc.poll() is None and time.time() - t0 < 180, proc.stderr.read()[-3000:] if proc.stderr else ""
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    err = proc.communicate(timeout=120)[1]
    assert proc.returncode == 130, err[-3000:]
    assert "re-run" in err
    assert (out.with_name("run.partial") / "latest_checkpoint").is_file() and not out.exists()


def test_clean_stale_temps_keeps_live_writers_and_recent_files_of_other_hosts(tmp_path):
    from erasure.io import FOREIGN_TEMP_AGE_S, clean_stale_temps, temp_prefix

    dead = tmp_path / f"{temp_prefix('a.png', DEAD_PID)}x.tmp.png"
    live = tmp_path / f"{temp_prefix('b.png')}x.tmp.png"  # this process: a writer still at work
    other = tmp_path / ".c.png.otherhost-7.x.tmp.png"  # another machine writing into a shared folder
    old_other = tmp_path / ".d.png.otherhost-7.x.tmp.png"
    user = tmp_path / "notes.tmp"  # not a temp name of ours
    for p in (dead, live, other, old_other, user):
        p.write_bytes(b"x")
    os.utime(old_other, (time.time() - FOREIGN_TEMP_AGE_S - 60,) * 2)
    assert clean_stale_temps(tmp_path) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, other.name, user.name])
