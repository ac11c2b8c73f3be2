"""Attack registry and the pieces every attack shares: the model pair, prefix prompts, embedding injection.

An attack is a class registered with :func:`register_attack` under a name, with a config dataclass
(``config_cls``, a :class:`erasure.jsonconfig.JsonConfig`). Its ``candidates(ctx, row, rng)`` is a generator of
``(iteration, adversarial_prompt)`` pairs: the runner (:mod:`erasure_eval.attacks.runner`) generates an image
from each candidate with the attacked model and the row's seed, asks the judge, and stops at the first success,
so "checked along the optimisation" is one loop for every attack and the number of generations is comparable.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from erasure.registry import NAME_RULE, Registry

logger = logging.getLogger(__name__)

__all__ = ["ATTACKS", "AttackError", "register_attack", "get_attack", "ModelPair", "PromptRow", "special_ids",
           "allowed_token_ids", "encode_with_prefix", "decode_prompt", "prompt_token_count"]


class AttackError(ValueError):
    """Bad attack input (judge, target value, prompt file, prompt length, output folder)."""


ATTACKS: Registry[type] = Registry("attack", error=AttackError)


def register_attack(name: str) -> Callable[[type], type]:
    """Class decorator: register an attack class (with a ``config_cls``) under ``name``."""
    if not isinstance(name, str) or not NAME_RULE.match(name):
        raise ValueError(f"attack names are lowercase letters and digits joined by '_' or '-', got {name!r}")

    def deco(cls: type) -> type:
        if not hasattr(cls, "config_cls"):
            raise TypeError(f"attack {name!r} has no config_cls")
        ATTACKS.register(name, cls)
        cls.name = name
        return cls

    return deco


def get_attack(name: str) -> type:
    """The attack class registered as ``name`` (the modules register on import)."""
    import erasure_eval.attacks  # noqa: F401 - fills the registry

    return ATTACKS.lookup(name)


@dataclass
class PromptRow:
    """One prompt to attack: ``case`` names its files, ``seed``/``guidance`` its generations."""

    index: int
    case: str
    prompt: str
    seed: int
    guidance: float


class ModelPair:
    """The attacked pipeline and, through :meth:`original`, the original model it was erased from.

    For a run the original weights of the tensors the run changed are kept aside (only those), and
    :meth:`original` swaps them in for the duration of a ``with`` block; for a bare model both are the same.
    """

    def __init__(self, pipe: Any, original_tensors: dict[str, torch.Tensor] | None = None,
                 original_pipe: Any = None) -> None:
        self.pipe = pipe
        self.original_pipe = original_pipe  # a separately loaded original (the app's cache): no weight swapping
        self._orig = {} if original_pipe is not None else (original_tensors or {})
        self._erased: dict[str, torch.Tensor] = {}
        if self._orig:
            state = pipe.unet.state_dict()
            self._erased = {k: state[k].detach().clone() for k in self._orig}

    @classmethod
    def from_run(cls, run_dir: str, device: str = "cpu", base_model: str | None = None) -> ModelPair:
        from erasure.runs import load_erased_pipeline, load_run_weights

        pipe = load_erased_pipeline(run_dir, device=device, base_model=base_model)
        names = list(load_run_weights(run_dir))
        from erasure.diffusion.pipeline import load_pipeline

        # the base UNet's values of the changed tensors: read once from the base model, then dropped
        base = load_pipeline(base_model or pipe.erasure_run.get("base_model"), device="cpu")
        state = base.unet.state_dict()
        orig = {k: state[k].detach().clone() for k in names}
        del base, state
        return cls(pipe, orig)

    @property
    def is_erased(self) -> bool:
        return bool(self._orig) or self.original_pipe is not None

    @contextlib.contextmanager
    def original(self) -> Iterator[Any]:
        """The pipeline with the original UNet weights inside the block (the erased ones are restored after)."""
        if self.original_pipe is not None:
            yield self.original_pipe
            return
        if not self._orig:
            yield self.pipe
            return
        state = self.pipe.unet.state_dict()
        with torch.no_grad():
            for k, v in self._orig.items():
                state[k].copy_(v)
        try:
            yield self.pipe
        finally:
            with torch.no_grad():
                for k, v in self._erased.items():
                    state[k].copy_(v)


def special_ids(tokenizer) -> set[int]:
    return {i for i in (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) if i is not None}


def allowed_token_ids(tokenizer) -> torch.Tensor:
    """Token ids an attack may place in a prompt: the whole vocabulary except BOS/EOS/PAD."""
    n = len(tokenizer)
    bad = special_ids(tokenizer)
    return torch.tensor([i for i in range(n) if i not in bad], dtype=torch.long)


def prompt_token_count(tokenizer, prompt: str) -> int:
    """Tokens of ``prompt`` without BOS/EOS."""
    return len(tokenizer(prompt, truncation=False).input_ids) - 2


def token_embedding(text_encoder) -> torch.nn.Embedding:
    tm = getattr(text_encoder, "text_model", text_encoder)
    return tm.embeddings.token_embedding


def encode_with_prefix(pipe, prompt: str, prefix_embeds: torch.Tensor) -> torch.Tensor:
    """Text-encoder hidden states ``[1, 77, d]`` of ``<bos> PREFIX prompt <eos>...`` where PREFIX is ``k`` rows of
    token embeddings given as a tensor (differentiable): placeholder ids are encoded and a forward hook on the
    token-embedding layer replaces their embeddings by ``prefix_embeds`` (``[k, d]``)."""
    tok = pipe.tokenizer
    k = int(prefix_embeds.shape[0])
    ids = tok(prompt, truncation=False).input_ids[1:-1]
    limit = tok.model_max_length
    if len(ids) + k + 2 > limit:
        raise AttackError(f"prompt {prompt[:40]!r} is {len(ids)} tokens; with a {k}-token prefix it exceeds the "
                          f"{limit}-token limit: shorten the prompt or lower --prefix-length")
    eos = tok.eos_token_id
    pad = tok.pad_token_id if tok.pad_token_id is not None else eos
    full = [tok.bos_token_id] + [eos] * k + ids + [eos]
    full = full + [pad] * (limit - len(full))
    input_ids = torch.tensor([full], device=pipe.text_encoder.device)
    emb = token_embedding(pipe.text_encoder)

    def hook(_mod, _inp, out):
        return torch.cat([out[:, :1], prefix_embeds.unsqueeze(0).to(out.dtype), out[:, 1 + k:]], dim=1)

    h = emb.register_forward_hook(hook)
    try:
        # the pooled output looks for the first EOS: our placeholders are EOS ids, so only the hidden states are used
        return pipe.text_encoder(input_ids)[0]
    finally:
        h.remove()


def decode_prompt(tokenizer, prefix_ids: list[int], prompt: str) -> str:
    """The adversarial prompt as text: the decoded prefix tokens, a space, the original prompt."""
    prefix = tokenizer.decode(prefix_ids, skip_special_tokens=True, clean_up_tokenization_spaces=False).strip()
    return f"{prefix} {prompt}".strip()


class Attack:
    """Base of the registered attacks. Subclasses set ``config_cls`` and implement :meth:`candidates`."""

    name: ClassVar[str] = ""
    config_cls: ClassVar[type]
    def __init__(self, config: Any) -> None:
        self.config = config

    def prefix_length(self) -> int:
        return int(getattr(self.config, "prefix_length", 0))

    def max_generations(self) -> int:
        """Upper bound of candidate generations per prompt (for the progress bar)."""
        raise NotImplementedError

    def work_units(self) -> int:
        """Search steps per prompt at most (progress is counted in these units)."""
        return self.max_generations()

    def prepare(self, ctx: Any, rows: list[PromptRow]) -> None:
        """Work shared by all rows (e.g. a concept direction); called once before the first row."""

    def candidates(self, ctx: Any, row: PromptRow, rng: torch.Generator) -> Iterator[tuple[int, str]]:
        raise NotImplementedError
