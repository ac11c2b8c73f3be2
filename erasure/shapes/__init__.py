"""The shapes world: the embedded default text-to-image model, its renderer, captions and judge.

>>> from erasure.shapes import render, load_judge
>>> img = render("star", "blue", "striped", seed=0)          # 64x64 PIL image
>>> load_judge().predict([img])                              # doctest: +SKIP
[{'shape': 'star', 'color': 'blue', 'fill': 'striped', 'shape_conf': 0.99, ...}]

The pipeline folder (``models/shapes-sd``, diffusers Stable Diffusion format) is found with
:func:`default_model_path`; the judge weights with :func:`default_judge_path`. Torch-dependent names
(``load_judge``, ``Judge``, ...) are imported lazily so that rendering and captions need only numpy and Pillow.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from erasure.shapes.captions import (
    CONCEPT_WORDS,
    FILL_WORDS,
    GENERIC_NOUN,
    TEMPLATES,
    CaptionSampler,
    all_captions,
    concept_kind,
    concept_prompts,
    default_anchor,
    make_caption,
)
from erasure.shapes.render import COLOR_RGB, COLORS, FILLS, SHAPES, ShapeSpec, render, render_spec, sample_spec

if TYPE_CHECKING:  # pragma: no cover
    from erasure.shapes.judge import HEADS, Judge, JudgeNet, default_judge_path, load_judge

__all__ = [
    "SHAPES",
    "COLORS",
    "FILLS",
    "COLOR_RGB",
    "ShapeSpec",
    "render",
    "render_spec",
    "sample_spec",
    "GENERIC_NOUN",
    "FILL_WORDS",
    "TEMPLATES",
    "CONCEPT_WORDS",
    "CaptionSampler",
    "make_caption",
    "all_captions",
    "concept_kind",
    "concept_prompts",
    "default_anchor",
    "repo_root",
    "default_model_path",
    "default_judge_path",
    "load_judge",
    "Judge",
    "JudgeNet",
    "HEADS",
]

_LAZY = {"load_judge", "Judge", "JudgeNet", "default_judge_path", "HEADS"}


def repo_root() -> Path:
    """Absolute path of the source checkout (the folder that holds ``models/`` and ``prompts/``); only the
    training and prompt-writing scripts use it, since they write into the checkout."""
    return Path(__file__).resolve().parents[2]


def default_model_path() -> Path:
    """Absolute path of the embedded text-to-image pipeline folder (``models/shapes-sd``, shipped as package data)."""
    from erasure.resources import model_path

    return model_path("shapes-sd")


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        from erasure.shapes import judge

        return getattr(judge, name)
    raise AttributeError(f"module 'erasure.shapes' has no attribute {name!r}")
