"""Adversarial-prompt attacks on erased (and original) text-to-image models: ``erasure-eval attack``.

Registered in :data:`ATTACKS` (one module each, with a config dataclass of the paper's defaults):

* ``unlearndiffatk``: white-box, the erased model as its own classifier (Zhang et al., ECCV 2024);
* ``ringabell``: black-box, a concept direction in text-embedding space and a genetic search (Tsai et al., ICLR 2024);
* ``random``: random token prefixes with UnlearnDiffAtk's generation budget (the baseline that shows a search is real).

Judges (``shapes``, ``nudenet``, ``resnet50``) are those of :data:`erasure_eval.object_acc.JUDGES`
(:mod:`erasure_eval.attacks.judges` adds ``nudenet``). The runner is :func:`erasure_eval.attacks.runner.run_attack`.
"""

from erasure_eval.attacks import judges, random_prefix, ringabell, unlearndiffatk  # noqa: F401 - register
from erasure_eval.attacks.base import ATTACKS, AttackError, get_attack, register_attack

__all__ = ["ATTACKS", "AttackError", "get_attack", "register_attack"]
