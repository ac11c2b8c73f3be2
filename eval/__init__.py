"""Evaluation harness: generate images from prompt sets, score them with registered metrics, report.

    erasure-eval generate --model PATH_OR_ID [--run RUN_DIR] --prompts CSV --out DIR [--samples K] [--category C] [--limit N]
    erasure-eval score --images DIR --metric nudenet|object|clip|fid|judge_fd [--threshold T] --out JSON
    erasure-eval report DIR... --out REPORT_DIR

Python API: :func:`erasure_eval.generate.run_generation`, :func:`evaluate` (score one folder with one metric),
:func:`erasure_eval.report.build_report`; metrics live in :data:`erasure_eval.base.METRICS`.
"""

from __future__ import annotations

import os
from typing import Any

__all__ = ["METRICS", "Metric", "MetricError", "get_metric", "register_metric", "score_folder", "evaluate"]


def __getattr__(name: str) -> Any:  # imported on first use, so `python -m erasure_eval` starts without torch
    if name in __all__ and name != "evaluate":
        from erasure_eval import base

        return getattr(base, name)
    raise AttributeError(f"module 'erasure_eval' has no attribute {name!r}")


def evaluate(images: str | os.PathLike, metric: str, out: str | os.PathLike | None = None, **params: Any) -> dict[str, Any]:
    """Score the generation folder ``images`` with the registered ``metric`` (cached, resumable)."""
    from erasure_eval.base import get_metric, score_folder

    return score_folder(images, get_metric(metric, **params), out=out)
