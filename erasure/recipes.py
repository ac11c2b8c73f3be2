"""Named, versioned recipes: the settings of published papers' official code, stored as JSON under
``prompts/recipes/<name>.json``.

A recipe is a preset that reproduces someone else's setting exactly and says where it comes from: its JSON holds
``version``, ``description``, ``source`` (``repo``, ``file``, ``commit`` of the official code the settings were read
from; ``also`` lists further files), ``notes`` (known differences), ``config`` (``EraseConfig`` fields), and how the
concept is built (``builder``):

* ``fixed``: one concept in the JSON (``salun-nudity``); optional user image folders under ``--recipe-data``.
* ``concept``: method settings only; the concept comes from the command line (``--forget-prompt``) or from one of
  the recipe's ``variants`` (``esd-compvis:nudity``, ``uce-paper:church``).
* ``imagenette-salun``: the SalUn object setting: class ``c`` of Imagenette remapped to class ``(c + 1) mod 10``,
  real images read from an Imagenette folder (``ROOT/train/<wnid or class name>/*.JPEG``).

``params.epochs`` turns into optimizer steps once Df's size is known: ``epochs * ceil(|Df| / batch_size)``.
A recipe resolves to a :class:`erasure.presets.Preset` and goes through the same precedence as a preset:
``--config`` file over the recipe, command-line flags over both.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from erasure.config import ConceptSpec, EraseConfig
from erasure.presets import Preset

__all__ = ["Recipe", "IMAGENETTE", "recipes_dir", "list_recipes", "load_recipe", "resolve_recipe", "config_from_recipe",
           "imagenette_class_dir"]

IMAGENETTE: list[tuple[str, tuple[str, ...]]] = [
    ("tench", ("n01440764",)),
    ("English springer", ("n02102040",)),
    ("cassette player", ("n02979186",)),
    ("chain saw", ("n03000684",)),
    ("church", ("n03028079",)),
    ("French horn", ("n03394916",)),
    ("garbage truck", ("n03417042",)),
    ("gas pump", ("n03425413",)),
    ("golf ball", ("n03445777",)),
    ("parachute", ("n03888605", "n03888257")),
]
"""Imagenette's classes in label order (frgfm/imagenette's label names, which the SalUn code puts in its prompts) and
their folder names (WordNet ids; imagenette2 files parachute under n03888605)."""

BUILDERS = ("fixed", "concept", "imagenette-salun")


def recipes_dir() -> Path:
    """The shipped recipes (``prompts/recipes``; override with ``SALUN_RECIPES_DIR``)."""
    from erasure import resources

    env = os.environ.get("SALUN_RECIPES_DIR")
    return Path(env) if env else resources.prompts_dir() / "recipes"


@dataclass
class Recipe:
    name: str
    version: int
    description: str
    source: dict[str, str]
    builder: str
    config: dict[str, Any]
    also: list[dict[str, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    model: str = ""
    kind: str = ""
    data: dict[str, Any] | None = None
    params: dict[str, Any] = field(default_factory=dict)
    concept: dict[str, Any] | None = None
    variants: dict[str, dict[str, Any]] = field(default_factory=dict)

    def variant_names(self) -> list[str]:
        if self.builder == "imagenette-salun":
            return [_slug(label) for label, _ in IMAGENETTE]
        return list(self.variants)


def list_recipes(folder: str | os.PathLike | None = None) -> list[str]:
    d = Path(folder) if folder else recipes_dir()
    return sorted(p.stem for p in d.glob("*.json")) if d.is_dir() else []


def load_recipe(name: str, folder: str | os.PathLike | None = None) -> Recipe:
    """Load recipe ``name`` (a file stem in the recipes folder, or a path to a JSON file); checks its fields."""
    p = Path(name)
    if not (p.suffix == ".json" and p.is_file()):
        p = (Path(folder) if folder else recipes_dir()) / f"{name}.json"
    if not p.is_file():
        raise ValueError(f"unknown recipe {name!r}; available: {', '.join(list_recipes(folder)) or 'none'} "
                         "(see `erasure recipes`)")
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"recipe file {p} is not valid JSON: {err}") from err
    if not isinstance(data, dict):
        raise ValueError(f"recipe file {p} must hold a JSON object")
    src = data.get("source")
    if not (isinstance(src, dict) and all(isinstance(src.get(k), str) and src[k] for k in ("repo", "file", "commit"))):
        raise ValueError(f"recipe {p.stem}: \"source\" must give the official code's repo, file and commit")
    if data.get("builder") not in BUILDERS:
        raise ValueError(f"recipe {p.stem}: builder must be one of {BUILDERS}, got {data.get('builder')!r}")
    if not isinstance(data.get("version"), int):
        raise ValueError(f"recipe {p.stem}: \"version\" must be an integer")
    _check_config_keys(p.stem, data.get("config", {}))
    for v, spec in (data.get("variants") or {}).items():
        _check_config_keys(f"{p.stem}:{v}", spec.get("config", {}))
    known = {f for f in Recipe.__dataclass_fields__ if f != "name"}
    return Recipe(name=p.stem, **{k: v for k, v in data.items() if k in known})


def _check_config_keys(name: str, cfg: dict[str, Any]) -> None:
    from erasure.methods import LEGACY_KEYS

    unknown = set(cfg) - set(EraseConfig.__dataclass_fields__) - set(LEGACY_KEYS)
    if unknown:
        raise ValueError(f"recipe {name}: unknown config keys {sorted(unknown)}")


def _slug(label: str) -> str:
    return label.lower().replace(" ", "-")


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in extra.items():
        out[k] = {**out[k], **v} if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def imagenette_class_dir(root: str | os.PathLike, index: int) -> Path | None:
    """The folder of Imagenette class ``index`` under ``root/train`` (by WordNet id or class name), or None."""
    label, wnids = IMAGENETTE[index]
    train = Path(root) / "train"
    for name in (*wnids, label, label.replace(" ", "_"), _slug(label), label.lower().replace(" ", "_")):
        if (train / name).is_dir():
            return train / name
    return None


def _imagenette_index(variant: str | None, recipe: str) -> int:
    names = [_slug(label) for label, _ in IMAGENETTE]
    if variant is None:
        raise ValueError(f"recipe {recipe} needs a class: --recipe {recipe}:CLASS with CLASS one of {', '.join(names)} "
                         "(or 0-9)")
    v = variant.strip()
    if v.isdigit() and int(v) < len(IMAGENETTE):
        return int(v)
    for i, (label, wnids) in enumerate(IMAGENETTE):
        if _slug(v) in (_slug(label), label.lower().replace(" ", "_")) or v in wnids:
            return i
    raise ValueError(f"recipe {recipe}: unknown class {variant!r}; choose one of {', '.join(names)} (or 0-9)")


def _image_count(folder: str) -> int:
    from erasure.diffusion.data import load_image_folder

    return len(load_image_folder(folder))


def resolve_recipe(spec: str, data_root: str | os.PathLike | None = None,
                   overrides: dict[str, Any] | None = None, concepts: list[dict] | None = None) -> Preset:
    """Resolve ``NAME`` or ``NAME:VARIANT`` to the concepts and ``EraseConfig`` overrides it stands for.

    Args:
        spec (`str`): recipe name, optionally ``:variant`` (an Imagenette class for ``salun-objects``).
        data_root (`str`, *optional*): the user data the recipe reads (``--recipe-data``).
        overrides (`dict`, *optional*): config values the caller will set on top (flags), used where a derived value
            depends on them (``batch_size`` for the steps of an epoch-based recipe).
        concepts (`list[dict]`, *optional*): the caller's own concepts, for recipes that take the concept from the
            command line (``builder: concept``).

    Returns:
        `Preset`: ``concepts`` and ``config`` (recipe config with derived ``steps``), ``description``, ``kind``.
    """
    name, _, variant = spec.partition(":")
    variant = variant or None
    r = load_recipe(name)
    cfg = dict(r.config)
    overrides = overrides or {}
    if r.builder == "imagenette-salun":
        built = _build_imagenette(r, variant, data_root)
    elif r.builder == "fixed":
        if variant:
            raise ValueError(f"recipe {name} has no variants; use --recipe {name}")
        built = _build_fixed(r, data_root)
    else:
        built, cfg = _build_concept(r, variant, cfg, concepts)
    if "epochs" in r.params and "steps" not in overrides:
        batch = int(overrides.get("batch_size", cfg.get("batch_size", 4)))
        n_forget = sum(_forget_size(c, {**cfg, **overrides}) for c in built)
        cfg["steps"] = int(r.params["epochs"]) * math.ceil(n_forget / batch)
    if r.params.get("preserve_scale") == "uce-auto":
        n_keep = sum(len(c.retain_prompts) for c in built)
        cfg["method_args"] = {**cfg.get("method_args", {}), "preserve_scale": max(0.1, 1.0 / (1 + n_keep))}
    return Preset(name=spec, concepts=built, config=cfg, description=r.description, kind=r.kind, model=r.model)


def _forget_size(c: ConceptSpec, cfg: dict[str, Any]) -> int:
    if c.forget_images is None:
        return len(c.forget_prompts) * int(cfg.get("forget_images_per_prompt", 8))
    folders = c.forget_images if isinstance(c.forget_images, list) else [c.forget_images]
    return sum(_image_count(f) for f in folders)


def _need_data(r: Recipe) -> str:
    d = r.data or {}
    return f"pass {d.get('flag', '--recipe-data')} ROOT with the layout {d.get('layout', '?')}"


def _build_imagenette(r: Recipe, variant: str | None, data_root) -> list[ConceptSpec]:
    c = _imagenette_index(variant, r.name)
    if data_root is None:
        raise ValueError(f"recipe {r.name} trains on real Imagenette images: {_need_data(r)}")
    dirs = [imagenette_class_dir(data_root, i) for i in range(len(IMAGENETTE))]
    missing = [IMAGENETTE[i][0] for i, d in enumerate(dirs) if d is None]
    if missing:
        raise ValueError(f"recipe {r.name}: no folder for {', '.join(missing)} under {Path(data_root) / 'train'}; "
                         f"{_need_data(r)}")
    prompt = r.params.get("prompt", "an image of a {label}")
    offset = int(r.params.get("anchor_offset", 1))
    labels = [label for label, _ in IMAGENETTE]
    others = [i for i in range(len(IMAGENETTE)) if i != c]
    return [ConceptSpec(
        name=_slug(labels[c]),
        forget_prompts=[prompt.format(label=labels[c])],
        anchor_prompts=[prompt.format(label=labels[(c + offset) % len(labels)])],
        retain_prompts=[prompt.format(label=labels[i]) for i in others],
        forget_images=str(dirs[c]),
        retain_images=[str(dirs[i]) for i in others],
    )]


def _build_fixed(r: Recipe, data_root) -> list[ConceptSpec]:
    spec = dict(r.concept or {})
    if data_root is not None:
        d = r.data or {}
        if not d.get("forget"):
            raise ValueError(f"recipe {r.name} reads no user data; drop --recipe-data")
        root = Path(data_root)
        for key, sub in (("forget_images", d.get("forget")), ("retain_images", d.get("retain"))):
            if sub:
                if not (root / sub).is_dir():
                    raise ValueError(f"recipe {r.name}: {root / sub} is not a folder; {_need_data(r)}")
                spec[key] = str(root / sub)
    return [ConceptSpec.from_dict(spec)]


def _build_concept(r: Recipe, variant: str | None, cfg: dict[str, Any], concepts: list[dict] | None):
    if variant is not None:
        if variant not in r.variants:
            raise ValueError(f"recipe {r.name}: unknown variant {variant!r}; choose one of {', '.join(r.variants)}")
        v = r.variants[variant]
        return [ConceptSpec.from_dict(v["concept"])], _merge(cfg, v.get("config", {}))
    if not concepts:
        raise ValueError(f"recipe {r.name} gives the method's settings only: add the concept (--forget-prompt TEXT, "
                         f"--preset or --concept-file) or a variant: {', '.join(f'{r.name}:{v}' for v in r.variants)}")
    out = []
    default = r.params.get("anchor_default")
    for c in concepts:
        c = dict(c)
        if not c.get("anchor_prompts") and default in ("forget", "uncond"):
            c["anchor_prompts"] = list(c.get("forget_prompts", []))  # unused: ESD has no anchor; UCE maps to ""
            if default == "uncond":
                cfg = _merge(cfg, {"method_args": {"guide": "uncond"}})
        out.append(ConceptSpec.from_dict(c))
    return out, cfg


def config_from_recipe(spec: str, data_root: str | os.PathLike | None = None, **overrides: Any) -> EraseConfig:
    """An :class:`EraseConfig` for a recipe (``NAME`` or ``NAME:VARIANT``), with keyword overrides (``model=``)."""
    pr = resolve_recipe(spec, data_root, overrides)
    cfg = dict(pr.config)
    args = {**cfg.pop("method_args", {}), **overrides.pop("method_args", {})}
    return EraseConfig.from_dict({**cfg, **overrides, "method_args": args,
                                  "concepts": [c.to_dict() for c in pr.concepts]})
