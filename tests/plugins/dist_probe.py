"""A plugin for the multi-process tests (loaded through SALUN_ERASURE_PLUGINS=dist_probe).

On import it writes this process's pid to ``$PROBE_DIR/rank<RANK>.pid``; it registers ``probe-fail``, the SalUn
loss that raises on rank ``PROBE_FAIL_RANK`` at step 2, and ``probe-slow``, the SalUn loss slowed down so a test
can signal one rank mid-run.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from erasure.diffusion.methods.salun import SalUnConfig, remap_with_retain
from erasure.methods import MethodSpec, register_method

RANK = int(os.environ.get("RANK", "0"))
if os.environ.get("PROBE_DIR"):
    Path(os.environ["PROBE_DIR"], f"rank{RANK}.pid").write_text(str(os.getpid()))


def _fail(ctx, b):
    ctx.calls = getattr(ctx, "calls", 0) + 1
    if RANK == int(os.environ.get("PROBE_FAIL_RANK", "1")) and ctx.calls == 2:
        raise RuntimeError(f"probe failure on rank {RANK}")
    return remap_with_retain(ctx, b)


def _slow(ctx, b):
    time.sleep(float(os.environ.get("PROBE_SLEEP", "0.5")))
    return remap_with_retain(ctx, b)


register_method(MethodSpec(name="probe-fail", config_cls=SalUnConfig, loss=_fail, description="test", needs_mask=True))
register_method(MethodSpec(name="probe-slow", config_cls=SalUnConfig, loss=_slow, description="test", needs_mask=True))
