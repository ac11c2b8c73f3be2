"""Crash-safe file writing, safetensors I/O and run-directory metadata.

Every artifact is written to a temporary name in the destination folder and renamed into place, so a
killed process never leaves a half-written file under the final name.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "reference_data_dir",
    "atomic_path",
    "clean_stale_temps",
    "temp_prefix",
    "check_output_path",
    "atomic_write_text",
    "atomic_write_json",
    "atomic_save_safetensors",
    "load_safetensors",
    "read_json",
    "file_sha256",
    "publish_dir",
    "environment_info",
    "CorruptFileError",
    "optimizer_state_to_tensors",
    "load_optimizer_state",
]


class CorruptFileError(ValueError):
    """A file exists but cannot be parsed (truncated or not the expected format)."""


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success rename it onto ``path``, on error delete it."""
    dest = Path(path)
    dest.parent.mkdir(parents=True, exist_ok=True)
    # the writer's host and pid are in the name, so a later run can tell a dead process's leftover (clean_stale_temps)
    fd, tmp = tempfile.mkstemp(prefix=temp_prefix(dest.name), suffix=".tmp" + suffix, dir=dest.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, dest)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()
        raise


def check_output_path(path: str | os.PathLike, flag: str, kind: str) -> Path:
    """Refuse an output path before any work: ``kind`` is ``"file"`` or ``"folder"``.

    Raises ``FileExistsError`` when ``path`` exists as the other kind, or when one of its parent folders is a file.
    """
    p = Path(path)
    if p.exists() and kind == "file" and p.is_dir():
        raise FileExistsError(f"{flag} {p} is a folder; give a file path")
    if p.exists() and kind == "folder" and not p.is_dir():
        raise FileExistsError(f"{flag} {p} is a file; give a folder path")
    for parent in p.parents:
        if parent.exists():
            if not parent.is_dir():
                raise FileExistsError(f"{flag} {p}: {parent} is a file, not a folder")
            break
    return p


_TEMP_NAME = re.compile(r"^\..+\.([A-Za-z0-9]*)-(\d+)\.[A-Za-z0-9_]+\.tmp(\.[A-Za-z0-9]+)?$")
FOREIGN_TEMP_AGE_S = 24 * 3600
"""A temp file written from another host (a shared folder) is removed only when older than this."""


def _host_tag() -> str:
    return "".join(ch for ch in platform.node() if ch.isalnum())[:24]


def temp_prefix(name: str, pid: int | None = None) -> str:
    """The name prefix of :func:`atomic_path`'s temp file for ``name``: ``.NAME.HOST-PID.``."""
    return f".{name}.{_host_tag()}-{os.getpid() if pid is None else pid}."


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # exists (another user's) or cannot tell: keep its file
    return True


def clean_stale_temps(folder: str | os.PathLike) -> int:
    """Delete the temporary files :func:`atomic_path` left in ``folder`` when its writer was killed.

    A temp file is removed when the process whose pid its name carries is no longer running on this machine;
    files of live writers (another run sharing the folder) are kept, and so are other hosts' files younger than
    ``FOREIGN_TEMP_AGE_S`` (a folder shared between machines). Returns the number of files removed.
    """
    d = Path(folder)
    if not d.is_dir():
        return 0
    removed = 0
    for f in d.iterdir():
        m = _TEMP_NAME.match(f.name)
        if m is None or not f.is_file():
            continue
        if m.group(1) == _host_tag():
            if _pid_alive(int(m.group(2))):
                continue
        else:
            with contextlib.suppress(FileNotFoundError):
                if time.time() - f.stat().st_mtime < FOREIGN_TEMP_AGE_S:
                    continue
        with contextlib.suppress(FileNotFoundError):
            f.unlink()
            removed += 1
    return removed


def publish_dir(part: str | os.PathLike, dest: str | os.PathLike) -> None:
    """Rename the finished folder ``part`` onto ``dest``; an existing ``dest`` is removed only after the rename."""
    part, dest = Path(part), Path(dest)
    old = None
    if dest.exists():
        old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(dest, old)
    try:
        os.replace(part, dest)
    except BaseException:
        if old is not None:
            os.replace(old, dest)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())


def atomic_write_json(path: str | os.PathLike, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"missing file: {p}")
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CorruptFileError(f"{p} is not valid JSON ({err}); delete it and re-run") from err


def atomic_save_safetensors(
    tensors: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict[str, str] | None = None
) -> None:
    from safetensors.torch import save_file

    clean = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    with atomic_path(path, ".safetensors") as tmp:
        save_file(clean, str(tmp), metadata=metadata)


def load_safetensors(path: str | os.PathLike, device: str = "cpu") -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Load tensors and metadata; a truncated or foreign file raises :class:`CorruptFileError`."""
    from safetensors import safe_open

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"missing file: {p}")
    try:
        with safe_open(str(p), framework="pt", device=device) as fh:
            meta = fh.metadata() or {}
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    except Exception as err:  # safetensors raises SafetensorError / OSError on corrupt input
        raise CorruptFileError(f"{p} is not a readable safetensors file ({err}); delete it and re-create it") from err
    return tensors, dict(meta)


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def _git_sha() -> str | None:
    if shutil.which("git") is None:
        return None
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=5
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def environment_info() -> dict[str, Any]:
    """Package versions, python, platform and git SHA, recorded in every run.json."""
    from importlib import metadata

    versions = {}
    for pkg in ("salun-erasure", "torch", "diffusers", "transformers", "accelerate", "safetensors", "nudenet",
                "open_clip_torch", "gradio"):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = None
    return {
        "versions": versions,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "git_sha": _git_sha(),
    }


def optimizer_state_to_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split ``optimizer.state_dict()`` into safetensors-able tensors and a JSON-able rest (no pickle)."""
    sd = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for idx, st in sd["state"].items():
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"{idx}.{k}"] = v
            else:
                scalars.setdefault(str(idx), {})[k] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def load_optimizer_state(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    """Inverse of :func:`optimizer_state_to_tensors`."""
    state: dict[int, dict[str, Any]] = {}
    for key, t in tensors.items():
        idx, k = key.split(".", 1)
        state.setdefault(int(idx), {})[k] = t
    for idx, st in meta.get("scalars", {}).items():
        state.setdefault(int(idx), {}).update(st)
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def reference_data_dir() -> Path | None:
    """The reference data folder (I2P, UnlearnDiffAtk, Imagenette prompts, COCO-30k captions): ``$ERASURE_DATA_DIR``
    (or its older name ``$SALUN_SHARED_DATA``), else ``../shared/data`` beside the source checkout; None when none
    exists. Read there, never copied."""
    for var in ("ERASURE_DATA_DIR", "SALUN_SHARED_DATA"):
        env = os.environ.get(var)
        if env:
            return Path(env) if Path(env).is_dir() else None
    p = Path(__file__).resolve().parents[2] / "shared" / "data"
    return p if p.is_dir() else None
