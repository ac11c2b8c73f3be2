"""Imports every metric module so that :data:`eval.base.METRICS` is filled."""

from __future__ import annotations

from eval import clip_score, fid, nudity, object_acc  # noqa: F401

__all__ = ["clip_score", "fid", "nudity", "object_acc"]
