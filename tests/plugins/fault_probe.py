"""Widen the windows the fault-injection tests kill in (loaded through SALUN_ERASURE_PLUGINS=fault_probe,
or imported before ``erasure_eval.cli.main``).

``fault-slow`` is the SalUn loss, sleeping ``FAULT_STEP_SLEEP`` seconds per call. :func:`patch` (applied on
import when ``FAULT_PROBE_PATCH=1``) makes ``FAULT_SAVE_SLEEP`` sleep after each Df/Dr cache image and each
``erasure-eval generate`` image is written, and ``FAULT_PUBLISH_SLEEP`` before a finished run is renamed into
place. All sleeps default to 0: they change timing only, never results.
"""

from __future__ import annotations

import contextlib
import os
import time

import erasure.diffusion.data as data
import erasure.runs as runs
from erasure.diffusion.methods.salun import SalUnConfig, remap_with_retain
from erasure.methods import MethodSpec, register_method


def _sleep(name: str) -> None:
    time.sleep(float(os.environ.get(name, "0")))


def _slow(ctx, b):
    _sleep("FAULT_STEP_SLEEP")
    return remap_with_retain(ctx, b)


_atomic_path = data.atomic_path


@contextlib.contextmanager
def _slow_atomic_path(*args, **kwargs):
    with _atomic_path(*args, **kwargs) as tmp:
        yield tmp
    _sleep("FAULT_SAVE_SLEEP")


_publish = runs.RunDir.publish


def _slow_publish(self):
    _sleep("FAULT_PUBLISH_SLEEP")
    return _publish(self)


def _patch_eval() -> None:
    import erasure_eval.generate as gen

    save = gen._save_png

    def slow_save(*args, **kwargs):
        save(*args, **kwargs)
        _sleep("FAULT_SAVE_SLEEP")

    gen._save_png = slow_save


def patch() -> None:
    data.atomic_path = _slow_atomic_path
    runs.RunDir.publish = _slow_publish
    _patch_eval()


if os.environ.get("FAULT_PROBE_PATCH") == "1":
    patch()
register_method(MethodSpec(name="fault-slow", config_cls=SalUnConfig, loss=_slow, description="test", needs_mask=True))
