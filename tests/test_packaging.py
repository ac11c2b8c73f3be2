"""The install works outside the checkout: a built wheel carries every module and the package data, installs
nothing generic at the top level, and finds its presets, prompt sets and embedded models from any folder."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE_FOLDERS = {"erasure": "erasure", "app": "erasure_app", "eval": "erasure_eval", "models": "erasure_models",
                   "prompts": "erasure_prompts"}


def _tree_files(folder: str, suffixes: tuple[str, ...]) -> set[str]:
    base = ROOT / folder
    return {p.relative_to(base).as_posix() for p in base.rglob("*") if p.is_file() and p.suffix in suffixes
            and "__pycache__" not in p.parts and "_train" not in p.parts}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    src = tmp_path_factory.mktemp("src") / "salun-erasure"  # build a copy: setuptools leaves build/ in the source tree
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".git", "build", "dist", ".venv", "runs", "__pycache__",
                                                             "*.egg-info", "test-artifacts", "_train", ".gl", ".whl"))
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(out), str(src)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    (whl,) = out.glob("salun_erasure-*.whl")
    return whl


def test_wheel_has_every_module_and_data_file(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert tops == set(PACKAGE_FOLDERS.values()), tops  # nothing generic (app, eval) at the top of site-packages
    for folder, package in PACKAGE_FOLDERS.items():
        suffixes = (".py",) if folder in ("erasure", "app", "eval") else (".py", ".json", ".csv", ".safetensors")
        missing = sorted(f"{folder}/{f}" for f in _tree_files(folder, suffixes) if f"{package}/{f}" not in names)
        assert not missing, f"not in the wheel (add the package to pyproject's list): {missing[:5]}"
    assert "erasure_models/shapes-sd/unet/diffusion_pytorch_model.safetensors" in names
    assert "erasure_models/shapes-ddpm/unet/diffusion_pytorch_model.safetensors" in names
    assert "erasure_prompts/presets/shape_circle.json" in names
    assert "erasure_eval/protocols/shapes.json" in names  # the evaluation protocols travel with the package


def test_installed_wheel_runs_from_another_folder(wheel, tmp_path):
    site = tmp_path / "site"
    r = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-compile", "--target",
                        str(site), str(wheel)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    probe = (
        "import erasure, erasure_app, erasure_eval, json\n"
        "from erasure.presets import list_presets, load_preset\n"
        "from erasure.shapes import default_model_path, default_judge_path\n"
        "from erasure.resources import prompt_file\n"
        "print(json.dumps({'erasure': erasure.__file__, 'app': erasure_app.__file__, 'model': str(default_model_path()),\n"
        " 'model_ok': (default_model_path() / 'unet' / 'config.json').is_file(), 'judge_ok': default_judge_path().is_file(),\n"
        " 'presets': list_presets(), 'circle': load_preset('shape_circle').concept.name,\n"
        " 'shapes_csv': prompt_file('shapes.csv').is_file()}))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(site)}
    env.pop("SALUN_PRESETS_DIR", None)
    r = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    import json

    info = json.loads(r.stdout.strip().splitlines()[-1])
    for key in ("erasure", "app", "model"):
        assert info[key].startswith(str(site)), (key, info[key])  # the installed copy, not the checkout
    assert info["model_ok"] and info["judge_ok"] and info["shapes_csv"]
    assert "shape_circle" in info["presets"] and info["circle"] == "circle"
    # the console entry point runs from the installed copy, and says how it chose its threads
    r = subprocess.run([sys.executable, "-m", "erasure", "--help"], cwd=tmp_path, env=env, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0 and "OMP_NUM_THREADS" in r.stdout, r.stderr[-1000:]


def test_configure_threads_respects_the_user():
    from erasure.threads import configure_threads, default_threads

    env: dict[str, str] = {}
    set_ = configure_threads(env, cpu_count=2)
    assert env["OMP_NUM_THREADS"] == "1" and env["OMP_WAIT_POLICY"] == "PASSIVE" and set_ == env
    env = {"OMP_NUM_THREADS": "3"}
    configure_threads(env, cpu_count=16)
    assert env["OMP_NUM_THREADS"] == "3" and "MKL_NUM_THREADS" not in env and env["OMP_WAIT_POLICY"] == "PASSIVE"
    env = {"OMP_WAIT_POLICY": "ACTIVE"}
    configure_threads(env, cpu_count=16)
    assert env["OMP_WAIT_POLICY"] == "ACTIVE" and env["OMP_NUM_THREADS"] == str(default_threads(16)) == "8"


def test_entry_points_set_threads_before_torch():
    code = ("import sys; from erasure.threads import run_entry_point;\n"
            "import erasure.cli as c; c.main = lambda: print(sys.modules.get('torch') is None, __import__('os').environ['OMP_WAIT_POLICY']) or 0\n"
            "run_entry_point('erasure.cli:main')")
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert r.stdout.split() == ["True", "PASSIVE"], r.stderr


def test_output_piped_into_a_reader_that_stops_ends_quietly():
    code = ("from erasure.threads import run_entry_point\n"
            "import erasure.cli as c\n"
            "def lots():\n"
            "    for i in range(100000):\n"
            "        print('line', i, flush=True)\n"
            "    return 0\n"
            "c.main = lots\n"
            "raise SystemExit(run_entry_point('erasure.cli:main'))")
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert p.stdout.readline().startswith(b"line 0")
    p.stdout.close()  # the reader stops, as `| head -1` does
    err = p.stderr.read().decode()
    assert p.wait(timeout=60) == 141 and "Traceback" not in err and "BrokenPipe" not in err, err
