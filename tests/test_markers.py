"""The slow / weights / gpu markers of tests/conftest.py, on a throw-away test module run by pytest itself."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

MODULE = '''
import pytest


def test_plain():
    pass

@pytest.mark.slow
def test_slow():
    pass

@pytest.mark.weights("FAKE_WEIGHTS_PATH")
def test_weights():
    pass

@pytest.mark.gpu
def test_gpu():
    pass
'''


def _outcomes(tmp_path: Path, *args: str, **env: str) -> dict[str, str]:
    shutil.copy(REPO / "tests" / "conftest.py", tmp_path / "conftest.py")
    (tmp_path / "test_m.py").write_text(MODULE)
    clean = {k: v for k, v in os.environ.items() if k not in ("RUN_WEIGHTS", "FAKE_WEIGHTS_PATH", "PYTEST_ADDOPTS", "CI")}
    out = subprocess.run(
        [sys.executable, "-m", "pytest", "-v", "-p", "no:cacheprovider", "--strict-markers", "-c",
         str(REPO / "pyproject.toml"), "--rootdir", str(tmp_path), str(tmp_path / "test_m.py"), *args],
        capture_output=True, text=True, env={**clean, **env}, timeout=300,
    )
    assert out.returncode in (0, 5), out.stdout + out.stderr  # --strict-markers: every marker is registered
    return dict(re.findall(r"test_m\.py::(\w+) (PASSED|SKIPPED|FAILED|ERROR)", out.stdout))


def test_slow_runs_by_default_weights_need_a_variable_and_not_ci_gpu_needs_cuda(tmp_path):
    import torch

    gpu = "PASSED" if torch.cuda.is_available() else "SKIPPED"
    assert _outcomes(tmp_path) == {"test_plain": "PASSED", "test_slow": "PASSED", "test_weights": "SKIPPED",
                                   "test_gpu": gpu}
    assert _outcomes(tmp_path, "-m", "not slow and not gpu", FAKE_WEIGHTS_PATH="/models/x") == {
        "test_plain": "PASSED", "test_weights": "PASSED"}
    assert _outcomes(tmp_path, "-m", "weights", RUN_WEIGHTS="1") == {"test_weights": "PASSED"}
    assert _outcomes(tmp_path, "-m", "weights", RUN_WEIGHTS="1", CI="true") == {"test_weights": "SKIPPED"}
