"""The run directory contract, shared by the CLI, the evaluation harness and the app.

``RUN_DIR/run.json``          config, method, base model, versions, seed, timings, mask stats
``RUN_DIR/weights.safetensors`` the denoiser parameters the run may have changed, under the denoiser's own
                              ``state_dict()`` names (``pipe.unet``; ``pipe.transformer`` for SD3/FLUX)
``RUN_DIR/mask.safetensors``  the saliency mask (masked methods only), packed bits
``RUN_DIR/log.jsonl``         one JSON line per training step

A run is written to ``RUN_DIR.partial/`` and renamed into place when complete, so ``RUN_DIR`` never holds
a half-written run.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from erasure.io import (
    CorruptFileError,
    atomic_save_safetensors,
    atomic_write_json,
    atomic_write_text,
    load_safetensors,
    read_json,
)

__all__ = ["RUN_FORMAT", "CLS_RUN_FORMAT", "RunDirError", "RunExistsError", "RunDir", "Checkpoint", "Interrupted",
           "read_run", "load_run_weights", "apply_run_weights", "load_erased_pipeline", "partial_dir", "list_runs",
           "list_interrupted"]

RUN_FORMAT = "salun-erasure-run-v1"
CLS_RUN_FORMAT = "salun-erasure-cls-run-v1"
REQUIRED = {RUN_FORMAT: ("run.json", "weights.safetensors", "log.jsonl"), CLS_RUN_FORMAT: ("run.json",)}
PARTIAL_SUFFIX = ".partial"


class RunDirError(ValueError):
    """A run directory is missing, incomplete, corrupt, or made for another model."""


class RunExistsError(FileExistsError):
    """The output directory already holds a run (or something else)."""


def partial_dir(run_dir: str | os.PathLike) -> Path:
    p = Path(run_dir)
    return p.with_name(p.name + PARTIAL_SUFFIX)


@dataclass
class Checkpoint:
    """A resumable state: the step it was taken after, tensors by name, the optimizer, and the run's config."""

    step: int
    params: dict[str, torch.Tensor]
    optimizer: dict[str, torch.Tensor]
    optimizer_meta: dict[str, Any]
    config: dict[str, Any] = field(default_factory=dict)


@dataclass
class Interrupted:
    """What a partial run folder says about itself (for listing and resuming; never raises)."""

    run_dir: Path
    step: int = 0
    config: dict[str, Any] = field(default_factory=dict)
    note: str = ""  # why it cannot be resumed ("" when it can)

    @property
    def resumable(self) -> bool:
        return not self.note and bool(self.config)


