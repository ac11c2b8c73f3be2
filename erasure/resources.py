"""Where the shipped data lives: presets, prompt sets, the embedded models and their judge.

They are package data of the distributions ``erasure_models`` (the ``models/`` folder) and ``erasure_prompts``
(the ``prompts/`` folder), located through :mod:`importlib.resources`, so a wheel, ``pip install .`` and an
editable checkout all find them, from any working directory.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

__all__ = ["models_dir", "prompts_dir", "presets_dir", "model_path", "prompt_file"]


def _package_dir(package: str) -> Path:
    try:
        root = resources.files(package)
    except ModuleNotFoundError:
        raise FileNotFoundError(
            f"the package data {package!r} is not installed; reinstall salun-erasure (pip install .)"
        ) from None
    path = Path(str(root))
    if not path.is_dir():  # zipped installs are not supported: the models are read by diffusers from a folder
        raise FileNotFoundError(f"{package} is not a folder on disk ({root}); install salun-erasure unzipped")
    return path


def models_dir() -> Path:
    """The folder of the shipped models (``models/`` in the checkout)."""
    return _package_dir("erasure_models")


def prompts_dir() -> Path:
    """The folder of the shipped prompt sets and presets (``prompts/`` in the checkout)."""
    return _package_dir("erasure_prompts")


def presets_dir() -> Path:
    """The folder of the shipped presets (``prompts/presets``)."""
    return prompts_dir() / "presets"


def model_path(name: str) -> Path:
    """A shipped model or weight file by name, e.g. ``shapes-sd`` or ``shapes-judge.safetensors``."""
    return models_dir() / name


def prompt_file(name: str) -> Path:
    """A shipped prompt set by file name, e.g. ``shapes.csv``."""
    return prompts_dir() / name
