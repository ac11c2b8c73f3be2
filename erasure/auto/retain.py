"""The automatic retain set: a diverse sample of a caption pool with every caption that carries the concept
removed, by text (it names all the concept's words) and by text-encoder similarity to the forget prompts.

Pools: the shapes caption generator (every caption the embedded model was trained on, 1 to 3 concepts named),
COCO-30k captions from the shared reference data (``$ERASURE_DATA_DIR`` or ``../shared/data`` beside the
checkout; read there, never copied), or a user file (CSV with a ``prompt`` column, or one caption per line).
Also here: forget paraphrases, pool captions that name the concept, paired with the same caption naming the anchor.
"""

from __future__ import annotations

import csv
import logging
import random
from pathlib import Path
from typing import Any

import torch

from erasure.auto.text import carries, concept_words, embed, k_center, one_word_diff, swap_word

logger = logging.getLogger(__name__)

__all__ = ["shared_data_dir", "is_shapes_model", "caption_pool", "build_retain", "forget_paraphrases", "MAX_POOL"]

MAX_POOL = 2000
"""Captions of a large pool (COCO-30k) kept, by a seeded random draw, before the text encoder sees them."""


def shared_data_dir() -> Path | None:
    """The reference data folder (:func:`erasure.io.reference_data_dir`)."""
    from erasure.io import reference_data_dir

    return reference_data_dir()


def is_shapes_model(model: str) -> bool:
    try:
        from erasure.shapes import default_model_path

        return Path(model).resolve() == Path(default_model_path()).resolve()
    except (OSError, ImportError, FileNotFoundError):
        return False


def _shapes_pool() -> list[str]:
    from erasure.shapes import COLORS, FILLS, SHAPES, all_captions

    out: dict[str, None] = {}
    for s in (None, *SHAPES):
        for c in (None, *COLORS):
            for f in (None, *FILLS):
                if s is c is f is None:
                    continue
                for cap in all_captions(s, c, f):
                    out[cap] = None
    return list(out)


def _read_file_pool(path: Path) -> list[str]:
    if not path.is_file():
        raise FileNotFoundError(f"retain caption pool {path}: no such file; give a CSV with a prompt column or a text file")
    text = path.read_text(encoding="utf-8-sig")
    if path.suffix.lower() == ".csv":
        rows = list(csv.DictReader(text.splitlines()))
        if not rows or "prompt" not in rows[0]:
            raise ValueError(f"retain caption pool {path}: a CSV pool needs a 'prompt' column")
        caps = [r["prompt"] for r in rows]
    else:
        caps = text.splitlines()
    caps = [c.strip() for c in caps if c and c.strip()]
    if not caps:
        raise ValueError(f"retain caption pool {path} holds no caption")
    return list(dict.fromkeys(caps))


def caption_pool(source: str, model: str, seed: int = 0) -> tuple[list[str], str]:
    """``(captions, label)`` of a pool source (``auto``, ``shapes``, ``coco`` or a file path); large pools are cut
    to :data:`MAX_POOL` captions by a seeded draw. Raises ``FileNotFoundError`` naming the fix when missing."""
    if source == "auto":
        source = "shapes" if is_shapes_model(model) else "coco"
    if source == "shapes":
        return _shapes_pool(), "shapes caption generator (erasure.shapes.captions)"
    if source == "coco":
        d = shared_data_dir()
        f = d / "prompts" / "coco_30k.csv" if d else None
        if f is None or not f.is_file():
            raise FileNotFoundError("the COCO-30k captions were not found (set SALUN_SHARED_DATA to the reference data "
                                    "folder, or give --retain-pool a caption file)")
        caps, label = _read_file_pool(f), f"COCO-30k captions ({f})"
    else:
        caps, label = _read_file_pool(Path(source).expanduser()), f"file {source}"
    if len(caps) > MAX_POOL:
        caps = random.Random(seed).sample(caps, MAX_POOL)
    return caps, label