class RunDir:
    """One run directory and its ``.partial`` sibling: the only code that knows their layout.

    Writers (the diffusion trainer, the classification CLI) call :meth:`begin`, write files into
    :attr:`partial`, save and load checkpoints there, then :meth:`publish`. Only the main process of a
    multi-process job writes; the others read after a barrier.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.partial = partial_dir(self.path)

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    # ----------------------------------------------------------------- writing
    def check_target(self, overwrite: bool) -> None:
        """Refuse a target that exists and is not a run directory, or holds a run, unless ``overwrite``."""
        if self.path.name.endswith(PARTIAL_SUFFIX):
            raise RunExistsError(f"run directory names may not end in {PARTIAL_SUFFIX!r}: {self.path}")
        if self.path.exists():
            if not self.path.is_dir():
                raise RunExistsError(f"{self.path} exists and is not a directory; choose another output folder")
            entries = list(self.path.iterdir())
            if entries and not overwrite:
                raise RunExistsError(f"{self.path} already holds a run; pass --overwrite to replace it or choose another "
                                     "output folder")
            if entries and not (self.path / "run.json").is_file():
                raise RunExistsError(f"{self.path} is not empty and holds no run (no run.json); refusing to replace it "
                                     "even with --overwrite: choose another output folder")

    def begin(self, overwrite: bool = False) -> None:
        """Create the partial folder (emptied first with ``overwrite``); keeps an interrupted run otherwise."""
        self.check_target(overwrite)
        if overwrite:
            shutil.rmtree(self.partial, ignore_errors=True)
        self.partial.mkdir(parents=True, exist_ok=True)

    def save_checkpoint(self, ck: Checkpoint) -> None:
        """Write ``checkpoint-STEP`` atomically, point ``latest_checkpoint`` at it, drop older ones."""
        name = f"checkpoint-{ck.step}"
        final = self.partial / name
        tmp = self.partial / f".{name}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        atomic_save_safetensors({n: t.detach() for n, t in ck.params.items()}, tmp / "params.safetensors")
        atomic_save_safetensors(ck.optimizer, tmp / "optimizer.safetensors")
        atomic_write_json(tmp / "state.json", {"step": ck.step, "optimizer": ck.optimizer_meta, "config": ck.config})
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        atomic_write_text(self.partial / "latest_checkpoint", name)
        for old in self.partial.glob("checkpoint-*"):
            if old != final:
                shutil.rmtree(old, ignore_errors=True)

    def _latest_state(self) -> tuple[Path | None, dict[str, Any] | None, str]:
        latest = self.partial / "latest_checkpoint"
        if not latest.is_file():
            return None, None, "no checkpoint (stopped before the first one)"
        try:
            name = latest.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as err:
            return None, None, f"unreadable latest_checkpoint ({err})"
        ck = self.partial / name
        if not name.startswith("checkpoint-") or Path(name).name != name or not ck.is_dir():
            return None, None, f"checkpoint {name[:60]!r} named in latest_checkpoint is missing"
        try:
            state = json.loads((ck / "state.json").read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            return None, None, f"unreadable {name}/state.json ({err})"
        if not isinstance(state, dict):
            return None, None, f"{name}/state.json is not a JSON object"
        missing = [f for f in ("params.safetensors", "optimizer.safetensors") if not (ck / f).is_file()]
        if missing:
            return ck, state, f"{name} lacks {', '.join(missing)}"
        if not isinstance(state.get("step"), int) or not isinstance(state.get("config"), dict):
            return ck, state, "the checkpoint does not record its step and settings"
        return ck, state, ""

    def load_checkpoint(self, same_run: dict[str, Any] | None = None, ignore: tuple[str, ...] = ()) -> Checkpoint | None:
        """The latest checkpoint, or None. With ``same_run`` (a config dict), refuse a checkpoint whose config
        differs in any key but ``ignore`` (so a resumed run is exactly the run it continues)."""
        ck, state, note = self._latest_state()
        if ck is None and state is None:
            return None
        if note:
            raise RunDirError(f"{self.partial} holds an interrupted run that cannot be resumed ({note}); delete it or "
                              "pass --overwrite to start over")
        assert ck is not None and state is not None
        if same_run is not None:
            a = {k: v for k, v in state["config"].items() if k not in ignore}
            b = {k: v for k, v in same_run.items() if k not in ignore}
            if a != b:
                diff = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
                raise RunExistsError(
                    f"{self.partial} holds an interrupted run with other settings ({', '.join(diff[:5])} differ); "
                    "rerun with the same settings to resume it, or pass --overwrite to start over"
                )
        try:
            params, _ = load_safetensors(ck / "params.safetensors")
            opt, _ = load_safetensors(ck / "optimizer.safetensors")
        except CorruptFileError as err:
            raise RunDirError(f"{err}; delete {self.partial} or pass --overwrite to start over") from err
        return Checkpoint(int(state["step"]), params, opt, state.get("optimizer") or {}, state["config"])

    def interrupted(self) -> Interrupted:
        """What the partial folder holds, for listing: never raises."""
        ck, state, note = self._latest_state()
        state = state or {}
        step = state.get("step")
        cfg = state.get("config") if isinstance(state.get("config"), dict) else {}
        return Interrupted(self.partial, step if isinstance(step, int) and not isinstance(step, bool) else 0, cfg, note)

    def clear_checkpoints(self) -> None:
        """Remove checkpoints, half-written checkpoint folders and temp files a killed writer left."""
        from erasure.io import clean_stale_temps

        for ck in [*self.partial.glob("checkpoint-*"), *self.partial.glob(".checkpoint-*.tmp")]:
            shutil.rmtree(ck, ignore_errors=True)
        clean_stale_temps(self.partial)
        with contextlib.suppress(FileNotFoundError):
            (self.partial / "latest_checkpoint").unlink()

    def publish(self) -> Path:
        """Move the finished partial folder onto the run directory; an existing run is replaced only now."""
        from erasure.io import publish_dir

        self.clear_checkpoints()
        publish_dir(self.partial, self.path)
        return self.path

    # ----------------------------------------------------------------- reading
    def read(self) -> dict[str, Any]:
        """Validate the run directory and return its ``run.json`` (diffusion and classification runs)."""
        p = self.path
        if not p.is_dir():
            hint = (" (an interrupted run is in .partial: re-run with the same output folder to resume)"
                    if self.partial.is_dir() else "")
            raise RunDirError(f"run directory not found: {p}{hint}")
        if not (p / "run.json").is_file():
            raise RunDirError(f"incomplete run directory {p}: missing run.json; re-run the erasure or delete it")
        try:
            info = read_json(p / "run.json")
        except CorruptFileError as err:
            raise RunDirError(str(err)) from err
        fmt = info.get("format") if isinstance(info, dict) else None
        if fmt not in REQUIRED:
            raise RunDirError(f"{p}/run.json is not a {RUN_FORMAT} file; was this directory made by `erasure erase`?")
        missing = [f for f in REQUIRED[fmt] if not (p / f).is_file()]
        if info.get("needs_mask") and not (p / "mask.safetensors").is_file():
            missing.append("mask.safetensors")
        if missing:
            raise RunDirError(f"incomplete run directory {p}: missing {', '.join(missing)}; re-run the erasure or delete it")
        if not isinstance(info.get("config", {}), dict):
            raise RunDirError(f"{p}/run.json is damaged: its config is not a JSON object; delete the run")
        return info


def read_run(run_dir: str | os.PathLike) -> dict[str, Any]:
    """Validate a run directory and return its ``run.json``."""
    return RunDir(run_dir).read()


def load_run_weights(run_dir: str | os.PathLike) -> dict[str, torch.Tensor]:
    try:
        tensors, _ = load_safetensors(Path(run_dir) / "weights.safetensors")
    except CorruptFileError as err:
        raise RunDirError(str(err)) from err
    return tensors


def apply_run_weights(unet: torch.nn.Module, weights: dict[str, torch.Tensor], run_dir: str | os.PathLike = "") -> None:
    """Overlay a run's weights on ``unet``, refusing names or shapes the UNet does not have, and weights that are not
    finite floating-point numbers (a damaged or hand-edited run would otherwise draw black images)."""
    state = unet.state_dict()
    for name, t in weights.items():
        if not t.is_floating_point():
            raise RunDirError(f"run {run_dir} is damaged: {name} holds {t.dtype} values, not floating-point weights")
        if not bool(torch.isfinite(t).all()):
            raise RunDirError(f"run {run_dir} is damaged: {name} holds NaN or infinite weights; delete the run")
        if name not in state:
            raise RunDirError(f"run {run_dir} was made for another model: the denoiser has no parameter {name!r}")
        if tuple(state[name].shape) != tuple(t.shape):
            raise RunDirError(
                f"run {run_dir} was made for another model: {name} is {tuple(t.shape)} in the run, "
                f"{tuple(state[name].shape)} in the denoiser"
            )
    with torch.no_grad():
        for name, t in weights.items():
            state[name].copy_(t.to(state[name].dtype))


def load_erased_pipeline(
    run_dir: str | os.PathLike, device: str | torch.device = "auto", base_model: str | None = None,
    dtype: torch.dtype | None = None,
):
    """Load the run's base pipeline and overlay the erased denoiser weights (``pipe.unet`` or ``pipe.transformer``).

    Args:
        run_dir (`str`): a directory written by :func:`erasure.erase`.
        device (`str`, defaults to `"auto"`): where to put the pipeline.
        base_model (`str`, *optional*): load this base model instead of the one recorded in ``run.json``
            (e.g. the same weights in another folder).
    """
    from erasure.backbones import backbone_of
    from erasure.diffusion.pipeline import load_pipeline

    info = read_run(run_dir)
    weights = load_run_weights(run_dir)
    model = base_model or info.get("base_model")
    drop_t5 = bool((info.get("config") or {}).get("drop_t5", False))
    pipe = load_pipeline(model, device=device, dtype=dtype, drop_t5=drop_t5)
    backbone = backbone_of(pipe)
    if info.get("family", backbone.name) != backbone.name:
        raise RunDirError(f"run {run_dir} was made for a {info['family']} model, but {model} is a {backbone.label} "
                          "pipeline; pass --model with the run's base model")
    apply_run_weights(backbone.denoiser(pipe), weights, run_dir)
    pipe.erasure_run = dict(info, run_dir=str(Path(run_dir).resolve()))
    return pipe


def list_runs(root: str | os.PathLike, kind: str | None = RUN_FORMAT) -> list[dict[str, Any]]:
    """Complete runs directly under ``root`` (newest first), each with its ``run.json`` and ``run_dir``.

    ``kind`` keeps one run format (default: diffusion runs); None keeps every readable run.
    """
    out = []
    r = Path(root)
    if not r.is_dir():
        return out
    for d in r.iterdir():
        if d.is_dir() and not d.name.endswith(PARTIAL_SUFFIX) and (d / "run.json").is_file():
            try:
                info = read_run(d)
            except RunDirError:
                continue
            if kind is None or info.get("format") == kind:
                out.append(dict(info, run_dir=str(d)))
    out.sort(key=lambda i: i.get("created", ""), reverse=True)
    return out


def list_interrupted(root: str | os.PathLike) -> list[Interrupted]:
    """Partial run folders directly under ``root`` (whatever their state; see :attr:`Interrupted.note`)."""
    r = Path(root)
    if not r.is_dir():
        return []
    out = []
    for d in sorted(r.iterdir()):
        name = d.name[: -len(PARTIAL_SUFFIX)]
        if d.is_dir() and d.name.endswith(PARTIAL_SUFFIX) and name and not name.startswith("."):
            out.append(RunDir(d.with_name(name)).interrupted())
    return out
