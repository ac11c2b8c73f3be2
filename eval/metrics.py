"""Imports every metric module so that :data:`erasure_eval.base.METRICS` is filled."""

from __future__ import annotations

from erasure_eval import clip_score, fid, nudity, object_acc  # noqa: F401

__all__ = ["clip_score", "fid", "nudity", "object_acc"]
