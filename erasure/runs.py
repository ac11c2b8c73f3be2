"""The run directory contract, shared by the CLI, the evaluation harness and the app.

``RUN_DIR/run.json``          config, method, base model, versions, seed, timings, mask stats
``RUN_DIR/weights.safetensors`` the UNet parameters the run may have changed, under ``unet.state_dict()`` names
``RUN_DIR/mask.safetensors``  the saliency mask (masked methods only), packed bits
``RUN_DIR/log.jsonl``         one JSON line per training step

A run is written to ``RUN_DIR.partial/`` and renamed into place when complete, so ``RUN_DIR`` never holds
a half-written run.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from erasure.io import CorruptFileError, load_safetensors, read_json

__all__ = ["RUN_FORMAT", "RunDirError", "read_run", "load_run_weights", "apply_run_weights", "load_erased_pipeline",
           "partial_dir", "list_runs"]

RUN_FORMAT = "salun-erasure-run-v1"
REQUIRED = ("run.json", "weights.safetensors", "log.jsonl")


class RunDirError(ValueError):
    """A run directory is missing, incomplete, corrupt, or made for another model."""


def partial_dir(run_dir: str | os.PathLike) -> Path:
    p = Path(run_dir)
    return p.with_name(p.name + ".partial")


def read_run(run_dir: str | os.PathLike) -> dict[str, Any]:
    """Validate a run directory and return its ``run.json``."""
    p = Path(run_dir)
    if not p.is_dir():
        hint = " (an interrupted run is in .partial: re-run `erasure erase` with the same --out to resume)" if partial_dir(p).is_dir() else ""
        raise RunDirError(f"run directory not found: {p}{hint}")
    missing = [f for f in REQUIRED if not (p / f).is_file()]
    if missing:
        raise RunDirError(f"incomplete run directory {p}: missing {', '.join(missing)}; re-run the erasure or delete it")
    try:
        info = read_json(p / "run.json")
    except CorruptFileError as err:
        raise RunDirError(str(err)) from err
    if not isinstance(info, dict) or info.get("format") != RUN_FORMAT:
        raise RunDirError(f"{p}/run.json is not a {RUN_FORMAT} file; was this directory made by `erasure erase`?")
    if info.get("needs_mask") and not (p / "mask.safetensors").is_file():
        raise RunDirError(f"incomplete run directory {p}: missing mask.safetensors")
    return info


def load_run_weights(run_dir: str | os.PathLike) -> dict[str, torch.Tensor]:
    try:
        tensors, _ = load_safetensors(Path(run_dir) / "weights.safetensors")
    except CorruptFileError as err:
        raise RunDirError(str(err)) from err
    return tensors


def apply_run_weights(unet: torch.nn.Module, weights: dict[str, torch.Tensor], run_dir: str | os.PathLike = "") -> None:
    """Overlay a run's weights on ``unet``, refusing names or shapes the UNet does not have."""
    state = unet.state_dict()
    for name, t in weights.items():
        if name not in state:
            raise RunDirError(f"run {run_dir} was made for another model: the UNet has no parameter {name!r}")
        if tuple(state[name].shape) != tuple(t.shape):
            raise RunDirError(
                f"run {run_dir} was made for another model: {name} is {tuple(t.shape)} in the run, "
                f"{tuple(state[name].shape)} in the UNet"
            )
    with torch.no_grad():
        for name, t in weights.items():
            state[name].copy_(t.to(state[name].dtype))


def load_erased_pipeline(
    run_dir: str | os.PathLike, device: str | torch.device = "auto", base_model: str | None = None,
    dtype: torch.dtype | None = None,
):
    """Load the run's base pipeline and overlay the erased UNet weights.

    Args:
        run_dir (`str`): a directory written by :func:`erasure.erase`.
        device (`str`, defaults to `"auto"`): where to put the pipeline.
        base_model (`str`, *optional*): load this base model instead of the one recorded in ``run.json``
            (e.g. the same weights in another folder).
    """
    from erasure.diffusion.pipeline import load_pipeline

    info = read_run(run_dir)
    weights = load_run_weights(run_dir)
    model = base_model or info.get("base_model")
    pipe = load_pipeline(model, device=device, dtype=dtype)
    apply_run_weights(pipe.unet, weights, run_dir)
    pipe.erasure_run = dict(info, run_dir=str(Path(run_dir).resolve()))
    return pipe


def list_runs(root: str | os.PathLike) -> list[dict[str, Any]]:
    """Complete runs directly under ``root`` (newest first), each with its ``run.json`` and ``run_dir``."""
    out = []
    r = Path(root)
    if not r.is_dir():
        return out
    for d in r.iterdir():
        if d.is_dir() and not d.name.endswith(".partial") and (d / "run.json").is_file():
            try:
                info = read_run(d)
            except RunDirError:
                continue
            out.append(dict(info, run_dir=str(d)))
    out.sort(key=lambda i: i.get("created", ""), reverse=True)
    return out
