"""Text helpers shared by the retain and neighbour sets: words, concept words, one-word substitutions and
text-encoder embeddings."""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch

__all__ = ["STOPWORDS", "words", "concept_words", "carries", "swap_word", "one_word_diff", "embed", "k_center"]

STOPWORDS = frozenset(
    "a an the of in on at with and or to for by from is are this that photo picture drawing image painting".split()
)
_WORD = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def _has(text_words: set[str], w: str) -> bool:
    return w in text_words or f"{w}s" in text_words or f"{w}es" in text_words or (w.endswith("s") and w[:-1] in text_words)


def one_word_diff(forget: str, anchor: str) -> tuple[str, str] | None:
    """``("star", "circle")`` when the two prompts differ in exactly one word (articles ignored), else None."""
    f = [w for w in words(forget) if w not in ("a", "an")]
    a = [w for w in words(anchor) if w not in ("a", "an")]
    if len(f) != len(a):
        return None
    diff = [(x, y) for x, y in zip(f, a) if x != y]
    return diff[0] if len(diff) == 1 else None


def concept_words(concept) -> list[str]:
    """The words that carry a concept: the content words of its name when they occur in its forget prompts
    (``"a blue star"`` -> blue, star), else the words in which forget and anchor prompts differ."""
    fw = set().union(*(set(words(p)) for p in concept.forget_prompts))
    named = [w for w in words(concept.name) if w not in STOPWORDS]
    if named and all(_has(fw, w) for w in named):
        return list(dict.fromkeys(named))
    if not concept.anchor_prompts:  # before an automatic anchor is chosen
        return [w for w in dict.fromkeys(words(concept.forget_prompts[0])) if w not in STOPWORDS]
    diff = []
    for i, p in enumerate(concept.forget_prompts):
        d = one_word_diff(p, concept.anchor_for(i))
        if d:
            diff.append(d[0])
        else:
            aw = set(words(concept.anchor_for(i)))
            diff += [w for w in words(p) if w not in aw and w not in STOPWORDS]
    return list(dict.fromkeys(diff)) or [w for w in words(concept.forget_prompts[0]) if w not in STOPWORDS]


def carries(text: str, cwords: Sequence[str]) -> bool:
    """True when ``text`` names every concept word (plural forms count)."""
    tw = set(words(text))
    return bool(cwords) and all(_has(tw, w) for w in cwords)


def swap_word(text: str, old: str, new: str) -> str:
    """Replace the word ``old`` by ``new`` (whole words, case-insensitive) and fix a preceding ``a``/``an``."""
    out = re.sub(rf"\b{re.escape(old)}\b", new, text, flags=re.IGNORECASE)
    return re.sub(r"\b(a|an) (\w)", lambda m: ("an " if m.group(2).lower() in "aeiou" else "a ") + m.group(2), out)


@torch.no_grad()
def embed(pipe, prompts: Sequence[str], batch_size: int = 64) -> torch.Tensor:
    """Unit vectors of the text encoder's last hidden states mean-pooled over the prompt's tokens (what the UNet
    attends to, padding excluded); ``[N, D]`` float32 on the CPU."""
    tok, enc = pipe.tokenizer, pipe.text_encoder
    out = []
    for i in range(0, len(prompts), batch_size):
        t = tok(list(prompts[i : i + batch_size]), padding="max_length", max_length=tok.model_max_length,
                truncation=True, return_tensors="pt")
        ids, mask = t.input_ids.to(enc.device), t.attention_mask.to(enc.device)
        h = enc(ids, attention_mask=mask)[0].float()
        m = mask.unsqueeze(-1).float()
        out.append(torch.nn.functional.normalize((h * m).sum(1) / m.sum(1).clamp_min(1), dim=-1).cpu())
    return torch.cat(out) if out else torch.zeros(0, 1)


def k_center(emb: torch.Tensor, k: int, start: int = 0) -> list[int]:
    """Greedy farthest-point selection of ``k`` rows of ``emb`` (unit vectors), starting at row ``start``: each
    next pick is the row least similar to everything picked so far (a diverse subset, deterministic)."""
    n = emb.shape[0]
    if k >= n:
        return list(range(n))
    picked = [start]
    best = emb @ emb[start]
    for _ in range(k - 1):
        best[picked] = float("inf")
        j = int(torch.argmin(best))
        picked.append(j)
        best = torch.maximum(best, emb @ emb[j])
    return picked
