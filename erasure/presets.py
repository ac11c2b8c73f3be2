"""Named concept presets, stored as JSON under ``prompts/presets/<name>.json``.

A preset file holds ``{"concept": ConceptSpec, "config": {EraseConfig overrides}, "description": str,
"kind": "object"|"style"|"nudity"|"color"|"fill", "model": "shapes"|"sd"}``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from erasure.config import ConceptSpec, EraseConfig

__all__ = ["Preset", "presets_dir", "list_presets", "load_preset", "config_from_preset"]


def presets_dir() -> Path:
    """The shipped presets (``prompts/presets``; override with ``SALUN_PRESETS_DIR``)."""
    from erasure import resources

    env = os.environ.get("SALUN_PRESETS_DIR")
    return Path(env) if env else resources.presets_dir()


@dataclass
class Preset:
    name: str
    concepts: list[ConceptSpec]
    config: dict[str, Any] = field(default_factory=dict)
    description: str = ""
    kind: str = ""
    model: str = ""

    @property
    def concept(self) -> ConceptSpec:
        """The first (for single-concept presets, the only) concept."""
        return self.concepts[0]


def list_presets(folder: str | os.PathLike | None = None) -> list[str]:
    d = Path(folder) if folder else presets_dir()
    return sorted(p.stem for p in d.glob("*.json")) if d.is_dir() else []


def load_preset(name: str, folder: str | os.PathLike | None = None) -> Preset:
    """Load preset ``name`` (a file stem in the presets folder, or a path to a JSON file)."""
    p = Path(name)
    if not (p.suffix == ".json" and p.is_file()):
        p = (Path(folder) if folder else presets_dir()) / f"{name}.json"
    if not p.is_file():
        raise ValueError(f"unknown preset {name!r}; available: {', '.join(list_presets(folder)) or 'none'}")
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"preset file {p} is not valid JSON: {err}") from err
    from erasure.methods import LEGACY_KEYS

    if not isinstance(data, dict):
        raise ValueError(f"preset file {p} must hold a JSON object")
    cfg = data.get("config", {})
    unknown = set(cfg) - set(EraseConfig.__dataclass_fields__) - set(LEGACY_KEYS)
    if unknown:
        raise ValueError(f"preset {p.stem}: unknown config keys {sorted(unknown)}")
    raw = data.get("concepts") or ([data["concept"]] if "concept" in data else [])
    if not isinstance(raw, list) or not raw:
        raise ValueError(f"preset {p.stem}: give a \"concept\" object or a non-empty \"concepts\" list")
    return Preset(
        name=p.stem,
        concepts=[ConceptSpec.from_dict(c) for c in raw],
        config=cfg,
        description=data.get("description", ""),
        kind=data.get("kind", ""),
        model=data.get("model", ""),
    )


def config_from_preset(name: str, **overrides: Any) -> EraseConfig:
    """An :class:`EraseConfig` for a preset, with keyword overrides (e.g. ``model=``, ``steps=``)."""
    pr = load_preset(name)
    return EraseConfig.from_dict({**pr.config, **overrides, "concepts": [c.to_dict() for c in pr.concepts]})
