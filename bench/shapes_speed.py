"""Inference speed of the embedded shapes model on CPU: ``python bench/shapes_speed.py``.

Times ``StableDiffusionPipeline`` calls with DDIM 25 steps and CFG 7.5 (the UNet runs on a batch of 2x images):
batch 1 (median seconds per image over ``--repeats`` calls) and batch 16 (images per second). Also records the
1-minute load average, because other jobs on a shared 2-core machine slow every number down. Writes
``bench/results/shapes_speed.json``. Bar (issue 3): <= 0.5 s per image at batch 1.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch: OpenMP threads yield when the CPU is shared
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import argparse  # noqa: E402
import logging  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

logger = logging.getLogger("shapes_speed")


def main(argv: list[str] | None = None) -> int:
    import torch

    from erasure.io import atomic_write_json, environment_info
    from erasure.shapes import default_model_path
    from erasure.shapes.sample import load_shapes_pipeline, sample_images

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(default_model_path()))
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--guidance", type=float, default=7.5)
    ap.add_argument("--repeats", type=int, default=10, help="timed batch-1 calls")
    ap.add_argument("--batch-repeats", type=int, default=3, help="timed batch-16 calls")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "shapes_speed.json"))
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    torch.set_num_threads(args.threads)
    pipe = load_shapes_pipeline(args.model)
    load_before = os.getloadavg()

    def run(batch: int, seed: int) -> float:
        t = time.perf_counter()
        sample_images(pipe, ["a photo of a striped red circle"] * batch, list(range(seed, seed + batch)), args.steps,
                      args.guidance, batch_size=batch)
        return time.perf_counter() - t

    for i in range(2):
        run(1, 100 + i)  # warm-up
    b1 = [run(1, i) for i in range(args.repeats)]
    run(16, 1000)
    b16 = [run(16, 2000 + 16 * i) for i in range(args.batch_repeats)]
    res = {
        "steps": args.steps, "guidance": args.guidance, "threads": args.threads,
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "batch1_seconds_per_image_median": statistics.median(b1), "batch1_seconds_min": min(b1),
        "batch1_all": b1,
        "batch16_images_per_second": 16 / statistics.median(b16), "batch16_best_images_per_second": 16 / min(b16),
        "batch16_all": b16, "loadavg_before": load_before, "loadavg_after": os.getloadavg(),
        "cpu_count": os.cpu_count(), **environment_info(),
    }
    logger.info("batch 1: %.3f s/image median (min %.3f) over %d calls; bar <= 0.5 s", res["batch1_seconds_per_image_median"],
                res["batch1_seconds_min"], len(b1))
    logger.info("batch 16: %.1f images/s median (best %.1f)", res["batch16_images_per_second"],
                res["batch16_best_images_per_second"])
    logger.info("load average before/after: %s / %s (2 cores; >2 means other jobs were running)",
                [round(x, 2) for x in load_before], [round(x, 2) for x in res["loadavg_after"]])
    atomic_write_json(args.out, res)
    logger.info("wrote %s", args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
