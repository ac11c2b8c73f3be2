"""Benchmark: every method x seed on one scenario, resumable, summarised in the paper's table layout.

``run_bench`` writes ``results.json`` after every record (a killed run resumes, skipping finished
method x seed records whose configuration is unchanged), the splits (``splits/seed<k>.json``) and the
original models' metrics (``originals.json``); ``write_tables`` turns the records into ``table.csv``,
``table.md``, ``table.txt``, ``summary.json`` and ``table.png``.
"""

from __future__ import annotations

import csv
import io
import logging
import math
import os
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from erasure.classification.config import ClsBenchConfig
from erasure.classification.engine import Progress
from erasure.classification.methods import METHODS
from erasure.classification.metrics import GAP_KEYS, avg_gap
from erasure.classification.pipeline import Workspace, resolve_method_config, run_method, short_hash
from erasure.classification.registry import ordered
from erasure.io import atomic_write_json, atomic_write_text, environment_info, read_json

logger = logging.getLogger(__name__)

__all__ = ["run_bench", "summarize", "write_tables", "record_key", "TABLE_COLUMNS"]

TABLE_COLUMNS = ("UA", "MIA_efficacy", "RA", "TA")
EXTRA_COLUMNS = ("MIA_auc",)
_IGNORED_SETUP = ("cache_dir", "device", "threads", "eval_batch_size", "data_root", "download")


def record_key(cfg: ClsBenchConfig, ws: Workspace, method: str, method_cfg: Any, seed: int) -> str:
    """Identity of one record: setup (without paths/devices), recipe, method config and seed."""
    setup = {k: v for k, v in cfg.setup_dict().items() if k not in _IGNORED_SETUP}
    return short_hash({"setup": setup, "recipe": ws.recipe.to_dict(), "method": method,
                       "config": method_cfg.to_dict(), "seed": int(seed), "n_train": len(ws.bundle.train)})


def run_bench(cfg: ClsBenchConfig, ws: Workspace | None = None, progress: Progress | None = None
              ) -> dict[str, Any]:
    """Run (or resume) the benchmark and write its tables.

    Args:
        cfg (`ClsBenchConfig`): what to run and where to write it.
        ws (`Workspace`, *optional*): pre-built workspace (tests pass tiny data here).
        progress (`Callable[[int, int], None]`, *optional*): called with (finished records, total records).

    Returns:
        `dict`: the summary (also written to ``summary.json``).
    """
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    ws = ws or Workspace.create(cfg)
    methods = cfg.method_ids()
    if "retrain" not in methods:
        logger.warning("Retrain is not among the methods: Avg. Gap needs it and will be empty")
    cfg.save(out / "bench_config.json")
    res_path, orig_path = out / "results.json", out / "originals.json"
    records: list[dict[str, Any]] = read_json(res_path) if res_path.is_file() else []
    originals: list[dict[str, Any]] = read_json(orig_path) if orig_path.is_file() else []
    done = {r.get("key") for r in records}
    env = environment_info()
    seeds = list(range(cfg.first_seed, cfg.first_seed + cfg.seeds))
    total, finished = len(seeds) * len(methods), 0
    for seed in seeds:
        todo = []
        for m in methods:
            mc = resolve_method_config(m, cfg.dataset, cfg.scenario, cfg.presets, cfg.overrides.get(m))
            key = record_key(cfg, ws, m, mc, seed)
            if key in done:
                finished += 1
            else:
                todo.append((m, mc, key))
        if not todo:
            continue
        original, oinfo = ws.original(seed)
        split = ws.split(seed, save_to=out / "splits" / f"seed{seed}.json")
        okey = short_hash({"recipe": ws.recipe.to_dict(), "seed": seed, "split": split.to_dict(),
                           "model": cfg.model})
        if okey not in {o.get("key") for o in originals}:
            metrics = ws.evaluate(original, split, seed)
            originals.append({"method": "original", "seed": seed, "key": okey, **metrics,
                              "train_time_s": oinfo.get("train_time_s"), "checkpoint": oinfo.get("path")})
            atomic_write_json(orig_path, originals)
        for m, mc, key in todo:
            logger.info("seed %d: %s", seed, m)
            _, rec = run_method(ws, m, mc, seed, original, split)
            rec["key"], rec["versions"] = key, env
            rec["load_avg_1m"] = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
            records.append(rec)
            atomic_write_json(res_path, records)
            finished += 1
            logger.info("seed %d %-16s UA %6.2f MIA %6.2f RA %6.2f TA %6.2f AUC %6.2f RTE %.2fs", seed, m, rec["UA"],
                        rec["MIA_efficacy"], rec["RA"], rec["TA"], rec["MIA_auc"], rec["RTE_s"])
            if progress is not None:
                progress(finished, total)
    keys = {record_key(cfg, ws, m, resolve_method_config(m, cfg.dataset, cfg.scenario, cfg.presets,
                                                          cfg.overrides.get(m)), s) for m in methods for s in seeds}
    current = [r for r in records if r.get("key") in keys]
    return write_tables(current, out, originals=[o for o in originals if o["seed"] in seeds], plot=cfg.plot)


