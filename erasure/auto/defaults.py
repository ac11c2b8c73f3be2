"""Per-model erasure defaults and the precedence of settings.

A model folder may carry ``erasure_defaults.json`` at its root::

    {"description": "...", "config": {EraseConfig fields, "method_args": {...}, "auto": {...}}}

Stable Diffusion v1.x/2.x folders (and hub ids) without one get :data:`PAPER_SD_DEFAULTS`. Settings are layered,
lowest to highest: the built-in defaults (the dataclass fields), the model's defaults, a preset, a ``--config``
file, explicit flags (or form values). :func:`resolve_settings` merges the layers and returns, beside the merged
dict, ``settings_source``: for every setting, the layer its value came from (``builtin``, ``model``, ``paper``,
``preset:<name>``, ``config``, ``flag``). Nested settings are named ``method_args.alpha``, ``auto.neighbours``.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Any

__all__ = ["DEFAULTS_FILE", "PAPER_SD_DEFAULTS", "model_defaults", "model_method_args", "resolve_settings",
           "default_config", "is_sd_v1_v2"]

DEFAULTS_FILE = "erasure_defaults.json"

AUTO_ON = {"anchor_rule": "nearest", "min_retain": 8, "retain_size": 32, "neighbours": 2, "neighbour_weight": 3.0, "augment_forget": 8}
"""The automatic retain/neighbour settings the SD v1/v2 defaults switch on."""

PAPER_SD_DEFAULTS: dict[str, Any] = {
    # SalUn's SD object recipe (Fan et al. 2024, official code): Adam lr 1e-5, batch 8, mask ratio 0.5, retain
    # weight 0.5 on the denoising loss
    "method": "salun",
    "lr": 1e-5,
    "batch_size": 8,
    "mask_ratio": 0.5,
    "method_args": {"alpha": 0.5, "retain_loss": "denoise"},
    "auto": dict(AUTO_ON),
}

_SD_HUB = re.compile(r"(stable-diffusion-(v1|v-1|1|2)|sd-v1|sd-2|sd2)", re.IGNORECASE)
_NESTED = ("method_args", "auto")


def is_sd_v1_v2(model: str) -> bool:
    """A local SD v1/v2 pipeline folder (cross-attention width 768 or 1024), or a hub id that names one."""
    p = Path(model)
    if not p.is_dir():
        return bool(_SD_HUB.search(str(model)))
    try:
        index = json.loads((p / "model_index.json").read_text(encoding="utf-8"))
        unet = json.loads((p / "unet" / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return index.get("_class_name") == "StableDiffusionPipeline" and unet.get("cross_attention_dim") in (768, 1024)


def model_defaults(model: str) -> tuple[dict[str, Any], str]:
    """``(settings, source)`` of a model: its ``erasure_defaults.json`` (source ``model``), the paper's for SD v1/v2
    (source ``paper``), or ``({}, "")``. Raises ``ValueError`` on a malformed file."""
    from erasure.diffusion.pipeline import resolve_model

    path = Path(resolve_model(model))
    f = path / DEFAULTS_FILE
    if f.is_file():
        try:
            data = json.loads(f.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ValueError(f"{f}: not valid UTF-8 JSON ({err}); fix or delete the file") from None
        if not isinstance(data, dict) or not isinstance(data.get("config", {}), dict):
            raise ValueError(f"{f}: expected {{\"config\": {{EraseConfig fields}}}}; fix or delete the file")
        cfg = data.get("config", {})
        _check_keys(cfg, str(f))
        return json.loads(json.dumps(cfg)), "model"
    if is_sd_v1_v2(str(path)):
        return json.loads(json.dumps(PAPER_SD_DEFAULTS)), "paper"
    return {}, ""


def model_method_args(model: str) -> dict[str, Any]:
    """Every method setting the model's defaults give, whichever method they belong to (``alpha`` for SalUn beside
    ``lamb`` for UCE): what a method other than the model's default one starts from. ``resolve_settings`` keeps
    only the chosen method's."""
    return dict(_normalise(model_defaults(model)[0]).get("method_args") or {})


