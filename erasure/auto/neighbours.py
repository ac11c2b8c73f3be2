"""The neighbour set: the concepts nearest the erased one by text-encoder similarity, where collateral damage
lands (erasing red turns orange red). Their prompts join Dr with extra weight in the retain loss.

Candidates come from a vocabulary (the shapes, colours and fills of the embedded world, ImageNet class names of the
shared reference data, or a user file of terms). Each concept word of the first forget prompt is replaced by every
term of its kind (``"a red shape"`` -> ``"an orange shape"``); candidates are ranked by the cosine of their
embeddings (:func:`erasure.auto.text.embed`) to the forget prompt.
"""

from __future__ import annotations

import csv
import logging
from pathlib import Path
from typing import Any

from erasure.auto.retain import is_shapes_model, shared_data_dir
from erasure.auto.text import carries, concept_words, embed, one_word_diff, swap_word, words

logger = logging.getLogger(__name__)

__all__ = ["vocabulary", "find_neighbours", "neighbour_prompts"]


def vocabulary(source: str, model: str) -> tuple[dict[str, list[str]], str]:
    """``({kind: [terms]}, label)``; a plain term list is one kind ``"term"``."""
    if source == "auto":
        source = "shapes" if is_shapes_model(model) else "imagenet"
    if source == "shapes":
        from erasure.shapes import CONCEPT_WORDS

        return {k: list(v.values()) for k, v in CONCEPT_WORDS.items()}, "shapes world (shapes, colours, fills)"
    if source == "imagenet":
        d = shared_data_dir()
        f = d / "prompts" / "imagenet_prompts.csv" if d else None
        if f is None or not f.is_file():
            raise FileNotFoundError("no neighbour vocabulary: the ImageNet class names of the reference data were not "
                                    "found (set ERASURE_DATA_DIR, or give --vocabulary a file of terms)")
        with open(f, encoding="utf-8-sig") as fh:
            terms = list(dict.fromkeys(r["label_str"].split(",")[0].strip() for r in csv.DictReader(fh)))
        return {"term": terms}, f"ImageNet class names ({f})"
    p = Path(source).expanduser()
    if not p.is_file():
        raise FileNotFoundError(f"neighbour vocabulary {p}: no such file; give a text file with one term per line")
    terms = list(dict.fromkeys(t.strip() for t in p.read_text(encoding="utf-8").splitlines() if t.strip()))
    if not terms:
        raise ValueError(f"neighbour vocabulary {p} holds no term")
    return {"term": terms}, f"file {source}"


def find_neighbours(pipe, concept, k: int, source: str, model: str) -> tuple[list[dict[str, Any]], str]:
    """The ``k`` nearest substitutions of each concept word (``"a blue star"``: k colours for blue and k shapes for
    star, since a conjunction's damage lands on both sides): ``[{"term", "replaces", "prompt", "similarity"}]`` best
    first, and the vocabulary's label. The anchor's word and the concept's own words are never neighbours."""
    vocab, label = vocabulary(source, model)
    base = concept.forget_prompts[0]
    cw = concept_words(concept)
    anchor_word = (one_word_diff(base, concept.anchor_for(0)) or (None, None))[1]
    kind_of = {t.lower(): kind for kind, terms in vocab.items() for t in terms}
    bw = words(base)
    cands: list[tuple[str, str, str]] = []
    for w in cw:
        if w not in bw:
            continue
        kind = kind_of.get(w, "term" if "term" in vocab else None)
        for t in vocab.get(kind, []) if kind else []:
            if t.lower() in cw or t.lower() == anchor_word:
                continue
            cands.append((t, w, swap_word(base, w, t)))
    if not cands:
        # the concept word is not a vocabulary word of a known kind: compare the terms themselves
        for terms in vocab.values():
            cands += [(t, "", t) for t in terms if t.lower() not in cw and t.lower() != anchor_word]
        ref = embed(pipe, [" ".join(cw) or base])
    else:
        ref = embed(pipe, [base])
    emb = embed(pipe, [c[2] for c in cands])
    sim = (emb @ ref.T).squeeze(1)
    order = sim.argsort(descending=True).tolist()
    out: list[dict[str, Any]] = []
    per_word: dict[str, int] = {}
    for i in order:
        t, w, p = cands[i]
        if any(o["term"] == t for o in out) or per_word.get(w, 0) == k:
            continue
        out.append({"term": t, "replaces": w, "prompt": p, "similarity": round(float(sim[i]), 4)})
        per_word[w] = per_word.get(w, 0) + 1
    return out, label


def neighbour_prompts(concept, neighbours: list[dict[str, Any]], extra: list[str] | None = None) -> list[str]:
    """Prompts of the neighbours: every forget prompt with the concept word replaced by the neighbour term (and
    ``extra`` pool captions naming the term); never a prompt that still carries the concept."""
    cw = concept_words(concept)
    out: dict[str, None] = {}
    for n in neighbours:
        for p in concept.forget_prompts:
            q = swap_word(p, n["replaces"], n["term"]) if n["replaces"] else n["prompt"]
            if not carries(q, cw):
                out[q] = None
        for q in extra or []:
            if carries(q, [n["term"]]) and not carries(q, cw):
                out[q] = None
    return list(out)
