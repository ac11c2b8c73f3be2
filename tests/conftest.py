"""Shared fixtures: offline environment, a tiny random SD pipeline folder, and markers."""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch: busy-waiting OpenMP is slow on shared CPUs
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("DISABLE_TELEMETRY", "1")

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if os.environ.get("RUN_SLOW") == "1":
        return
    skip = pytest.mark.skip(reason="slow/gpu test: set RUN_SLOW=1")
    for item in items:
        if "slow" in item.keywords or "gpu" in item.keywords:
            item.add_marker(skip)


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
