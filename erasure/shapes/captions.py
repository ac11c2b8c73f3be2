"""Caption templates of the shapes world, and the concept words erasure presets are built from.

A caption names up to three concepts: a *shape* (``circle`` ... ``cross``, or the generic noun ``shape``),
a *color* and a *fill*. During training each concept word is dropped independently (probabilities in
:class:`CaptionSampler`), so the model learns defaults: ``"a circle"`` means a circle of any colour and fill,
``"a red shape"`` a red shape of any kind. A dropped shape becomes the generic noun ``shape``.

Templates (``{desc}`` is the noun phrase, ``{art}`` its article, ``a`` or ``an``):

====  ========================================  =====================================
id    template                                  example
====  ========================================  =====================================
0     ``{art} {desc}``                          a striped blue star
1     ``a photo of {art} {desc}``               a photo of a striped blue star
2     ``a drawing of {art} {desc}``             a drawing of an orange heart
3     ``a picture of {art} {desc}``             a picture of a dotted shape
4     ``{art} {fill} {shape} in {color}``       a dotted heart in green
5     ``a drawing of {art} {fill} {shape} in {color}``  a drawing of a triangle in purple
====  ========================================  =====================================

The noun phrase ``{desc}`` is ``[fill] [color] shape`` (fill first; 20% of training captions put the colour
first: ``a blue striped star``). Fill words are the adjectives in :data:`FILL_WORDS` (``outline`` is written
``outlined``). Templates 4 and 5 need a colour; without one they fall back to templates 0 and 2.

Because every concept is a single word in a fixed slot, replacing one word gives a meaningful anchor prompt:
``"a red circle" -> "a red square"`` (shape), ``"a red circle" -> "a blue circle"`` (colour),
``"a striped star" -> "a solid star"`` (fill). :func:`concept_prompts` builds such paired lists.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from erasure.shapes.render import COLORS, FILLS, SHAPES

__all__ = [
    "GENERIC_NOUN",
    "FILL_WORDS",
    "TEMPLATES",
    "CONCEPT_WORDS",
    "CaptionSampler",
    "make_caption",
    "concept_kind",
    "concept_prompts",
    "default_anchor",
]

GENERIC_NOUN = "shape"
FILL_WORDS: dict[str, str] = {"solid": "solid", "striped": "striped", "dotted": "dotted", "outline": "outlined"}
TEMPLATES: tuple[str, ...] = (
    "{art} {desc}",
    "a photo of {art} {desc}",
    "a drawing of {art} {desc}",
    "a picture of {art} {desc}",
    "{art} {fd}{shape} in {color}",
    "a drawing of {art} {fd}{shape} in {color}",
)
# concept kind -> {concept name: the word used in captions}
CONCEPT_WORDS: dict[str, dict[str, str]] = {
    "shape": {s: s for s in SHAPES},
    "color": {c: c for c in COLORS},
    "fill": dict(FILL_WORDS),
}
# default remapping target for each kind (used by the shipped presets)
DEFAULT_ANCHORS: dict[str, dict[str, str]] = {
    "shape": {"circle": "square", "square": "circle", "triangle": "square", "star": "circle", "heart": "circle",
              "cross": "circle"},
    "color": {"red": "blue", "green": "red", "blue": "red", "yellow": "blue", "purple": "green", "orange": "blue"},
    "fill": {"solid": "outline", "striped": "solid", "dotted": "solid", "outline": "solid"},
}


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def make_caption(
    shape: str | None, color: str | None, fill: str | None, template: int = 0, color_first: bool = False
) -> str:
    """Caption naming the given concepts (``None`` leaves a concept out).

    Args:
        shape (`str`, *optional*): a name from ``SHAPES``; ``None`` uses the generic noun ``shape``.
        color (`str`, *optional*): a name from ``COLORS``.
        fill (`str`, *optional*): a name from ``FILLS`` (written with :data:`FILL_WORDS`).
        template (`int`, defaults to 0): index into :data:`TEMPLATES`.
        color_first (`bool`, defaults to `False`): ``"a blue striped star"`` instead of ``"a striped blue star"``.

    Returns:
        `str`: the caption, e.g. ``make_caption("star", "blue", "striped", 1) == "a photo of a striped blue star"``.
    """
    if shape is not None and shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; known: {SHAPES}")
    if color is not None and color not in COLORS:
        raise ValueError(f"unknown color {color!r}; known: {COLORS}")
    if fill is not None and fill not in FILLS:
        raise ValueError(f"unknown fill {fill!r}; known: {FILLS}")
    if not 0 <= template < len(TEMPLATES):
        raise ValueError(f"template must be in [0, {len(TEMPLATES)}), got {template}")
    noun = shape or GENERIC_NOUN
    fword = FILL_WORDS[fill] if fill else None
    if template >= 4 and color is None:
        template = 0 if template == 4 else 2
    if template >= 4:
        fd = f"{fword} " if fword else ""
        first = fword or noun
        return TEMPLATES[template].format(art=_article(first), fd=fd, shape=noun, color=color)
    adjs = [w for w in ((color, fword) if color_first else (fword, color)) if w]
    desc = " ".join([*adjs, noun])
    return TEMPLATES[template].format(art=_article(desc), desc=desc)


@dataclass
class CaptionSampler:
    """Random training captions for an image's (shape, color, fill), with concept words dropped.

    Args:
        p_drop_shape (`float`, defaults to 0.2): probability the shape word becomes ``shape``.
        p_drop_color (`float`, defaults to 0.25): probability the colour word is dropped.
        p_drop_fill (`float`, defaults to 0.4): probability the fill word is dropped.
        p_color_first (`float`, defaults to 0.2): probability of ``[color] [fill] shape`` order.
        p_empty (`float`, defaults to 0.1): probability of the empty caption (for classifier-free guidance).
    """

    p_drop_shape: float = 0.2
    p_drop_color: float = 0.25
    p_drop_fill: float = 0.4
    p_color_first: float = 0.2
    p_empty: float = 0.1

    def __post_init__(self) -> None:
        for name in ("p_drop_shape", "p_drop_color", "p_drop_fill", "p_color_first", "p_empty"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {v}")

    def __call__(self, shape: str, color: str, fill: str, rng: np.random.Generator) -> str:
        if rng.random() < self.p_empty:
            return ""
        s = None if rng.random() < self.p_drop_shape else shape
        c = None if rng.random() < self.p_drop_color else color
        f = None if rng.random() < self.p_drop_fill else fill
        return make_caption(s, c, f, int(rng.integers(len(TEMPLATES))), bool(rng.random() < self.p_color_first))


def all_captions(shape: str | None, color: str | None, fill: str | None) -> list[str]:
    """Every distinct caption (all templates and word orders) naming exactly these concepts."""
    out: list[str] = []
    for t in range(len(TEMPLATES)):
        for cf in (False, True):
            cap = make_caption(shape, color, fill, t, cf)
            if cap not in out:
                out.append(cap)
    return out


def concept_kind(name: str) -> str:
    """``"circle" -> "shape"``, ``"red" -> "color"``, ``"striped" -> "fill"``."""
    for kind, words in CONCEPT_WORDS.items():
        if name in words:
            return kind
    raise ValueError(f"unknown concept {name!r}; known: {[w for d in CONCEPT_WORDS.values() for w in d]}")


def default_anchor(name: str) -> str:
    """The concept a preset remaps ``name`` to (``circle -> square``, ``red -> blue``, ``striped -> solid``)."""
    return DEFAULT_ANCHORS[concept_kind(name)][name]


def concept_prompts(name: str, anchor: str | None = None) -> dict[str, list[str]]:
    """Forget prompts naming ``name`` in every template, the paired anchor prompts and the retain prompts.

    Forget prompts cover the templates with the concept word, alone and combined with other concepts;
    ``anchor_prompts[i]`` is ``forget_prompts[i]`` with the concept replaced by ``anchor``; retain prompts
    name only other concepts of the same kind (and other kinds with them).

    Returns:
        `dict`: ``{"forget_prompts": [...], "anchor_prompts": [...], "retain_prompts": [...]}``.
    """
    kind = concept_kind(name)
    anchor = anchor or default_anchor(name)
    if concept_kind(anchor) != kind or anchor == name:
        raise ValueError(f"anchor {anchor!r} must be another {kind} than {name!r}")
    others = {"shape": SHAPES, "color": COLORS, "fill": FILLS}

    def with_(kind_value: str, shape=None, color=None, fill=None) -> dict:
        d = {"shape": shape, "color": color, "fill": fill}
        d[kind] = kind_value
        return d

    # combinations of the other kinds: none, one of each, and a few full ones
    partners: list[dict] = [{}]
    other_kinds = [k for k in ("shape", "color", "fill") if k != kind]
    for k in other_kinds:
        for i, v in enumerate(others[k]):
            if i % 2 == 0 or k != "fill":
                partners.append({k: v})
    k1, k2 = other_kinds
    for i, v1 in enumerate(others[k1]):
        partners.append({k1: v1, k2: others[k2][(i + 1) % len(others[k2])]})

    forget, anchors = [], []
    for j, part in enumerate(partners):
        templates = range(len(TEMPLATES)) if not part else (j % len(TEMPLATES),)
        for t in templates:
            f = make_caption(**with_(name, **part), template=t)
            a = make_caption(**with_(anchor, **part), template=t)
            if f not in forget:
                forget.append(f)
                anchors.append(a)
    # every other value of the kind, each with every second partner; the offset j makes neighbouring values take
    # the other half, so across the retain set every colour, fill and shape appears beside the kept concepts
    retain = []
    step = 2
    for j, v in enumerate(x for x in others[kind] if x != name):
        for k in range((len(partners) + step - 1) // step):
            part = partners[(j + k * step) % len(partners)]
            r = make_caption(**with_(v, **part), template=(j + len(retain)) % len(TEMPLATES))
            if r not in retain:
                retain.append(r)
    return {"forget_prompts": forget, "anchor_prompts": anchors, "retain_prompts": retain}
