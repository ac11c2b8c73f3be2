"""Prompt-set CSV loading and filtering (I2P, COCO-30k, Imagenette, UnlearnDiffAtk, shapes, or any CSV).

A prompt set is a CSV with at least a ``prompt`` column. Optional columns are honoured per row:
``evaluation_seed`` (the torch generator seed), ``evaluation_guidance`` (the CFG scale), ``case_number``
(names the image files) and ``categories`` (comma-separated I2P categories, used by ``--category``).
Every other column (``shape``, ``class``, ``classidx``, ...) is carried into the manifest for the metrics.

Reference prompt sets are read from their own folder (``../shared/data/prompts/`` or a user path); they are
never copied into the repository.
"""

from __future__ import annotations

import csv
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from erasure.diffusion.pipeline import MAX_GUIDANCE, MAX_SEED
from erasure.io import file_sha256

logger = logging.getLogger(__name__)

__all__ = ["PromptRow", "PromptSet", "PromptFileError", "load_prompts", "filter_rows", "row_categories"]


class PromptFileError(ValueError):
    """The prompt CSV is missing, unreadable, lacks a ``prompt`` column, or a filter leaves no rows."""


@dataclass
class PromptRow:
    """One row of a prompt set, with its per-row seed and guidance (``None`` when the CSV has none)."""

    index: int  # 0-based position in the CSV (data rows)
    case_number: str
    prompt: str
    seed: int | None
    guidance: float | None
    categories: list[str] = field(default_factory=list)
    extra: dict[str, str] = field(default_factory=dict)


@dataclass
class PromptSet:
    path: str
    sha256: str
    columns: list[str]
    rows: list[PromptRow]
    skipped_empty: list[str] = field(default_factory=list)  # case numbers of rows with an empty prompt

    @property
    def name(self) -> str:
        return Path(self.path).stem


def row_categories(value: str | None) -> list[str]:
    """``"violence, self-harm"`` -> ``["violence", "self-harm"]``."""
    if not value:
        return []
    return [c.strip() for c in str(value).split(",") if c.strip()]


def _int_or_none(v: str | None, what: str, line: int, path: str) -> int | None:
    text = "" if v is None else str(v).strip()
    if text.isdigit():  # exact (a float would round 2**63 - 1 up to 2**63)
        n = int(text)
    else:
        f = _float_or_none(v, what, line, path, finite_msg="is not a non-negative integer")
        if f is None:
            return None
        if f != int(f) or f < 0:
            raise PromptFileError(f"{path} line {line}: {what} {v!r} is not a non-negative integer")
        n = int(f)
    if n > MAX_SEED:
        raise PromptFileError(f"{path} line {line}: {what} {v!r} is out of range (0 to 2**63-1); fix the row and re-run")
    return n


def _float_or_none(v: str | None, what: str, line: int, path: str, finite_msg: str = "is not finite") -> float | None:
    if v is None or str(v).strip() == "":
        return None
    try:
        f = float(v)
    except ValueError as err:
        raise PromptFileError(f"{path} line {line}: {what} {v!r} is not a number") from err
    if not math.isfinite(f):
        raise PromptFileError(f"{path} line {line}: {what} {v!r} {finite_msg}")
    return f


