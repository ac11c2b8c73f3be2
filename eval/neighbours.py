"""The report's "neighbours" section: how the erased run's neighbour concepts (``run.json["auto"]``, chosen by
:mod:`erasure.auto.neighbours`) fare, original vs erased, on the images of the report whose prompts name them.

Per neighbour term and model: the judge's accuracy on the attributes each such prompt names (``object`` metric,
e.g. the shapes judge) or the mean CLIP score (``clip`` metric). Only images already generated and scored are used:
put prompts naming the neighbours in the prompt set (``prompts/shapes.csv`` names every shape, colour and fill).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

__all__ = ["neighbour_terms", "neighbour_table"]


def neighbour_terms(runs: list[dict[str, Any]]) -> list[str]:
    """The neighbour terms of every erased run among ``runs`` (read from each run directory's run.json)."""
    terms: dict[str, None] = {}
    for r in runs:
        rd = r.get("run_dir")
        p = Path(rd) / "run.json" if rd else None
        if p is None or not p.is_file():
            continue
        try:
            info = json.loads(p.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        for c in ((info.get("auto") or {}).get("concepts") or {}).values():
            for t in (c.get("neighbours") or {}).get("terms", []):
                terms[t["term"]] = None
    return list(terms)


def _per_image(run: dict[str, Any]) -> tuple[str, dict[str, float]] | None:
    """``(kind, {file: value})`` from the run's cached object or clip records, or None."""
    from erasure.io import read_json
    from erasure_eval.generate import read_manifest

    root = Path(run["dir"])
    _, _, manifest = read_manifest(root)
    by_file = {m["file"]: m for m in manifest}
    for key, m in run["metrics"].items():
        if m.get("metric") not in ("object", "clip"):
            continue
        p = root / "scores" / f"{key}.json"
        if not p.is_file():
            continue
        recs = read_json(p).get("records", {})
        out = {}
        for f, r in recs.items():
            rec, item = r.get("record", {}), by_file.get(f, {})
            if m["metric"] == "clip":
                out[f] = rec.get("clip_score")
            else:
                truth = {a: v.strip() for a, v in (item.get("extra") or {}).items() if v and a in rec}
                if truth:
                    out[f] = 100.0 * sum(rec[a] == v for a, v in truth.items()) / len(truth)
        return ("judge accuracy %" if m["metric"] == "object" else "CLIP score"), \
            {f: v for f, v in out.items() if v is not None}
    return None


def neighbour_table(runs: list[dict[str, Any]]) -> tuple[str, list[str], list[list[str]]] | None:
    """``(title, header, rows)`` of the neighbours section, or None when no run has neighbours or no scores fit."""
    from erasure.auto.text import carries
    from erasure_eval.generate import read_manifest

    terms = neighbour_terms(runs)
    if not terms:
        return None
    cols, what = [], ""
    for r in runs:
        got = _per_image(r)
        _, _, manifest = read_manifest(r["dir"])
        prompts = {m["file"]: m.get("prompt", "") for m in manifest}
        cols.append((got[1] if got else {}, prompts))
        what = what or (got[0] if got else "")
    if not what:
        return None
    rows = []
    for t in terms:
        cells, n = [], 0
        for vals, prompts in cols:
            sel = [v for f, v in vals.items() if carries(prompts.get(f, ""), [{"outline": "outlined"}.get(t, t)])
                   or carries(prompts.get(f, ""), [t])]
            n = max(n, len(sel))
            cells.append(f"{sum(sel) / len(sel):.1f}" if sel else "-")
        rows.append([t, str(n)] + cells)
    return (f"Neighbours ({what} on prompts naming each neighbour concept)", ["neighbour", "images"]
            + [r["label"] for r in runs], rows)
