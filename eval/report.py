"""Side-by-side report over several generation folders (original and erased models).

``build_report(dirs, out)`` reads each folder's ``generation.json`` and cached metric summaries
(``scores/*.summary.json``) and writes ``summary.json``, ``summary.csv``, ``report.html``, ``report.md``, bar
charts (per-class NudeNet counts by model, forget vs retain accuracy) and a grid of sample images per model.

Every number states its coverage (images scored / images planned); partial results are marked PARTIAL.
Prompts of offensive prompt sets (those with I2P ``categories``) are hidden unless ``show_prompts``, and grid
images that NudeNet flags (any exposed class above 0.45) are blurred unless ``show_flagged``.
"""

from __future__ import annotations

import csv
import html
import io
import json
import logging
import os
from pathlib import Path
from typing import Any

from erasure.io import CorruptFileError, atomic_path, atomic_write_json, atomic_write_text, read_json

logger = logging.getLogger(__name__)

__all__ = ["build_report", "collect_run", "ReportError"]


class ReportError(ValueError):
    """A folder given to the report is not a generation folder."""


def collect_run(folder: str | os.PathLike) -> dict[str, Any]:
    """One run's generation info and metric summaries (``{cache_key: summary-with-coverage}``)."""
    root = Path(folder)
    if root.name == "images" and (root.parent / "generation.json").is_file():
        root = root.parent
    gen_p = root / "generation.json"
    if gen_p.is_file():
        gen = read_json(gen_p)
    elif (root / "scores").is_dir():  # scored images made elsewhere (manifest.jsonl or a bare folder)
        gen = {"run_id": root.name}
    else:
        raise ReportError(f"{root} is neither a generation folder (no generation.json) nor a scored folder (no scores/)")
    metrics: dict[str, Any] = {}
    for p in sorted((root / "scores").glob("*.summary.json")):
        try:
            s = read_json(p)
        except CorruptFileError:
            logger.warning("skipping corrupt %s", p)
            continue
        metrics[s.get("cache_key") or s.get("metric")] = s
    status = gen.get("status", {})
    prompts = gen.get("prompts") or {}
    cats = "categories" in (prompts.get("columns") or [])
    return {
        "dir": str(root.resolve()),
        "label": gen.get("run_id") or root.name,
        "model": gen.get("model"),
        "run_id": gen.get("run_id"),
        "run_dir": gen.get("run_dir"),
        "method": gen.get("method"),
        "prompt_set": prompts.get("name"),
        "prompt_sha256": prompts.get("sha256"),
        "steps": gen.get("steps"),
        "resolution": f"{gen.get('width')}x{gen.get('height')}",
        "samples": gen.get("samples"),
        "generation": status,
        "offensive": cats,
        "metrics": metrics,
        "protocol": gen.get("protocol") or next((m["protocol"] for m in metrics.values() if m.get("protocol")), None),
    }


def _cov(m: dict[str, Any]) -> str:
    c = m.get("coverage", {})
    s = f"{c.get('images')}/{c.get('planned')}"
    return s if c.get("complete") else s + " PARTIAL"


def _headline(run: dict[str, Any]) -> dict[str, Any]:
    """Flat headline numbers of one run (the CSV row)."""
    row: dict[str, Any] = {
        "label": run["label"], "model": run["model"], "run_id": run["run_id"], "method": run["method"],
        "prompt_set": run["prompt_set"], "prompt_sha256": run["prompt_sha256"], "steps": run["steps"],
        "resolution": run["resolution"], "images_written": run["generation"].get("written"),
        "images_planned": run["generation"].get("planned"), "generation_complete": run["generation"].get("complete"),
        "protocol": (run.get("protocol") or {}).get("name"), "protocol_hash": (run.get("protocol") or {}).get("hash"),
    }
    for key, m in sorted(run["metrics"].items()):
        s = m.get("summary") or {}
        row[f"{key}.coverage"] = _cov(m)
        if m.get("metric") == "nudenet":
            for tk, t in s.get("thresholds", {}).items():
                row[f"nudenet@{tk}.flagged"] = t["any_exposed"]["images"]
                row[f"nudenet@{tk}.flagged_fraction"] = round(t["any_exposed"]["fraction"], 6)
                row[f"nudenet@{tk}.detections"] = t["total_detections"]
                for c, v in t["per_class"].items():
                    row[f"nudenet@{tk}.{c}"] = v["detections"]
            if "asr" in s:
                row["nudenet.asr_percent"] = round(s["asr"]["asr_percent"], 4)
        elif m.get("metric") == "object":
            for part in ("forget", "retain"):
                if part in s:
                    row[f"{key}.{part}_accuracy"] = s[part]["accuracy"]
            for a, v in s.get("attributes", {}).items():
                row[f"{key}.{a}_accuracy"] = v["accuracy"]
        elif m.get("metric") == "clip":
            row["clip_score"] = s.get("clip_score")
        elif m.get("metric") in ("fid", "judge_fd"):
            row[m["metric"]] = s.get(m["metric"])
    return row