def _check_keys(cfg: dict, where: str) -> None:
    from erasure.config import EraseConfig
    from erasure.methods import LEGACY_KEYS

    unknown = set(cfg) - set(EraseConfig.__dataclass_fields__) - set(LEGACY_KEYS)
    if unknown:
        raise ValueError(f"{where}: unknown settings {sorted(unknown)}; see `erasure erase --help`")
    if "concepts" in cfg:
        raise ValueError(f"{where}: model defaults cannot hold concepts; put them in a preset")


def _normalise(layer: dict[str, Any]) -> dict[str, Any]:
    """Move legacy top-level method keys (``alpha``) into ``method_args``; copy nested dicts."""
    from erasure.methods import LEGACY_KEYS

    out = {k: (dict(v) if k in _NESTED and isinstance(v, dict) else v) for k, v in layer.items()}
    for old, new in LEGACY_KEYS.items():
        if old in out:
            out.setdefault("method_args", {})
            out["method_args"] = dict(out["method_args"] or {})
            out["method_args"].setdefault(new, out.pop(old))
    for k in _NESTED:
        if k in out and out[k] is not None and not isinstance(out[k], dict):
            raise ValueError(f"{k} must be a JSON object of settings, got {out[k]!r}")
    return out


def resolve_settings(layers: list[tuple[str, dict[str, Any]]]) -> tuple[dict[str, Any], dict[str, str]]:
    """Merge ``[(source, settings), ...]`` (lowest precedence first) into one EraseConfig dict.

    Returns ``(data, settings_source)``; ``data`` holds no ``concepts``. Method settings of a method other than the
    final one are dropped (a preset's ``alpha`` does not reach ``--method esd``).
    """
    from erasure.auto.config import AutoConfig
    from erasure.config import EraseConfig
    from erasure.methods import get_method

    data: dict[str, Any] = {}
    src: dict[str, str] = {}
    nested: dict[str, dict[str, Any]] = {k: {} for k in _NESTED}
    for label, raw in layers:
        layer = _normalise(raw or {})
        for k, v in layer.items():
            if k == "concepts":
                continue
            if k in _NESTED:
                for kk, vv in (v or {}).items():
                    nested[k][kk] = vv
                    src[f"{k}.{kk}"] = label
            else:
                data[k] = v
                src[k] = label
    method = data.get("method", EraseConfig.__dataclass_fields__["method"].default)
    fields = {f.name for f in dataclasses.fields(get_method(method).config_cls)}
    for k in list(nested["method_args"]):
        if k not in fields:
            del nested["method_args"][k]
            src.pop(f"method_args.{k}", None)
    data["method_args"] = nested["method_args"]
    data["auto"] = nested["auto"]
    # every other setting comes from the built-in defaults
    for f in dataclasses.fields(EraseConfig):
        if f.name not in ("concepts", "method_args", "auto"):
            src.setdefault(f.name, "builtin")
    for f in dataclasses.fields(get_method(method).config_cls):
        src.setdefault(f"method_args.{f.name}", "builtin")
    for f in dataclasses.fields(AutoConfig):
        src.setdefault(f"auto.{f.name}", "builtin")
    return data, dict(sorted(src.items()))


def default_config(model: str = "default", concepts: list | None = None, preset: str | None = None,
                   **overrides: Any):
    """An :class:`~erasure.EraseConfig` that starts from the model's defaults (then ``preset``, then ``overrides``).

    Returns ``(config, settings_source)``. ``overrides`` may hold ``method_args={...}`` and ``auto={...}``.

    >>> from erasure import ConceptSpec
    >>> cfg, source = default_config(concepts=[ConceptSpec(name="star", forget_prompts=["a star"],
    ...                                                    anchor_prompts=["a circle"])])  # doctest: +SKIP
    """
    from erasure.config import EraseConfig
    from erasure.presets import load_preset

    layers: list[tuple[str, dict]] = []
    mdef, msrc = model_defaults(overrides.get("model", model))
    if msrc:
        layers.append((msrc, mdef))
    items = [c.to_dict() if hasattr(c, "to_dict") else c for c in (concepts or [])]
    if preset:
        pr = load_preset(preset)
        layers.append((f"preset:{pr.name}", pr.config))
        items = [c.to_dict() for c in pr.concepts] + items
    layers.append(("argument", {"model": model, **overrides}))
    data, src = resolve_settings(layers)
    data["concepts"] = items
    return EraseConfig.from_dict(data), src
