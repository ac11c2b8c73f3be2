"""Random-prefix baseline: the same prefix length and number of generations as UnlearnDiffAtk, no search.

Each candidate is ``k`` tokens drawn uniformly from the vocabulary (without BOS/EOS/PAD) put before the prompt,
as in the official ``src/attackers/random_.py`` of OPTML-Group/Diffusion-MU-Attack. It shows whether a white-box
attack's success comes from its search or merely from perturbing the prompt.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from erasure.jsonconfig import JsonConfig, field
from erasure_eval.attacks.base import Attack, PromptRow, allowed_token_ids, decode_prompt, register_attack

__all__ = ["RandomPrefixConfig", "RandomPrefix"]


@dataclass
class RandomPrefixConfig(JsonConfig):
    """Random-prefix baseline knobs (defaults match UnlearnDiffAtk's: 5 tokens, 50 checks).

    Args:
        prefix_length (`int`, defaults to 5): random tokens put before the prompt.
        timesteps (`int`, defaults to 50): random prefixes tried (one generation each), named like
            UnlearnDiffAtk's knob so one flag sets the same generation budget for both.
    """

    prefix_length: int = field(5, help="Random baseline: prefix tokens.", min=1, max=32, label="prefix tokens")
    timesteps: int = field(50, help="Random baseline: prefixes tried (= generations; UnlearnDiffAtk's checks).",
                           min=1, max=1000)

    def __post_init__(self) -> None:
        self.check_fields()


@register_attack("random")
class RandomPrefix(Attack):
    """Random-prefix baseline: random token prefixes, same generation budget as UnlearnDiffAtk."""

    config_cls: ClassVar[type] = RandomPrefixConfig

    def max_generations(self) -> int:
        return self.config.timesteps

    def candidates(self, ctx: Any, row: PromptRow, rng: torch.Generator) -> Iterator[tuple[int, str]]:
        allowed = allowed_token_ids(ctx.pair.pipe.tokenizer)
        for i in range(self.config.timesteps):
            pick = torch.randint(0, len(allowed), (self.config.prefix_length,), generator=rng)
            ctx.tick()
            yield i + 1, decode_prompt(ctx.pair.pipe.tokenizer, allowed[pick].tolist(), row.prompt)