def _filter(pipe, concept, pool: list[str], threshold: float) -> tuple[list[str], torch.Tensor, dict[str, Any]]:
    cw = concept_words(concept)
    by_text = [c for c in pool if carries(c, cw)]
    kept = [c for c in pool if not carries(c, cw)]
    emb = embed(pipe, kept)
    fe = embed(pipe, concept.forget_prompts)
    sim = (emb @ fe.T).max(dim=1).values if len(kept) else torch.zeros(0)
    ok = sim < threshold
    # A conjunction ("a blue star"): captions naming some but not all of its words ("a red star", "a blue heart")
    # sit close to it in the text encoder but are exactly what must be kept; the similarity cut would drop them all.
    partial = torch.tensor([len(cw) > 1 and any(carries(c, [w]) for w in cw) for c in kept], dtype=torch.bool)
    ok = ok | partial
    dropped = [c for c, keep in zip(kept, ok.tolist()) if not keep]
    kept = [c for c, keep in zip(kept, ok.tolist()) if keep]
    info = {"concept_words": cw, "dropped_by_text": len(by_text), "dropped_by_similarity": len(dropped),
            "dropped_by_similarity_examples": dropped[:5], "similarity_threshold": threshold,
            "max_similarity_kept": round(float(sim[ok].max()), 4) if bool(ok.any()) else None,
            "kept_partial_matches": int(partial.sum())}
    return kept, emb[ok], info


def _diverse(kept: list[str], emb: torch.Tensor, idx: list[int], cw: list[str], size: int, seed: int) -> list[str]:
    """``size`` diverse captions of ``kept[idx]`` (farthest-point in the text encoder's space). For a conjunction
    (several concept words) half the set names one of its words, each word an equal share ("a blue star": other
    stars and other blue shapes, where its damage lands), since farthest-point picking alone rarely reaches them."""
    rng = random.Random(seed)
    groups: list[tuple[list[int], int]] = []
    if len(cw) > 1:
        share = size // (2 * len(cw))
        for w in cw:
            g = [i for i in idx if carries(kept[i], [w])]
            groups.append((g, min(share, len(g))))
    taken = {i for g, n in groups for i in g}
    rest = [i for i in idx if i not in taken]
    groups.append((rest, size - sum(n for _, n in groups)))
    chosen: list[str] = []
    for g, n in groups:
        if g and n > 0:
            chosen += [kept[g[j]] for j in k_center(emb[g], n, rng.randrange(len(g)))]
    return chosen


def build_retain(pipe, concept, auto, model: str, seed: int = 0) -> tuple[list[str], dict[str, Any]]:
    """``auto.retain_size`` diverse pool captions that do not carry ``concept`` (added to its retain prompts)."""
    pool, label = caption_pool(auto.retain_pool, model, seed)
    kept, emb, info = _filter(pipe, concept, pool, auto.similarity_threshold)
    given = set(concept.retain_prompts)
    idx = [i for i, c in enumerate(kept) if c not in given]
    if not idx:
        raise ValueError(f"concept {concept.name!r}: every caption of the retain pool carries the concept; give retain "
                         "prompts or another --retain-pool")
    chosen = _diverse(kept, emb, idx, concept_words(concept), auto.retain_size, seed)
    info.update(pool=label, pool_size=len(pool), given=len(concept.retain_prompts), added=len(chosen), prompts=chosen)
    return chosen, info


def forget_paraphrases(pipe, concept, auto, model: str, seed: int = 0) -> tuple[list[str], list[str], dict[str, Any]]:
    """Up to ``auto.augment_forget`` pool captions naming the concept, and the same captions naming the anchor.

    Only for concepts whose forget and anchor prompts differ in one word (``"a star" -> "a circle"``); the pair
    is the caption with that word swapped. Returns ``([], [], info)`` otherwise.
    """
    pairs = {one_word_diff(p, concept.anchor_for(i)) for i, p in enumerate(concept.forget_prompts)}
    if len(pairs) != 1 or None in pairs:
        return [], [], {"skipped": "forget and anchor prompts do not differ in exactly one word"}
    old, new = pairs.pop()
    pool, label = caption_pool(auto.retain_pool, model, seed)
    cw = concept_words(concept)
    have = set(concept.forget_prompts)
    cands = [c for c in pool if carries(c, cw) and carries(c, [old]) and not carries(c, [new]) and c not in have]
    if not cands:
        return [], [], {"pool": label, "added": 0}
    emb = embed(pipe, cands)
    picked = [cands[i] for i in k_center(emb, auto.augment_forget, random.Random(seed).randrange(len(cands)))]
    return picked, [swap_word(c, old, new) for c in picked], {"pool": label, "swap": [old, new], "added": len(picked),
                                                             "prompts": picked}


def check_sources(auto) -> None:
    """Fail early (before any model loads) on a retain pool or vocabulary file that does not exist."""
    for flag, value, named in (("--retain-pool", auto.retain_pool, ("auto", "shapes", "coco")),
                               ("--vocabulary", auto.vocabulary, ("auto", "shapes", "imagenet"))):
        if value not in named and not Path(value).expanduser().is_file():
            raise FileNotFoundError(f"{flag} {value}: no such file; give {', '.join(named)} or an existing file")
