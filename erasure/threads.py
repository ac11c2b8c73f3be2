"""CPU threading chosen before torch is imported, for the console scripts and ``python -m erasure_app``.

OpenMP threads that busy-wait make torch collapse when the CPU is shared: on a 2-core machine running a
competing torch job, one 25-step image of the embedded model took over 20 s (the benchmark's cap) with 2 threads
and the default policy, against 1.18 s with one thread and PASSIVE. The figures behind the default are in
``bench/README.md`` and ``bench/results/threads.md`` (``bench/threads.py``).

Unless the user set them, the entry points set ``OMP_NUM_THREADS`` (and ``MKL_NUM_THREADS``) to
:func:`default_threads` and ``OMP_WAIT_POLICY=PASSIVE``. This module must not import torch.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import MutableMapping

__all__ = ["HELP", "default_threads", "configure_threads", "help_text", "run_entry_point"]

HELP = (
    "CPU threads: unless OMP_NUM_THREADS / OMP_WAIT_POLICY are set, this command uses "
    "{threads} OpenMP thread(s) with OMP_WAIT_POLICY=PASSIVE, which stays fast when other jobs share the CPU "
    "(see bench/README.md); set OMP_NUM_THREADS=N to choose."
)


def default_threads(cpu_count: int | None = None) -> int:
    """Intra-op threads for this machine: one per two cores, at least one.

    On 2 cores (``bench/threads.py``, batch 1 and 16, 25 steps) one thread with PASSIVE was within 8% of the
    fastest setting when the machine was quiet (0.49 s/image against 0.45; 3.41 images/s against 3.53) and the
    fastest of {1, 2} threads x {default, PASSIVE} under a competing torch job or Python busy loops: 2 threads
    with PASSIVE were 1.05-2.9x slower and 2 threads with the default policy over 4-17x slower. Half the cores
    leaves room for the rest of the machine's work on larger CPUs as well.
    """
    n = cpu_count if cpu_count is not None else (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                                                 else os.cpu_count() or 1)
    return max(1, n // 2)


def configure_threads(environ: MutableMapping[str, str] | None = None, cpu_count: int | None = None) -> dict[str, str]:
    """Set the threading variables the user did not set; returns what was set. Call before importing torch."""
    env = os.environ if environ is None else environ
    chosen: dict[str, str] = {}
    if "torch" in sys.modules and environ is None:
        return chosen  # too late to matter; leave the process as it is
    if "OMP_NUM_THREADS" not in env:
        chosen["OMP_NUM_THREADS"] = str(default_threads(cpu_count))
        if "MKL_NUM_THREADS" not in env:
            chosen["MKL_NUM_THREADS"] = chosen["OMP_NUM_THREADS"]
    if "OMP_WAIT_POLICY" not in env:
        chosen["OMP_WAIT_POLICY"] = "PASSIVE"
    env.update(chosen)
    return chosen


def help_text() -> str:
    return HELP.format(threads=os.environ.get("OMP_NUM_THREADS", default_threads()))


def run_entry_point(target: str) -> int:
    """``module:function`` called after :func:`configure_threads` (the console scripts go through here)."""
    configure_threads()
    module, func = target.split(":")
    try:
        return getattr(importlib.import_module(module), func)()
    except BrokenPipeError:  # output piped into a reader that stopped (``| head``): end quietly, as cat does
        import sys

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error when Python flushes
        return 141


def erasure() -> int:
    return run_entry_point("erasure.cli:main")


def erasure_eval() -> int:
    return run_entry_point("erasure_eval.cli:main")


def erasure_cls() -> int:
    return run_entry_point("erasure.classification.cli:main")


def erasure_app() -> int:
    import importlib.util

    if importlib.util.find_spec("gradio") is None:
        print("erasure-app: the web app needs gradio: pip install 'salun-erasure[app]'", file=sys.stderr)
        return 2
    return run_entry_point("erasure_app.main:main")
