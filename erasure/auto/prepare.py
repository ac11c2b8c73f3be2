"""Apply the automatic parts of ``EraseConfig.auto`` to the concepts, just before Df/Dr are built.

Called by :func:`erasure.diffusion.train.load_inputs` with the loaded pipeline (its text encoder ranks captions),
so a run resumed after a kill rebuilds exactly the same sets (every choice is deterministic in the config and seed).
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

from erasure.auto.anchor import with_anchor
from erasure.auto.neighbours import find_neighbours, neighbour_prompts
from erasure.auto.retain import build_retain, forget_paraphrases

logger = logging.getLogger("erasure.auto")

__all__ = ["anchor_missing", "auto_active", "prepare_concepts"]


def anchor_missing(cfg) -> bool:
    """A concept without anchor prompts: :func:`prepare_concepts` chooses them (``auto.anchor_rule``)."""
    return any(not c.anchor_prompts for c in cfg.concepts)


def auto_active(cfg) -> bool:
    a = cfg.auto
    return bool(a.min_retain or a.neighbours or a.augment_forget) or anchor_missing(cfg)


def prepare_concepts(cfg, pipe, model: str, with_retain: bool, retain_required: bool = True,
                     ) -> tuple[list, dict[str, float], dict[str, Any]]:
    """``(concepts, retain_weights, record)``: the concepts with their automatic anchor, forget paraphrases,
    automatic retain prompts and neighbour prompts added; the retain-loss weight of each neighbour prompt; what was
    done, for run.json.

    ``with_retain``: build the retain and neighbour sets (the method reads retain prompts); ``retain_required``: a
    concept left without retain prompts is an error (methods that train on Dr; UCE's preserve set may be empty)."""
    a = cfg.auto
    out, weights, record = [], {}, {"concepts": {}}
    for c in cfg.concepts:
        rec: dict[str, Any] = {}
        c, anchor = with_anchor(pipe, c, a.anchor_rule, a.vocabulary, model)
        if anchor is not None:
            rec["anchor"] = anchor
        forget, anchors, retain = list(c.forget_prompts), list(c.anchor_prompts), list(c.retain_prompts)
        if a.augment_forget and not c.forget_images:
            extra_f, extra_a, info = forget_paraphrases(pipe, c, a, model, cfg.seed)
            if extra_f:
                if len(anchors) == 1:
                    anchors = anchors * len(forget)
                forget += extra_f
                anchors += extra_a
            rec["forget_paraphrases"] = info
        c2 = dataclasses.replace(c, forget_prompts=forget, anchor_prompts=anchors)
        if with_retain and a.min_retain and len(retain) < a.min_retain and not c.retain_images:
            try:
                added, info = build_retain(pipe, c2, a, model, cfg.seed)
            except FileNotFoundError as err:
                if not retain and retain_required:
                    raise ValueError(f"concept {c.name!r}: no retain prompts and no caption pool for an automatic "
                                     f"retain set: {err}") from None
                logger.warning("automatic retain set skipped: %s", err)
                added, info = [], {"skipped": str(err)}
            retain += [p for p in added if p not in retain]
            rec["retain"] = info
            logger.info("concept %r: automatic retain set of %d prompts from %s (%d dropped by text, %d by similarity "
                        ">= %.2f)", c.name, len(added), info.get("pool"), info.get("dropped_by_text", 0),
                        info.get("dropped_by_similarity", 0), a.similarity_threshold)
        if with_retain and a.neighbours:
            try:
                nbrs, label = find_neighbours(pipe, c2, a.neighbours, a.vocabulary, model)
            except FileNotFoundError as err:
                logger.warning("neighbour set skipped: %s", err)
                nbrs, label = [], f"skipped: {err}"
            prompts = neighbour_prompts(c2, nbrs)
            for p in prompts:
                if p not in retain:
                    retain.append(p)
                weights[p] = a.neighbour_weight
            rec["neighbours"] = {"vocabulary": label, "weight": a.neighbour_weight, "terms": nbrs, "prompts": prompts}
            logger.info("concept %r: neighbours %s (weight %g among the retain prompts, which UCE and text-remap preserve; %d prompts)", c.name,
                        ", ".join(f"{n['term']} ({n['similarity']:.2f})" for n in nbrs) or "none", a.neighbour_weight,
                        len(prompts))
        rec["sizes"] = {"forget_prompts": len(forget), "retain_prompts": len(retain)}
        record["concepts"][c.name] = rec
        out.append(dataclasses.replace(c2, retain_prompts=retain))
    return out, weights, record
