"""Attack folders in ``erasure-eval report``: a pre/post attack-success-rate chart per model."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from erasure.io import read_json

__all__ = ["is_attack_dir", "collect_attack", "attack_chart"]


def is_attack_dir(folder: str | os.PathLike) -> bool:
    p = Path(folder) / "attack.json"
    if not p.is_file():
        return False
    try:
        return str(read_json(p).get("format", "")).startswith("erasure-eval-attack")
    except ValueError:
        return False


def collect_attack(folder: str | os.PathLike) -> dict[str, Any]:
    """An attack folder's manifest and summary (``summary: None`` while it is incomplete)."""
    from erasure_eval.attacks.runner import _read_rows, summarize  # noqa: PLC2701 - same package

    root = Path(folder)
    man = read_json(root / "attack.json")
    summary = read_json(root / "summary.json") if (root / "summary.json").is_file() else None
    if summary is None:  # partial: summarise the rows present, flagged as such
        rows = _read_rows(root / "attacks.jsonl")
        summary = dict(summarize(rows, man), complete=False)
    s = man.get("settings", {})
    return {"dir": str(root.resolve()), "label": f"{man.get('run_id') or root.name} · {s.get('attack')}",
            "run_id": man.get("run_id"), "attack": s.get("attack"), "judge": (s.get("judge") or {}).get("judge"),
            "concept": (s.get("judge") or {}).get("concept"), "summary": summary}


def attack_chart(attacks: list[dict[str, Any]], outp: Path) -> dict[str, str]:
    """Grouped bars: ASR before and after the attack (percent of prompts) for each (model, attack) folder."""
    from erasure_eval.report import _bar_chart  # noqa: PLC2701 - same package

    labels = [a["label"] for a in attacks]
    for a in attacks:
        if labels.count(a["label"]) > 1:
            a["label"] = f"{a['label']} [{Path(a['dir']).name}]"

    groups = [f"{a['label']} ({a['summary']['n_prompts']}{'' if a['summary'].get('complete', True) else ', partial'})"
              for a in attacks]
    series = {"ASR before attack (%)": [a["summary"]["asr_pre"] for a in attacks],
              "ASR after attack (%)": [a["summary"]["asr_post"] for a in attacks]}
    _bar_chart(outp / "attack_asr.png", "Attack success rate before and after the attack (%)", groups, series, "%")
    return {"file": "attack_asr.png", "title": "Attack success rate, before vs after the attack"}
