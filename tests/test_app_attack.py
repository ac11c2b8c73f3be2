"""The app's "Attack this run": a tracked job with progress and Cancel, results read back, the /attack endpoint."""

from __future__ import annotations

import threading

import pytest

from erasure_app.attack_service import run_attack_job
from erasure_app.service import AppError, AppService, JobCancelled

FAST = dict(steps=2, batch_size=2, forget_images_per_prompt=2, retain_images_per_prompt=2, data_steps=2)


class HashJudge:
    """Stands in for the shapes judge: 'circle' for about one image in three (a function of the pixels)."""

    fingerprint = "hash-judge"

    def predict(self, images):
        import numpy as np

        return [{"shape": "circle" if int(np.asarray(im, dtype=np.int64).sum()) % 3 == 0 else "square",
                 "shape_conf": 0.9, "color": "red", "color_conf": 0.9, "fill": "solid", "fill_conf": 0.9}
                for im in images]


@pytest.fixture(scope="module")
def service(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("app-attack")
    s = AppService(model=str(tiny_model_dir), runs_dir=root / "runs", device="cpu", data_cache_dir=str(root / "c"),
                   judge="shapes")
    s._judge_obj = HashJudge()
    s.erase(s.make_config("circle", "a red circle", "a red square", "a blue star", **FAST), "no-circle")
    return s


KNOBS = {"timesteps": 3, "iterations": 2, "prefix_length": 2}


def test_attack_job_reports_progress_and_returns_both_models_images(service):
    events = []
    res = run_attack_job(service, "no-circle", "a photo of a circle", 4, "unlearndiffatk", KNOBS, steps=2,
                         progress=events.append)
    assert res["prompt"] == "a photo of a circle" and res["seed"] == 4
    assert set(res["images"]) == {"original", "pre", "post"}
    assert res["success_pre"] or res["adv_prompt"].endswith("a photo of a circle")
    assert events and events[-1].done == events[-1].total
    assert service.job_status()["last"].startswith("attack of run 'no-circle' finished")
    # the same attack again is read back from the run folder, not recomputed
    again = run_attack_job(service, "no-circle", "a photo of a circle", 4, "unlearndiffatk", KNOBS, steps=2,
                           progress=events.append)
    assert again == res


def test_attack_cancel_and_bad_input(service):
    with pytest.raises(AppError, match="saved run"):
        run_attack_job(service, "original", "a circle", 0)
    with pytest.raises(AppError, match="prompt"):
        run_attack_job(service, "no-circle", "  ", 0)
    with pytest.raises(AppError, match="unknown attack"):
        run_attack_job(service, "no-circle", "a circle", 0, "nope")
    started = threading.Event()

    def progress(ev):
        started.set()
        service.cancel(run="no-circle")

    with pytest.raises(JobCancelled):
        run_attack_job(service, "no-circle", "a dotted circle", 7, "random", {"timesteps": 50}, steps=2,
                       progress=progress)
    assert started.is_set() and not service.job_status()["running"]


def test_attack_endpoint_is_named(service):
    from erasure_app.main import create_demo

    demo = create_demo(service)
    names = {d.get("api_name") for d in demo.config["dependencies"]}
    assert "attack" in names
