"""The ``attack`` subcommand of ``erasure-eval``: flags generated from :class:`AttackRunConfig` and every
registered attack's config class (shared knobs such as ``--prefix-length`` appear once)."""

from __future__ import annotations

import argparse
import json
import logging
import sys

from erasure.jsonconfig import add_config_arguments, config_from_args, given_fields

logger = logging.getLogger("erasure_eval")


def add_attack_parser(sub: argparse._SubParsersAction) -> None:
    import erasure_eval.attacks  # noqa: F401 - fills the registry
    from erasure_eval.attacks.base import ATTACKS
    from erasure_eval.attacks.runner import AttackRunConfig

    lines = [f"  {n:15s} {(c.__doc__ or '').strip().splitlines()[0]}" for n, c in sorted(ATTACKS.items())]
    a = sub.add_parser(
        "attack", help="Adversarial-prompt attack on a run or model (resumable, shardable): ASR before/after.",
        description="Attack an erased model with adversarial prompts and judge the images.\n\nattacks:\n"
                    + "\n".join(lines),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    seen: dict[str, type] = {}
    add_config_arguments(a, AttackRunConfig, seen=seen)
    # UnlearnDiffAtk first: shared knobs (--prefix-length, --timesteps) show its help text
    for name, cls in sorted(ATTACKS.items(), key=lambda kv: (kv[0] != "unlearndiffatk", kv[0])):
        g = a.add_argument_group(f"{name} knobs")
        add_config_arguments(g, cls.config_cls, seen=seen)


def cmd_attack(args: argparse.Namespace) -> int:
    from erasure.progress import TqdmProgress
    from erasure_eval.attacks.base import ATTACKS, AttackError, get_attack
    from erasure_eval.attacks.runner import AttackRunConfig, run_attack

    cfg = config_from_args(AttackRunConfig, args)
    cls = get_attack(cfg.attack)
    # knobs of other attacks given on the command line are refused rather than silently ignored
    own = set(given_fields(cls.config_cls, args))
    for name, other in ATTACKS.items():
        if name == cfg.attack:
            continue
        stray = set(given_fields(other.config_cls, args)) - own
        if stray:
            flag = "--" + sorted(stray)[0].replace("_", "-")
            raise AttackError(f"{flag} belongs to the {name} attack, not {cfg.attack}; drop it")
    attack_cfg = config_from_args(cls.config_cls, args)
    bar = TqdmProgress(unit="step") if sys.stderr.isatty() else None
    try:
        summary = run_attack(cfg, attack_cfg, progress=bar)
    finally:
        if bar is not None:
            bar.close()
    sys.stdout.write(json.dumps({k: summary.get(k) for k in ("n_prompts", "asr_pre", "asr_post", "complete")}) + "\n")
    return 0