def load_prompts(path: str | os.PathLike) -> PromptSet:
    """Read a prompt CSV (UTF-8, with or without a byte-order mark).

    Raises:
        PromptFileError: missing file, no ``prompt`` column, no non-empty prompt, bad seeds/guidance, duplicate
            case numbers. Rows with an empty prompt are skipped with a warning and listed in ``skipped_empty``.
    """
    p = Path(path).expanduser()
    if not p.is_file():
        raise PromptFileError(f"prompt file not found: {p}")
    try:
        with open(p, encoding="utf-8-sig", newline="") as fh:
            reader = csv.DictReader(fh)
            columns = [c.strip() for c in (reader.fieldnames or [])]
            raw = list(reader)
    except (UnicodeDecodeError, csv.Error) as err:
        raise PromptFileError(f"{p} is not a readable UTF-8 CSV file ({err})") from err
    if "prompt" not in columns:
        raise PromptFileError(f"{p} has no 'prompt' column (columns: {', '.join(c or '(unnamed)' for c in columns)})")
    rows: list[PromptRow] = []
    skipped: list[str] = []
    seen: dict[str, int] = {}
    for i, rec in enumerate(raw):
        rec = {(k or "").strip(): v for k, v in rec.items() if k is not None}
        line = i + 2
        prompt = (rec.get("prompt") or "").strip()
        case = (rec.get("case_number") or "").strip() or str(i)
        try:
            case = str(int(float(case)))
        except ValueError:
            pass
        if not all(ch.isalnum() or ch in "-_." for ch in case):
            raise PromptFileError(f"{p} line {line}: case_number {case!r} must be letters, digits, '-', '_' or '.'")
        if case in seen:
            raise PromptFileError(f"{p} line {line}: case_number {case} repeats line {seen[case]}")
        seen[case] = line
        if not prompt:  # the published I2P file has one (case 2260): skipped, logged and recorded
            skipped.append(case)
            continue
        extra = {k: v for k, v in rec.items() if k and k not in (
            "prompt", "case_number", "evaluation_seed", "evaluation_guidance", "categories")}
        guidance = _float_or_none(rec.get("evaluation_guidance"), "evaluation_guidance", line, str(p))
        if guidance is not None and not 0 <= guidance <= MAX_GUIDANCE:
            raise PromptFileError(f"{p} line {line}: evaluation_guidance {guidance!r} is out of range (0 to "
                                  f"{MAX_GUIDANCE:g}); fix the row and re-run")
        rows.append(PromptRow(
            index=i,
            case_number=case,
            prompt=prompt,
            seed=_int_or_none(rec.get("evaluation_seed"), "evaluation_seed", line, str(p)),
            guidance=guidance,
            categories=row_categories(rec.get("categories")),
            extra=extra,
        ))
    if skipped:
        logger.warning("%s: skipping %d row(s) with an empty prompt (case_number %s)", p, len(skipped),
                       ", ".join(skipped[:10]) + (" ..." if len(skipped) > 10 else ""))
    if not rows:
        raise PromptFileError(f"{p} has no rows with a prompt")
    return PromptSet(path=str(p.resolve()), sha256=file_sha256(p), columns=columns, rows=rows, skipped_empty=skipped)


def filter_rows(
    rows: list[PromptRow],
    category: str | list[str] | None = None,
    start: int | None = None,
    end: int | None = None,
    limit: int | None = None,
) -> list[PromptRow]:
    """Keep rows of any of ``category`` (I2P ``categories`` column), then CSV positions ``[start, end)``, then the first ``limit``.

    Raises:
        PromptFileError: an empty result (with what each filter left), or a category filter on a CSV without categories.
    """
    out = list(rows)
    cats = [category] if isinstance(category, str) else list(category or [])
    if cats:
        if not any(r.categories for r in rows):
            raise PromptFileError("--category was given but the prompt file has no 'categories' column values")
        want = {c.strip().lower() for c in cats}
        out = [r for r in out if want & {c.lower() for c in r.categories}]
        if not out:
            known = sorted({c for r in rows for c in r.categories})
            raise PromptFileError(f"no rows in category {', '.join(cats)}; categories in this file: {', '.join(known)}")
    if start is not None or end is not None:
        lo = 0 if start is None else start
        hi = max(len(rows), lo) if end is None else end
        if lo < 0 or hi < lo:
            raise PromptFileError(f"bad row range [{start}, {end})")
        out = [r for r in out if lo <= r.index < hi]
    if limit is not None:
        if limit < 1:
            raise PromptFileError(f"--limit must be >= 1, got {limit}")
        out = out[:limit]
    if not out:
        raise PromptFileError("the filters leave no prompt rows (check --category, --start/--end and --limit)")
    return out

