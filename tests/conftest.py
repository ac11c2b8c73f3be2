"""Shared fixtures: offline environment, a tiny random SD pipeline folder, and the slow/weights/gpu markers."""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch: busy-waiting OpenMP is slow on shared CPUs
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("DISABLE_TELEMETRY", "1")

import pytest  # noqa: E402


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


@pytest.hookimpl(trylast=True)  # after -m/-k deselection: torch is imported only when a gpu test is selected
def pytest_collection_modifyitems(config, items):
    """``slow`` tests run (deselect them with ``-m "not slow"``); ``weights`` tests run only with RUN_WEIGHTS=1 or
    their weights variable set (``@pytest.mark.weights("ENV_VAR")``), never under CI=true; ``gpu`` tests run only
    with CUDA."""
    cuda = None
    ci = os.environ.get("CI", "").lower() in ("1", "true")
    for item in items:
        w = item.get_closest_marker("weights")
        if w is not None and ci:
            item.add_marker(pytest.mark.skip(reason="needs real weights: never run in CI"))
            continue
        if w is not None and os.environ.get("RUN_WEIGHTS") != "1":
            env = [v for v in w.args if os.environ.get(v)]
            if not env:
                names = "".join(f" or {v}" for v in w.args)
                item.add_marker(pytest.mark.skip(reason=f"needs real weights: set RUN_WEIGHTS=1{names}"))
                continue
        if item.get_closest_marker("gpu") is not None:
            if cuda is None:
                cuda = _cuda_available()
            if not cuda:
                item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU (torch.cuda.is_available() is False)"))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A ~1 MB random Stable Diffusion pipeline folder (128 px images), built once per session."""
    from erasure.diffusion.tiny import build_tiny_pipeline

    d = tmp_path_factory.mktemp("tiny-sd") / "pipe"
    build_tiny_pipeline(d)
    return d


@pytest.fixture(scope="session")
def shared_data_dir():
    """../shared/data beside the repository, or skip."""
    from pathlib import Path

    d = Path(__file__).resolve().parents[1].parent / "shared" / "data"
    if not d.is_dir():
        pytest.skip("reference data ../shared/data is absent")
    return d


@pytest.fixture
def pixel_tune_judge(monkeypatch, tmp_path):
    """``(judge_name, pool_file)`` for ``--tune`` tests on a random pipeline: a judge whose forget rate is read off
    the pixels (so candidates score differently, deterministically; retain always 100) and a 5-caption pool file."""
    import numpy as np

    from erasure.auto import tune

    class Judge:
        name = "fake-pixels"

        def forget_rate(self, images, prompts, concept):
            return [100.0 - float(np.asarray(im.convert("L")).std()) for im in images]

        def retain_score(self, images, prompts):
            return [100.0 for _ in images]

    monkeypatch.setitem(tune.JUDGES, Judge.name, Judge)
    pool = tmp_path / "pool.txt"
    pool.write_text("a red circle in the sky\na photo of a red circle\na blue star\na green heart\na yellow cross\n")
    return Judge.name, pool
