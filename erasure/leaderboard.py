"""The leaderboard of ``erasure bench``: one row per method, mean and spread over training seeds, written as
CSV, Markdown, JSON and HTML, with a forget-vs-retain scatter (SVG) marking the Pareto front.

Columns (percent unless named otherwise): ``forget`` = images in which the judge still sees the concept;
``retain`` = the judge's accuracy on the concept's own kind over the retain prompts (shape accuracy for a shape
erasure; SD objects: accuracy on the other classes; empty for nudity, which has no retain judge);
``retain_other`` = mean accuracy on the other kinds; ``erase_s`` = seconds of one erasure (mask + fine-tuning or
edit, without building Df/Dr, which every unit shares; the wall time with it is in leaderboard.json);
``peak_mem_mb`` = peak memory of one erasure; each with ``_std`` = sample standard deviation over seeds.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import statistics
from pathlib import Path
from typing import Any

from erasure.io import atomic_write_json, atomic_write_text

__all__ = ["FIGURES", "COLUMNS", "aggregate", "pareto_front", "write_leaderboard"]

FIGURES = ("forget", "retain", "retain_other", "erase_s", "peak_mem_mb")
COLUMNS = ["method"] + [c for f in FIGURES for c in (f, f + "_std")] + ["n_seeds", "protocol", "protocol_hash"]


def _mean_std(xs: list[float | None]) -> tuple[float | None, float | None]:
    v = [float(x) for x in xs if x is not None]
    if not v:
        return None, None
    return round(statistics.fmean(v), 4), round(statistics.stdev(v), 4) if len(v) > 1 else 0.0


def _erase_s(st: dict[str, Any]) -> float | None:
    """Seconds of one erasure without building Df/Dr: the images are generated once per bench into the shared
    cache, so the unit that happened to build them would otherwise carry that time alone."""
    t = st.get("timing_s") or {}
    if isinstance(t, dict) and t.get("total") is not None and t.get("data") is not None:
        return round(float(t["total"]) - float(t["data"]), 2)
    return st.get("erase_s")


def aggregate(methods: list[str], seeds: list[int], stamp: dict[str, Any], stats: dict, results: dict) -> list[dict]:
    """One row per method over the seeds finished so far (plus the original model, ``method = original``)."""
    rows = []
    orig = results.get("original")
    if orig is not None:
        row: dict[str, Any] = {"method": "original"}
        for f in FIGURES:
            v = orig.get(f) if f in ("forget", "retain", "retain_other") else None
            row[f], row[f + "_std"] = (None if v is None else round(float(v), 4)), None
        row.update(n_seeds=0, protocol=stamp["name"], protocol_hash=stamp["hash"])
        rows.append(row)
    for m in methods:
        done = [s for s in seeds if (m, s) in stats and f"{m}-seed{s}" in results]
        if not done:
            continue
        row = {"method": m}
        for f in FIGURES:
            if f == "erase_s":
                vals = [_erase_s(stats[(m, s)]) for s in done]
            else:
                vals = [(stats[(m, s)] if f == "peak_mem_mb" else results[f"{m}-seed{s}"]).get(f) for s in done]
            row[f], row[f + "_std"] = _mean_std(vals)
        row.update(n_seeds=len(done), protocol=stamp["name"], protocol_hash=stamp["hash"])
        rows.append(row)
    return rows


def pareto_front(rows: list[dict]) -> list[str]:
    """Methods no other method beats on both axes (lower forget, higher retain)."""
    pts = [(r["method"], r["forget"], r["retain"]) for r in rows if r["forget"] is not None and r["retain"] is not None]
    front = []
    for m, f, r in pts:
        if not any((f2 <= f and r2 >= r) and (f2 < f or r2 > r) for _, f2, r2 in pts):
            front.append(m)
    return front


def _fmt(v: Any, std: Any = None) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.1f}" + (f" ± {std:.1f}" if isinstance(std, float) else "")
    return str(v)


def _svg(rows: list[dict], front: list[str], title: str) -> str | None:
    pts = [r for r in rows if r["forget"] is not None and r["retain"] is not None]
    if not pts:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.5))
    for r in pts:
        on = r["method"] in front
        ax.errorbar(r["retain"], r["forget"], xerr=r.get("retain_std") or 0, yerr=r.get("forget_std") or 0,
                    fmt="o" if on else "s", ms=7, capsize=3, color="C3" if r["method"] == "original" else ("C0" if on else "C7"))
        ax.annotate(r["method"], (r["retain"], r["forget"]), textcoords="offset points", xytext=(6, 4), fontsize=9)
    fr = sorted((r for r in pts if r["method"] in front), key=lambda r: r["retain"])
    if len(fr) > 1:
        ax.step([r["retain"] for r in fr], [r["forget"] for r in fr], where="post", color="C0", lw=1, ls="--",
                label="Pareto front")
        ax.legend(loc="upper left", fontsize=8)
    ax.set_xlabel("retain: judge accuracy on the concept's kind, retain prompts (%) →")
    ax.set_ylabel("forget: images where the concept is still seen (%) ↓")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    buf = io.StringIO()
    fig.savefig(buf, format="svg", metadata={"Date": None})
    plt.close(fig)
    return buf.getvalue()


def write_leaderboard(out: Path, methods: list[str], seeds: list[int], stamp: dict[str, Any], preset: Any,
                      stats: dict, results: dict) -> dict[str, Any]:
    """Write ``DIR/leaderboard.{csv,md,json,html,svg}`` from the finished units; returns the JSON content."""
    out = Path(out)
    rows = aggregate(methods, seeds, stamp, stats, results)
    front = pareto_front(rows)
    title = f"{preset.name}: erasing {preset.concept.name!r} — protocol {stamp['name']} ({stamp['hash'][:12]})"
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=COLUMNS, lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: "" if r.get(k) is None else r[k] for k in COLUMNS})
    atomic_write_text(out / "leaderboard.csv", buf.getvalue())
    head = ["method", "forget %", "retain %", "retain other %", "erase s", "peak MB", "seeds", "Pareto"]
    md = [f"**{title}**", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        md.append("| " + " | ".join([r["method"], *(_fmt(r[f], r[f + "_std"]) for f in FIGURES), str(r["n_seeds"]),
                                    "yes" if r["method"] in front else ""]) + " |")
    md += ["", "mean ± sample standard deviation over training seeds (same Df/Dr, same evaluation prompts and seeds)."]
    atomic_write_text(out / "leaderboard.md", "\n".join(md) + "\n")
    per_seed = {k: v for k, v in results.items()}
    data_s = max([float((v.get("timing_s") or {}).get("data") or 0) for v in stats.values()] or [0.0])
    data = {"title": title, "protocol": stamp, "df_dr_build_s": round(data_s, 2), "preset": preset.name, "concept": preset.concept.name,
            "methods": methods, "seeds": seeds, "columns": COLUMNS, "rows": rows, "pareto_front": front,
            "per_seed": {"results": per_seed, "erase": {f"{m}-seed{s}": v for (m, s), v in stats.items()}}}
    atomic_write_json(out / "leaderboard.json", data)
    svg = _svg(rows, front, title)
    if svg is not None:
        atomic_write_text(out / "leaderboard.svg", svg)
    th = "".join(f"<th>{html.escape(h)}</th>" for h in head)
    trs = "".join(
        "<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in [r["method"], *(_fmt(r[f], r[f + "_std"]) for f in FIGURES),
                                                                str(r["n_seeds"]), "yes" if r["method"] in front else ""])
        + "</tr>" for r in rows)
    img = ""
    if svg is not None:
        img = f'<img alt="forget vs retain" src="data:image/svg+xml;base64,{base64.b64encode(svg.encode()).decode()}">'
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            "<style>body{font-family:sans-serif;margin:2em}td,th{padding:4px 10px;border-bottom:1px solid #ddd}"
            "td{text-align:right}td:first-child{text-align:left}</style></head><body>"
            f"<h2>{html.escape(title)}</h2><table><tr>{th}</tr>{trs}</table>"
            "<p>mean ± sample standard deviation over training seeds; forget: % of images in which the judge still sees "
            "the concept (lower is better); retain: judge accuracy on the concept's kind over the retain prompts.</p>"
            f"{img}</body></html>")
    atomic_write_text(out / "leaderboard.html", page)
    return data
