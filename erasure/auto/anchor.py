"""The automatic anchor: what a concept given without an anchor prompt is remapped to (``auto.anchor_rule``).

``nearest``: the vocabulary term of the concept word's kind whose prompt is most similar to the forget prompt (the
same text-encoder similarity as the neighbour set), swapped into every forget prompt: "a triangle" -> "a star",
"a yellow shape" -> "an orange shape". The smallest remapping leaves the least to conflict with what must be kept:
on the embedded model with UCE, triangle -> square left 56-66% triangles and triangle -> star 3%; yellow -> blue
cost the other colours 7.5 points (orange turned yellow), yellow -> orange none (``bench/results/auto_erase_uce_anchor.md``, ``bench/README.md``).
It is the choice of Ablating Concepts (Kumari et al. 2023: "grumpy cat" -> "cat"). A concept none of whose words is
a vocabulary term (``nudity`` among ImageNet classes) maps to the empty prompt, as ESD and UCE's default; ``empty``
always does.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

from erasure.auto.neighbours import vocabulary
from erasure.auto.text import concept_words, embed, swap_word, words

logger = logging.getLogger("erasure.auto")

__all__ = ["choose_anchor", "with_anchor"]


def choose_anchor(pipe, concept, rule: str, source: str, model: str) -> tuple[list[str], dict[str, Any]]:
    """``(anchor_prompts, record)`` for a concept without anchor prompts: one anchor per forget prompt."""
    if rule == "empty":
        return [""], {"rule": "empty", "prompts": [""]}
    if rule != "nearest":
        raise ValueError(f"concept {concept.name!r} has no anchor prompt and anchor_rule is {rule!r}; give an anchor "
                         "prompt or set anchor_rule to nearest or empty")
    try:
        vocab, label = vocabulary(source, model)
    except FileNotFoundError as err:
        logger.warning("concept %r: no vocabulary for the nearest anchor (%s); the empty prompt is the anchor",
                       concept.name, err)
        return [""], {"rule": "nearest", "fallback": f"empty prompt: {err}", "prompts": [""]}
    base = concept.forget_prompts[0]
    kind_of = {t.lower(): kind for kind, terms in vocab.items() for t in terms}
    cw = concept_words(concept)
    cands = [(t, w, swap_word(base, w, t)) for w in cw if w in words(base) and w in kind_of
             for t in vocab[kind_of[w]] if t.lower() not in cw]
    if not cands:
        logger.info("concept %r: no concept word is a term of %s; the empty prompt is the anchor", concept.name, label)
        return [""], {"rule": "nearest", "vocabulary": label, "fallback": "empty prompt: no concept word is a "
                      "vocabulary term", "prompts": [""]}
    sim = (embed(pipe, [c[2] for c in cands]) @ embed(pipe, [base]).T).squeeze(1)
    order = sim.argsort(descending=True).tolist()
    term, word, base_anchor = cands[order[0]]
    # a forget prompt without the word (another phrasing the user gave) takes the first prompt's anchor
    anchors = [swap_word(p, word, term) if word in words(p) else base_anchor for p in concept.forget_prompts]
    record = {"rule": "nearest", "vocabulary": label, "replaces": word, "term": term,
              "similarity": round(float(sim[order[0]]), 4), "prompts": anchors,
              "candidates": [{"term": cands[i][0], "replaces": cands[i][1], "similarity": round(float(sim[i]), 4)}
                             for i in order[:5]]}
    logger.info("concept %r: anchor %r (%s is the term nearest %r, similarity %.2f)", concept.name, anchors[0], term,
                word, record["similarity"])
    return anchors, record


def with_anchor(pipe, concept, rule: str, source: str, model: str):
    """``(concept, record)``: the concept with its automatic anchor prompts (``record`` None when it had some)."""
    if concept.anchor_prompts:
        return concept, None
    anchors, record = choose_anchor(pipe, concept, rule, source, model)
    return dataclasses.replace(concept, anchor_prompts=anchors), record