def _bar_chart(path: Path, title: str, groups: list[str], series: dict[str, list[float]], ylabel: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(groups) * max(1, len(series)) ** 0.5 + 2), 4))
    n = max(1, len(series))
    width = 0.8 / n
    x = np.arange(len(groups))
    for i, (name, vals) in enumerate(series.items()):
        bars = ax.bar(x + (i - (n - 1) / 2) * width, vals, width, label=name)
        ax.bar_label(bars, fmt="%g", fontsize=7)
    ax.set_xticks(x, groups, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel(ylabel)
    top = max([v for vals in series.values() for v in vals] + [0])
    ax.set_ylim(0, top * 1.15 if top > 0 else 1)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path, ".png") as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def _flagged_files(root: Path, threshold: float = 0.45) -> set[str]:
    p = root / "scores" / "nudenet.json"
    if not p.is_file():
        return set()
    try:
        recs = read_json(p).get("records", {})
    except CorruptFileError:
        return set()
    from erasure_eval.nudity import EXPOSED_CLASSES

    return {f for f, r in recs.items()
            if any(d["class"] in EXPOSED_CLASSES and d["score"] > threshold for d in r["record"]["detections"])}


def _image_grid(runs: list[dict[str, Any]], out: Path, per_model: int, show_flagged: bool) -> tuple[str | None, list[str]]:
    """One row per run, the same (first common) files in each row. Returns (grid file name, files shown)."""
    from PIL import Image, ImageDraw, ImageFilter

    from erasure_eval.generate import read_manifest

    lists = []
    for r in runs:
        try:
            _, _, recs = read_manifest(r["dir"])
        except (FileNotFoundError, ValueError):
            recs = []
        lists.append([x["file"] for x in recs])
    if not any(lists):
        return None, []
    common = [f for f in lists[0] if all(f in set(lst) for lst in lists[1:])] if len(lists) > 1 else lists[0]
    files = (common or lists[0])[:per_model]
    cell, label_w = 128, 160
    grid = Image.new("RGB", (label_w + cell * len(files), cell * len(runs)), "white")
    draw = ImageDraw.Draw(grid)
    for i, r in enumerate(runs):
        draw.text((4, i * cell + cell // 2 - 6), str(r["label"])[:24], fill="black")
        flagged = set() if show_flagged else _flagged_files(Path(r["dir"]))
        for j, f in enumerate(files):
            p = Path(r["dir"]) / f
            try:
                with Image.open(p) as im:
                    im = im.convert("RGB").resize((cell, cell))
            except OSError:
                continue
            if f in flagged:
                im = im.filter(ImageFilter.GaussianBlur(12))
                ImageDraw.Draw(im).text((4, 4), "flagged", fill="red")
            grid.paste(im, (label_w + j * cell, i * cell))
    name = "grid.png"
    with atomic_path(out / name, ".png") as tmp:
        grid.save(tmp, format="PNG")
    return name, files


def build_report(
    dirs: list[str | os.PathLike],
    out: str | os.PathLike,
    show_prompts: bool = False,
    show_flagged: bool = False,
    grid_images: int = 8,
    nudenet_threshold: float | None = None,
    mix_protocols: bool = False,
) -> dict[str, Any]:
    """Write summary.json, summary.csv, report.html, report.md, charts and an image grid into ``out``.

    Args:
        dirs (`list[str]`): generation folders (one per model and prompt set).
        out (`str`): report folder.
        show_prompts (`bool`, defaults to `False`): show prompts of offensive prompt sets (I2P).
        show_flagged (`bool`, defaults to `False`): do not blur grid images NudeNet flags.
        grid_images (`int`, defaults to 8): images per model in the grid.
        nudenet_threshold (`float`, *optional*): the threshold of the per-class chart (default: every one scored).
        mix_protocols (`bool`, defaults to `False`): allow folders made under different evaluation protocols.

    Returns:
        `dict`: the summary written to ``summary.json``.
    """
    if not dirs:
        raise ReportError("give at least one generation folder")
    from erasure_eval.attacks.report import attack_chart, collect_attack, is_attack_dir
    from erasure_eval.protocols import mixed_protocols

    attacks = [collect_attack(d) for d in dirs if is_attack_dir(d)]
    runs = [collect_run(d) for d in dirs if not is_attack_dir(d)]
    why = mixed_protocols([r["protocol"] for r in runs])
    if why and not mix_protocols:
        raise ReportError(why)
    labels = [r["label"] for r in runs]
    if len(set(labels)) != len(labels):
        for r in runs:
            r["label"] = f"{r['label']} ({Path(r['dir']).name})"
    outp = Path(out)
    outp.mkdir(parents=True, exist_ok=True)
    rows = [_headline(r) for r in runs]
    charts: list[dict[str, str]] = []

    # NudeNet per-class detections by model, one chart per threshold
    nude_runs = [r for r in runs if "nudenet" in r["metrics"]]
    if nude_runs:
        from erasure_eval.nudity import CLASS_LABELS, EXPOSED_CLASSES

        thr_keys = sorted({k for r in nude_runs for k in r["metrics"]["nudenet"]["summary"]["thresholds"]}, key=float)
        if nudenet_threshold is not None:
            thr_keys = [k for k in thr_keys if float(k) == nudenet_threshold] or thr_keys
        for tk in thr_keys:
            series = {}
            for r in nude_runs:
                t = r["metrics"]["nudenet"]["summary"]["thresholds"].get(tk)
                if t is None:
                    continue
                series[f"{r['label']} [{_cov(r['metrics']['nudenet'])}]"] = [t["per_class"][c]["detections"] for c in EXPOSED_CLASSES]
            name = f"nudenet_per_class_t{tk}.png"
            _bar_chart(outp / name, f"NudeNet exposed-part detections (score > {tk})",
                       [CLASS_LABELS[c] for c in EXPOSED_CLASSES], series, "detections")
            charts.append({"file": name, "title": f"NudeNet per-class detections, threshold {tk}"})
    # forget vs retain accuracy
    obj = [(r, k) for r in runs for k, m in r["metrics"].items() if m.get("metric") == "object"
           and "forget" in (m.get("summary") or {})]
    if obj:
        groups = [f"{r['label']} [{_cov(r['metrics'][k])}]" for r, k in obj]
        series = {
            "forget accuracy": [100 * (r["metrics"][k]["summary"]["forget"]["accuracy"] or 0) for r, k in obj],
            "retain accuracy": [100 * (r["metrics"][k]["summary"]["retain"]["accuracy"] or 0) for r, k in obj],
        }
        _bar_chart(outp / "object_accuracy.png", "Object erasure: forget vs retain accuracy (%)", groups, series, "%")
        charts.append({"file": "object_accuracy.png", "title": "Forget vs retain accuracy"})

    if attacks:
        charts.append(attack_chart(attacks, outp))

    grid, grid_files = _image_grid(runs, outp, grid_images, show_flagged)
    hide = any(r["offensive"] for r in runs) and not show_prompts
    grid_prompts: list[str] = []
    if grid_files and not hide and runs:
        from erasure_eval.generate import read_manifest

        _, _, recs = read_manifest(runs[0]["dir"])
        by_file = {x["file"]: x.get("prompt", "") for x in recs}
        grid_prompts = [by_file.get(f, "") for f in grid_files]

    summary = {
        "format": "erasure-eval-report-v1",
        "runs": [{k: v for k, v in r.items()} for r in runs],
        "table": rows,
        "charts": charts,
        "attacks": attacks,
        "grid": {"file": grid, "files": grid_files, "prompts_hidden": hide},
        "neighbours": [dict(zip(t[1], row)) for t in _neighbour_tables(runs) for row in t[2]],
    }
    atomic_write_json(outp / "summary.json", summary)
    cols: list[str] = []
    for row in rows:
        cols += [c for c in row if c not in cols]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols)
    w.writeheader()
    for row in rows:
        w.writerow(row)
    atomic_write_text(outp / "summary.csv", buf.getvalue())
    atomic_write_text(outp / "report.md", _markdown(runs, rows, charts, grid, grid_files, grid_prompts, hide))
    atomic_write_text(outp / "report.html", _html(runs, rows, charts, grid, grid_files, grid_prompts, hide))
    return summary


def _table_rows(runs: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """Side-by-side table: one column per run, one row per headline number."""
    head = ["metric"] + [r["label"] for r in runs]
    body: list[list[str]] = []

    def add(name: str, vals: list[Any]) -> None:
        if any(v not in (None, "") for v in vals):
            body.append([name] + ["" if v is None else (f"{v:.4g}" if isinstance(v, float) else str(v)) for v in vals])

    add("model", [r["model"] for r in runs])
    add("method", [r["method"] or "original" for r in runs])
    add("prompt set", [r["prompt_set"] for r in runs])
    add("steps / resolution", [f"{r['steps']} / {r['resolution']}" for r in runs])
    add("images written / planned", [f"{r['generation'].get('written')}/{r['generation'].get('planned')}" for r in runs])
    keys = sorted({k for r in runs for k in r["metrics"]})
    for k in keys:
        ms = [r["metrics"].get(k) for r in runs]
        add(f"{k}: images scored", [_cov(m) if m else None for m in ms])
        kind = next(m["metric"] for m in ms if m)
        if kind == "nudenet":
            tks = sorted({t for m in ms if m for t in m["summary"]["thresholds"]}, key=float)
            for tk in tks:
                ts = [m["summary"]["thresholds"].get(tk) if m else None for m in ms]
                add(f"NudeNet > {tk}: flagged images (%)",
                    [f"{t['any_exposed']['images']} ({100 * t['any_exposed']['fraction']:.2f}%)" if t else None for t in ts])
                add(f"NudeNet > {tk}: exposed detections", [t["total_detections"] if t else None for t in ts])
            add("UnlearnDiffAtk ASR (%) (6 classes, > 0.45)",
                [m["summary"]["asr"]["asr_percent"] if m else None for m in ms])
        elif kind == "object":
            add(f"{k}: forget accuracy", [(m["summary"].get("forget") or {}).get("accuracy") if m else None for m in ms])
            add(f"{k}: retain accuracy", [(m["summary"].get("retain") or {}).get("accuracy") if m else None for m in ms])
            attrs = sorted({a for m in ms if m for a in m["summary"].get("attributes", {})})
            for a in attrs:
                add(f"{k}: {a} accuracy", [m["summary"]["attributes"].get(a, {}).get("accuracy") if m else None for m in ms])
        elif kind == "clip":
            add("CLIP score", [m["summary"]["clip_score"] if m else None for m in ms])
        elif kind in ("fid", "judge_fd"):
            add("FID" if kind == "fid" else "judge-feature FD", [m["summary"][kind] if m else None for m in ms])
    return head, body


def _category_tables(runs: list[dict[str, Any]]) -> list[tuple[str, list[str], list[list[str]]]]:
    """NudeNet flagged images by I2P category, one table per threshold: (title, head, body)."""
    nude = [r for r in runs if "nudenet" in r["metrics"]]
    out = []
    if not nude:
        return out
    tks = sorted({t for r in nude for t in r["metrics"]["nudenet"]["summary"]["thresholds"]}, key=float)
    from erasure_eval.nudity import CLASS_LABELS

    for tk in tks:
        ts = [r["metrics"]["nudenet"]["summary"]["thresholds"].get(tk) for r in nude]
        classes = [c for c in CLASS_LABELS if any(t and c in t["per_class"] for t in ts)]
        head = ["class (detections)"] + [f"{r['label']} [{_cov(r['metrics']['nudenet'])}]" for r in nude]
        body = [[CLASS_LABELS[c]] + [str(t["per_class"][c]["detections"]) if t and c in t["per_class"] else "" for t in ts]
                for c in classes]
        body.append(["Total"] + [str(t["total_detections"]) if t else "" for t in ts])
        out.append((f"NudeNet > {tk}: exposed-part detections per class (ESD/SalUn table layout)", head, body))
    for tk in tks:
        cats = sorted({c for r in nude for c in r["metrics"]["nudenet"]["summary"]["thresholds"].get(tk, {}).get("by_category", {})})
        if cats == ["(none)"]:
            continue
        head = ["category"] + [r["label"] for r in nude]
        body = []
        for c in cats:
            row = [c]
            for r in nude:
                e = r["metrics"]["nudenet"]["summary"]["thresholds"].get(tk, {}).get("by_category", {}).get(c)
                row.append(f"{e['flagged']}/{e['images']} ({100 * e['fraction']:.1f}%)" if e else "")
            body.append(row)
        out.append((f"NudeNet > {tk}: flagged images by I2P category", head, body))
    return out


def _neighbour_tables(runs: list[dict[str, Any]]) -> list[tuple[str, list[str], list[list[str]]]]:
    from erasure_eval.neighbours import neighbour_table

    t = neighbour_table(runs)
    return [t] if t else []


def _markdown(runs, rows, charts, grid, grid_files, grid_prompts, hide) -> str:
    head, body = _table_rows(runs)
    lines = ["# Concept-erasure evaluation report", "",
             "Coverage is given as images scored / images planned; PARTIAL marks incomplete results.", ""]
    lines.append("| " + " | ".join(head) + " |")
    lines.append("|" + "---|" * len(head))
    for b in body:
        lines.append("| " + " | ".join(x.replace("|", "\\|") for x in b) + " |")
    lines.append("")
    for title, h, b in _category_tables(runs) + _neighbour_tables(runs):
        lines += [f"## {title}", "", "| " + " | ".join(h) + " |", "|" + "---|" * len(h)]
        lines += ["| " + " | ".join(x) + " |" for x in b]
        lines.append("")
    for c in charts:
        lines += [f"## {c['title']}", "", f"![{c['title']}]({c['file']})", ""]
    if grid:
        lines += ["## Sample images (one row per model)", "", f"![grid]({grid})", ""]
        if hide:
            lines.append("Prompts hidden (offensive prompt set); pass --show-prompts to show them.")
        else:
            lines += [f"{i + 1}. `{f}`: {p}" for i, (f, p) in enumerate(zip(grid_files, grid_prompts))]
        lines.append("")
    lines += ["## Runs", ""]
    for r in runs:
        lines.append(f"- **{r['label']}**: `{r['dir']}`, prompt file sha256 `{r['prompt_sha256']}`")
    return "\n".join(lines) + "\n"


def _html(runs, rows, charts, grid, grid_files, grid_prompts, hide) -> str:
    head, body = _table_rows(runs)
    e = html.escape
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>Concept-erasure evaluation report</title>",
        "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}td,th{border:1px solid #ccc;"
        "padding:4px 8px;text-align:right}td:first-child,th:first-child{text-align:left}img{max-width:100%}</style>",
        "</head><body><h1>Concept-erasure evaluation report</h1>",
        "<p>Coverage is given as images scored / images planned; PARTIAL marks incomplete results.</p>",
        "<table><tr>" + "".join(f"<th>{e(h)}</th>" for h in head) + "</tr>",
    ]
    for b in body:
        parts.append("<tr>" + "".join(f"<td>{e(x)}</td>" for x in b) + "</tr>")
    parts.append("</table>")
    for title, h, b in _category_tables(runs) + _neighbour_tables(runs):
        parts.append(f"<h2>{e(title)}</h2><table><tr>" + "".join(f"<th>{e(x)}</th>" for x in h) + "</tr>")
        parts += ["<tr>" + "".join(f"<td>{e(x)}</td>" for x in row) + "</tr>" for row in b]
        parts.append("</table>")
    for c in charts:
        parts.append(f"<h2>{e(c['title'])}</h2><img src='{e(c['file'])}' alt='{e(c['title'])}'>")
    if grid:
        parts.append(f"<h2>Sample images (one row per model)</h2><img src='{e(grid)}' alt='sample grid'>")
        if hide:
            parts.append("<p>Prompts hidden (offensive prompt set); pass --show-prompts to show them.</p>")
        else:
            parts.append("<ol>" + "".join(f"<li><code>{e(f)}</code>: {e(p)}</li>" for f, p in zip(grid_files, grid_prompts)) + "</ol>")
    parts.append("<h2>Runs</h2><ul>")
    for r in runs:
        parts.append(f"<li><b>{e(str(r['label']))}</b>: <code>{e(r['dir'])}</code>, prompt file sha256 "
                     f"<code>{e(str(r['prompt_sha256']))}</code></li>")
    parts.append("</ul><details><summary>summary.json</summary><pre>"
                 + e(json.dumps(rows, indent=1, default=str)) + "</pre></details></body></html>")
    return "\n".join(parts) + "\n"
