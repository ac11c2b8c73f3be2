"""Settings of the automatic parts of an erasure: the retain set, the neighbour set (``EraseConfig.auto``) and the
budgeted tuning (:class:`TuneConfig`, used by :func:`erasure.auto.tune.tune_and_erase`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from erasure.jsonconfig import JsonConfig, field

__all__ = ["AutoConfig", "TuneConfig", "SIMILARITY_THRESHOLD"]

SIMILARITY_THRESHOLD = 0.95
"""Default cut of the retain filter: a pool caption whose text-encoder similarity (cosine of the last hidden states
mean-pooled over the prompt's tokens, what the UNet attends to) to any forget prompt is at or above it is treated as
carrying the concept, even when it does not name the concept's words (a paraphrase). Measured on the embedded model
over its 3,000-caption pool: captions without the concept word reach at most 0.94 ("a star"), 0.78 ("a red shape")
and 0.73 ("a dotted shape"), so 0.95 drops near-paraphrases only; the text rule (all concept words named) does the
rest. Mean pooling shares the start token and template words, so unrelated captions already sit at 0.4-0.8."""


@dataclass
class AutoConfig(JsonConfig):
    """What the erasure builds for the user when the concept spec leaves it out.

    Every part is off in the built-in defaults (the engine does what the config says); the per-model defaults
    (:mod:`erasure.auto.defaults`) switch them on for the embedded model and SD v1/v2."""

    min_retain: int = field(
        0, help="With fewer retain prompts than this, build an automatic retain set from the caption pool (0 = never; "
        "the model defaults of the embedded and SD v1/v2 models set 8).",
        label="Automatic retain below", min=0, max=10_000,
    )
    retain_size: int = field(32, help="Prompts in the automatic retain set (on top of the user's).",
                             label="Automatic retain size", min=1, max=10_000)
    retain_pool: str = field(
        "auto",
        help="Caption pool of the automatic retain set: auto (the shapes caption generator for the embedded model, "
        "COCO-30k captions otherwise), shapes, coco, or a path to a CSV (prompt column) / text file (one per line).",
        label="Retain caption pool",
    )
    similarity_threshold: float = field(
        SIMILARITY_THRESHOLD, help="Pool captions this similar (text-encoder cosine) to a forget prompt are dropped.",
        label="Retain similarity cut", min=0.0, max=1.0,
    )
    neighbours: int = field(0, help="Nearest concepts (text-encoder similarity) added to Dr with extra weight (0 = off; "
                            "the model defaults set 2).",
                            label="Neighbour concepts", min=0, max=50)
    neighbour_weight: float = field(3.0, help="Retain-loss weight of neighbour images relative to other Dr images.",
                                    label="Neighbour weight", min=0.0, max=100.0)
    vocabulary: str = field(
        "auto",
        help="Where neighbours and automatic anchors are searched: auto (the shapes/colours/fills for the embedded "
        "model, else the ImageNet class names of the shared reference data), shapes, imagenet, or a text file (one "
        "term per line).",
        label="Neighbour vocabulary",
    )
    augment_forget: int = field(
        0, help="Add up to this many paraphrases of the forget prompts (pool captions naming the concept, paired with "
        "the same caption naming the anchor; only when forget and anchor differ by one word; 0 = off).",
        label="Forget paraphrases", min=0, max=10_000,
    )

    anchor_rule: Literal["none", "nearest", "empty"] = field(
        "none",
        help="A concept given without an anchor prompt is remapped to: nearest (its nearest vocabulary term of the "
        "same kind, by text-encoder similarity: star -> triangle, yellow -> orange; the empty prompt when no concept "
        "word is a vocabulary term), empty (the empty prompt), or none (an anchor prompt is required).",
        label="Anchor when none is given",
    )

    def __post_init__(self) -> None:
        self.check_fields()
        for name in ("retain_pool", "vocabulary"):
            if not getattr(self, name).strip():
                raise ValueError(f"auto {name.replace('_', ' ')} is empty: give auto, shapes, coco or a file path")


@dataclass
class TuneConfig(JsonConfig):
    """Budgeted tuning: at most ``tune`` shortened candidate runs, judged on held-out prompts, then the full run."""

    tune: int = field(0, help="Try at most N candidate settings (lr x retain weight x mask ratio) in shortened runs "
                      "and erase with the best (0 = no tuning).", label="Tuning budget", min=0, max=64)
    tune_max_drop: float = field(3.0, help="Rule: among candidates whose held-out retain score drops at most this "
                                 "many points, keep the lowest forget rate (ties: smallest drop).",
                                 label="Max retain drop (points)", min=0.0, max=100.0)
    tune_steps_fraction: float = field(0.5, help="Each candidate trains this fraction of the full steps.",
                                       min=0.0, max=1.0, min_exclusive=True)
    tune_seeds: int = field(8, help="Seeds per held-out prompt when judging a candidate.", min=1, max=1000)

    def __post_init__(self) -> None:
        self.check_fields()
