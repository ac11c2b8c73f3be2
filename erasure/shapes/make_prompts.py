"""Write the shapes model's evaluation prompts and erasure presets: ``python -m erasure.shapes.make_prompts``.

Outputs (paths relative to the repository root):

* ``prompts/shapes.csv`` -- ``case_number,prompt,evaluation_seed,shape,color,fill`` (blank where the prompt does
  not name a concept). Rows 0-35 name shape + color + fill (every shape x color pair once; fills balanced, 9 each,
  templates rotating); rows 36-41 shape + color; 42-47 shape only; 48-53 color only; 54-57 fill only;
  58 the generic ``a shape``.
* ``prompts/presets/shape_circle.json``, ``color_red.json``, ``fill_striped.json`` -- forget prompts naming the
  concept (every template), paired anchor prompts (the same prompt with ``circle -> square``, ``red -> blue``,
  ``striped -> solid``) and retain prompts naming other concepts of the same kind.
"""

from __future__ import annotations

import argparse
import csv
import io
import logging
from pathlib import Path
from typing import Any

from erasure.shapes.captions import FILL_WORDS, concept_kind, concept_prompts, default_anchor, make_caption
from erasure.shapes.render import COLORS, FILLS, SHAPES

logger = logging.getLogger(__name__)

__all__ = ["evaluation_rows", "preset", "multi_preset", "write_all", "PRESETS", "MULTI_PRESETS"]

PRESETS: tuple[str, ...] = ("circle", "red", "green", "striped")
SEED_STRIDE = 1000  # row i uses seeds evaluation_seed .. evaluation_seed + n - 1; rows never share seeds


def evaluation_rows() -> list[dict[str, Any]]:
    """The rows of ``prompts/shapes.csv``."""
    rows: list[dict[str, Any]] = []

    def add(shape, color, fill, template):
        rows.append({"case_number": len(rows), "prompt": make_caption(shape, color, fill, template),
                     "evaluation_seed": 40_000_000 + len(rows) * SEED_STRIDE,
                     "shape": shape or "", "color": color or "", "fill": fill or ""})

    for i, s in enumerate(SHAPES):
        for j, c in enumerate(COLORS):
            add(s, c, FILLS[(i + j) % len(FILLS)], (i * len(COLORS) + j) % 6)
    for i, s in enumerate(SHAPES):
        add(s, COLORS[(i + 3) % len(COLORS)], None, i % 6)
    for i, s in enumerate(SHAPES):
        add(s, None, None, i % 4)
    for j, c in enumerate(COLORS):
        add(None, c, None, j % 6)
    for k, f in enumerate(FILLS):
        add(None, None, f, k % 4)
    add(None, None, None, 0)
    return rows


#: Erase settings of the shapes presets, tuned on the shipped model with ``bench/shapes_erasure.py``.
PRESET_CONFIG: dict[str, Any] = {
    "alpha": 3.0, "mask_ratio": 0.5, "steps": 100, "batch_size": 8, "lr": 2.5e-4, "retain_loss": "distill",
    "forget_images_per_prompt": 4, "retain_images_per_prompt": 2,
}

#: Per-kind changes: the striped-fill erasure forgets fully at a lower learning rate and keeps more of the rest.
PRESET_CONFIG_BY_KIND: dict[str, dict[str, Any]] = {"fill": {"lr": 1.5e-4}}


def preset(name: str, anchor: str | None = None) -> dict[str, Any]:
    """Preset JSON for erasing concept ``name`` (a shape, color or fill) by remapping it to ``anchor``."""
    kind = concept_kind(name)
    anchor = anchor or default_anchor(name)
    word = FILL_WORDS.get(name, name) if kind == "fill" else name
    aword = FILL_WORDS.get(anchor, anchor) if kind == "fill" else anchor
    lists = concept_prompts(name, anchor)
    desc = {
        "shape": f"Erase the {name} shape; remaps each {name} prompt to the same prompt with a {anchor}.",
        "color": f"Erase the colour {name}; remaps each {name} prompt to the same prompt in {anchor}.",
        "fill": f"Erase the {word} fill; remaps each {word} prompt to the same prompt with the {aword} fill.",
    }[kind]
    return {
        "concept": {"name": name, **lists},
        "config": {**PRESET_CONFIG, **PRESET_CONFIG_BY_KIND.get(kind, {})},
        "description": desc,
        "kind": {"shape": "object", "color": "color", "fill": "fill"}[kind],
        "model": "shapes",
    }


#: Optimizer steps per erased concept in multi-concept presets.
STEPS_PER_CONCEPT = 200

#: Multi-concept presets: file stem -> (concepts, shared anchor).
MULTI_PRESETS: dict[str, tuple[tuple[str, ...], str]] = {"shape_circle_star_heart": (("circle", "star", "heart"), "square")}


def multi_preset(names: tuple[str, ...] | list[str], anchor: str) -> dict[str, Any]:
    """Preset JSON erasing several concepts of one kind in one run, each remapped to ``anchor``.

    A concept's retain prompts never name another erased concept (they would pull it back).
    """
    import re

    kinds = {concept_kind(n) for n in (*names, anchor)}
    if len(kinds) != 1 or anchor in names or len(set(names)) != len(names):
        raise ValueError(f"erase distinct concepts of one kind and remap them to another of that kind: {names} -> {anchor}")
    erased = re.compile(r"\b(" + "|".join(re.escape(FILL_WORDS.get(n, n)) for n in names) + r")\b")
    concepts = []
    for name in names:
        lists = concept_prompts(name, anchor)
        lists["retain_prompts"] = [p for p in lists["retain_prompts"] if not erased.search(p)]
        concepts.append({"name": name, **lists})
    kind = kinds.pop()
    # 200 steps per concept: circle+star+heart met the bar at 600 steps, not at 100 or 300 (bench/multi_concept.py)
    return {
        "concepts": concepts,
        "config": {**PRESET_CONFIG, **PRESET_CONFIG_BY_KIND.get(kind, {}), "steps": STEPS_PER_CONCEPT * len(names)},
        "description": f"Erase {', '.join(names)} in one run; each is remapped to {anchor}.",
        "kind": {"shape": "object", "color": "color", "fill": "fill"}[kind],
        "model": "shapes",
    }


def write_all(root: str | Path) -> list[Path]:
    """Write ``prompts/shapes.csv`` and the presets under ``root``; returns the written paths."""
    from erasure.io import atomic_write_json, atomic_write_text

    root = Path(root)
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=["case_number", "prompt", "evaluation_seed", "shape", "color", "fill"],
                       lineterminator="\n")
    w.writeheader()
    w.writerows(evaluation_rows())
    out = [root / "prompts" / "shapes.csv"]
    atomic_write_text(out[0], buf.getvalue())
    for name in PRESETS:
        kind = concept_kind(name)
        p = root / "prompts" / "presets" / f"{kind}_{name}.json"
        atomic_write_json(p, preset(name))
        out.append(p)
    for stem, (names, anchor) in MULTI_PRESETS.items():
        p = root / "prompts" / "presets" / f"{stem}.json"
        atomic_write_json(p, multi_preset(names, anchor))
        out.append(p)
    return out


def main(argv: list[str] | None = None) -> None:
    from erasure.shapes import repo_root

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default=str(repo_root()), help="repository root to write prompts/ under")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for p in write_all(args.root):
        logger.info("wrote %s", p)


if __name__ == "__main__":
    main()