def _mean_std(vals: Sequence[float]) -> tuple[float, float]:
    vals = [float(v) for v in vals]
    if not vals:
        return float("nan"), float("nan")
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)


def summarize(records: list[dict[str, Any]], originals: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """Per-method means/stds, Avg. Gap to Retrain (of the means, as the paper), per-seed gaps and per-seed MIA."""
    order = ordered({r["method"] for r in records})
    by = {m: sorted((r for r in records if r["method"] == m), key=lambda r: r["seed"]) for m in order}
    rows: dict[str, dict[str, Any]] = {}
    for m, rs in by.items():
        row: dict[str, Any] = {"method": m, "n_seeds": len(rs), "seeds": [r["seed"] for r in rs]}
        for k in (*TABLE_COLUMNS, *EXTRA_COLUMNS, "RTE_s", "RTE_cpu_s", "TA_forgotten"):
            if all(k in r for r in rs):
                row[k], row[k + "_std"] = _mean_std([r[k] for r in rs])
        row["MIA_efficacy_per_seed"] = [round(r["MIA_efficacy"], 2) for r in rs]
        rows[m] = row
    if originals:
        os_ = sorted(originals, key=lambda r: r["seed"])
        row = {"method": "original", "n_seeds": len(os_), "seeds": [o["seed"] for o in os_]}
        for k in (*TABLE_COLUMNS, *EXTRA_COLUMNS, "TA_forgotten"):
            if all(k in o for o in os_):
                row[k], row[k + "_std"] = _mean_std([o[k] for o in os_])
        row["MIA_efficacy_per_seed"] = [round(o["MIA_efficacy"], 2) for o in os_]
        rows["original"] = row
    ref = rows.get("retrain")
    ref_seed = {r["seed"]: r for r in by.get("retrain", [])}
    for m, row in rows.items():
        if ref is None:
            row["Avg_Gap"] = row["Avg_Gap_AUC"] = float("nan")
            continue
        row["Avg_Gap"] = avg_gap(row, ref, GAP_KEYS)
        row["Avg_Gap_AUC"] = avg_gap(row, ref, ("UA", "MIA_auc", "RA", "TA"))
        src = by.get(m) if m != "original" else originals
        per = [avg_gap(r, ref_seed[r["seed"]], GAP_KEYS) for r in (src or []) if r["seed"] in ref_seed]
        row["Avg_Gap_seedwise"], row["Avg_Gap_seedwise_std"] = _mean_std(per)
    checks = _checks(rows, records)
    scen = sorted({r["scenario"] for r in records})
    return {"scenario": scen[0] if len(scen) == 1 else scen, "rows": rows, "checks": checks}


def _checks(rows: dict[str, dict[str, Any]], records: list[dict[str, Any]]) -> dict[str, Any]:
    """The issue's bars, evaluated on these results."""
    out: dict[str, Any] = {}
    if "salun" not in rows or "retrain" not in rows:
        return out
    s, r = rows["salun"], rows["retrain"]
    approx = {m: row["Avg_Gap"] for m, row in rows.items()
              if m not in ("original", "retrain") and not (m in METHODS and METHODS[m].exact)}
    if approx and all(math.isfinite(v) for v in approx.values()):
        best = min(approx, key=approx.get)
        out["smallest_avg_gap"] = {"method": best, "value": approx[best], "salun": approx["salun"],
                                   "met": best == "salun", "ranking": sorted(approx, key=approx.get)}
        auc = {m: rows[m]["Avg_Gap_AUC"] for m in approx}
        out["smallest_avg_gap_auc"] = {"method": min(auc, key=auc.get), "salun": auc["salun"],
                                       "ranking": sorted(auc, key=auc.get)}
    out["rte_ratio"] = {"salun_s": s["RTE_s"], "retrain_s": r["RTE_s"], "ratio": s["RTE_s"] / r["RTE_s"],
                        "met": s["RTE_s"] <= r["RTE_s"] / 5}
    if "RTE_cpu_s" in s and "RTE_cpu_s" in r:
        out["rte_ratio"]["cpu_ratio"] = s["RTE_cpu_s"] / r["RTE_cpu_s"]
    if any(rec["scenario"] == "class" for rec in records):
        out["class_ua"] = {"salun_UA": s["UA"], "min_seed_UA": min(rec["UA"] for rec in records
                                                                   if rec["method"] == "salun"),
                           "met": s["UA"] >= 99.0}
        out["class_ta"] = {"salun_TA": s["TA"], "retrain_TA": r["TA"], "diff": s["TA"] - r["TA"],
                           "met": abs(s["TA"] - r["TA"]) <= 2.0}
    return out


def _fmt(row: dict[str, Any], k: str, std: bool = True) -> str:
    v = row.get(k)
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    sd = row.get(k + "_std")
    return f"{v:.2f} ± {sd:.2f}" if std and sd is not None else f"{v:.2f}"


_LABELS = {"retrain": "Retrain", "ft": "FT", "rl": "RL", "ga": "GA", "iu": "IU", "l1_sparse": "l1-sparse",
           "boundary_shrink": "BS", "boundary_expand": "BE", "salun": "SalUn", "salun_soft": "SalUn-soft",
           "original": "Original (no unlearning)"}
_HEAD = ["Method", "UA", "MIA-Efficacy", "RA", "TA", "Avg. Gap", "RTE (s)", "MIA-AUC", "Avg. Gap (AUC)",
         "Avg. Gap per seed", "MIA-Efficacy per seed"]


def _table_rows(summary: dict[str, Any]) -> list[list[str]]:
    out = []
    for m, row in summary["rows"].items():
        out.append([_LABELS.get(m, m), _fmt(row, "UA"), _fmt(row, "MIA_efficacy"), _fmt(row, "RA"), _fmt(row, "TA"),
                    _fmt(row, "Avg_Gap", std=False), _fmt(row, "RTE_s"), _fmt(row, "MIA_auc"),
                    _fmt(row, "Avg_Gap_AUC", std=False), _fmt(row, "Avg_Gap_seedwise"),
                    " / ".join(f"{v:.1f}" for v in row.get("MIA_efficacy_per_seed", []))])
    return out


def write_tables(records: list[dict[str, Any]], out: str | Path, originals: list[dict[str, Any]] | None = None,
                 plot: bool = True) -> dict[str, Any]:
    """Write ``table.csv``, ``table.md``, ``table.txt``, ``summary.json`` (and ``table.png``) from records."""
    out = Path(out)
    summary = summarize(records, originals)
    # CSV: numbers only
    buf = io.StringIO()
    cols = ["method", "n_seeds"]
    for k in (*TABLE_COLUMNS, "RTE_s", *EXTRA_COLUMNS, "RTE_cpu_s", "TA_forgotten"):
        cols += [k, k + "_std"]
    cols += ["Avg_Gap", "Avg_Gap_AUC", "Avg_Gap_seedwise", "Avg_Gap_seedwise_std", "MIA_efficacy_per_seed"]
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(cols)
    for row in summary["rows"].values():
        vals = []
        for c in cols:
            v = row.get(c, "")
            if isinstance(v, list):
                v = " ".join(str(x) for x in v)
            elif isinstance(v, float):
                v = "" if math.isnan(v) else f"{v:.4f}"
            vals.append(v)
        w.writerow(vals)
    atomic_write_text(out / "table.csv", buf.getvalue())
    rows = _table_rows(summary)
    md = ["| " + " | ".join(_HEAD) + " |", "|" + "---|" * len(_HEAD)]
    md += ["| " + " | ".join(r) + " |" for r in rows]
    atomic_write_text(out / "table.md", "\n".join(md) + "\n")
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(_HEAD)]
    txt = ["  ".join(h.ljust(wd) for h, wd in zip(_HEAD, widths))]
    txt += ["  ".join(c.ljust(wd) for c, wd in zip(r, widths)) for r in rows]
    atomic_write_text(out / "table.txt", "\n".join(txt) + "\n")
    atomic_write_json(out / "summary.json", summary)
    if plot:
        try:
            _plot(summary, records, out / "table.png")
        except Exception as err:  # a plot must never lose the results
            logger.warning("could not write the plot: %s", err)
    return summary


def _plot(summary: dict[str, Any], records: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from erasure.io import atomic_path

    rows = {m: r for m, r in summary["rows"].items() if m != "original"}
    names = [_LABELS.get(m, m) for m in rows]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    axes[0].bar(names, [r["Avg_Gap"] for r in rows.values()], color="tab:blue")
    axes[0].set_title("Avg. Gap to Retrain (lower is better)")
    for i, m in enumerate(rows):
        ys = [r["MIA_efficacy"] for r in records if r["method"] == m]
        axes[1].scatter([i] * len(ys), ys, s=14)
    axes[1].set_xticks(range(len(names)), names)
    axes[1].set_title("MIA-Efficacy per seed")
    axes[2].bar(names, [r["RTE_s"] for r in rows.values()], color="tab:gray")
    axes[2].set_yscale("log")
    axes[2].set_title("Run time (s)")
    for ax in axes:
        ax.tick_params(axis="x", rotation=60)
    fig.suptitle(f"scenario: {summary['scenario']}")
    fig.tight_layout()
    with atomic_path(path, ".png") as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
