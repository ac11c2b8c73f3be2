"""Throughput of the evaluation harness on this machine.

Measures:
  1. NudeNet images/s: the raw detector (``NudeDetector.detect`` on BGR arrays) and the full ``score`` path
     (decode, hash, detect, cache) over N synthetic 512x512 PNGs;
  2. end-to-end rows/s: ``generate`` (first rows of the I2P file, one image per row, default 25 DDIM steps)
     followed by ``score --metric nudenet``, on the tiny random pipeline and, when present, the embedded shapes
     model (models/shapes-sd).

    python bench/eval_throughput.py [--images 64] [--rows 16] [--steps 25] [--out bench/results/eval_throughput.json]

Results vary with other load on the machine: the load average is recorded with them.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch: busy-waiting OpenMP is 4-7x slower on a shared 2-core box
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

logger = logging.getLogger("bench.eval_throughput")


def bench_nudenet(n: int, tmp: Path) -> dict:
    import numpy as np
    from PIL import Image

    from erasure_eval.base import score_folder
    from erasure_eval.nudity import NudeNetMetric, to_bgr

    rng = np.random.default_rng(0)
    folder = tmp / "nn"
    folder.mkdir()
    for i in range(n):
        base = rng.integers(0, 256, size=(8, 8, 3), dtype=np.uint8)
        Image.fromarray(base).resize((512, 512), Image.BICUBIC).save(folder / f"{i}_0.png")
    m = NudeNetMetric()
    det = m.detector()
    arrays = [to_bgr(Image.open(p)) for p in sorted(folder.iterdir())]
    det.detect(arrays[0])  # warm-up
    t = time.perf_counter()
    for a in arrays:
        det.detect(a)
    raw = n / (time.perf_counter() - t)
    t = time.perf_counter()
    score_folder(folder, NudeNetMetric())
    full = n / (time.perf_counter() - t)
    t = time.perf_counter()
    score_folder(folder, NudeNetMetric(thresholds=[0.3]))
    cached = n / (time.perf_counter() - t)
    return {"images": n, "size": 512, "detector_images_per_s": round(raw, 2), "score_images_per_s": round(full, 2),
            "rescore_cached_images_per_s": round(cached, 2)}


def bench_end_to_end(model: str, label: str, prompts: str, rows: int, steps: int, batch: int, tmp: Path) -> dict:
    from erasure_eval.base import score_folder
    from erasure_eval.generate import GenerateConfig, run_generation
    from erasure_eval.nudity import NudeNetMetric

    out = tmp / f"e2e-{label}"
    cfg = GenerateConfig(model=model, prompts=prompts, out=str(out), limit=rows, steps=steps, batch_size=batch,
                         device="cpu")
    t0 = time.perf_counter()
    res = run_generation(cfg)
    t1 = time.perf_counter()
    score_folder(out, NudeNetMetric())
    t2 = time.perf_counter()
    t3 = time.perf_counter()
    again = run_generation(cfg)  # resume: nothing left to do
    t4 = time.perf_counter()
    gen = json.loads((out / "generation.json").read_text())
    return {
        "model": label, "rows": rows, "steps": steps, "batch_size": batch,
        "resolution": f"{gen['width']}x{gen['height']}",
        "generate_s": round(t1 - t0, 2), "generate_loop_s": round(res["seconds"], 2),
        "score_nudenet_s": round(t2 - t1, 2),
        "end_to_end_rows_per_s": round(rows / (t2 - t0), 3),
        "generate_rows_per_s": round(rows / (t1 - t0), 3),
        "resume_noop_s": round(t4 - t3, 2), "resume_skipped": again["skipped"],
    }


def build_shapes_shaped(out: Path) -> Path:
    """A pipeline with the embedded shapes model's architecture and random weights (speed only)."""
    from diffusers import StableDiffusionPipeline

    from erasure.shapes.train_model import (
        ShapesModelConfig,
        build_scheduler,
        build_text_encoder,
        build_unet,
        build_vae,
    )
    from erasure.tokenizer import build_clip_tokenizer

    cfg = ShapesModelConfig()
    pipe = StableDiffusionPipeline(
        vae=build_vae(cfg), text_encoder=build_text_encoder(cfg), tokenizer=build_clip_tokenizer(out / "tokenizer"),
        unet=build_unet(cfg), scheduler=build_scheduler(cfg, "ddim"), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(str(out), safe_serialization=True)
    return out


def bench_shapes_object(model: str, label: str, rows: int, steps: int, batch: int, tmp: Path) -> dict:
    """generate prompts/shapes.csv rows, then score them with the shapes judge (object metric)."""
    from erasure_eval.base import score_folder
    from erasure_eval.generate import GenerateConfig, run_generation
    from erasure_eval.object_acc import ObjectAccuracyMetric

    out = tmp / f"shapes-{label}"
    cfg = GenerateConfig(model=model, prompts=str(REPO / "prompts" / "shapes.csv"), out=str(out), limit=rows,
                         steps=steps, batch_size=batch, device="cpu")
    t0 = time.perf_counter()
    run_generation(cfg)
    t1 = time.perf_counter()
    res = score_folder(out, ObjectAccuracyMetric(judge="shapes", forget=["shape=circle"]))
    t2 = time.perf_counter()
    gen = json.loads((out / "generation.json").read_text())
    return {"model": label, "prompts": "prompts/shapes.csv", "rows": rows, "steps": steps, "batch_size": batch,
            "resolution": f"{gen['width']}x{gen['height']}", "generate_s": round(t1 - t0, 2),
            "score_object_s": round(t2 - t1, 2), "generate_rows_per_s": round(rows / (t1 - t0), 3),
            "end_to_end_rows_per_s": round(rows / (t2 - t0), 3),
            "shape_accuracy": res["summary"]["attributes"]["shape"]["accuracy"]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=64)
    p.add_argument("--rows", type=int, default=16)
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--prompts", default=str(REPO.parent / "shared" / "data" / "prompts" / "i2p_unsafe_prompts4703.csv"))
    p.add_argument("--out", default=str(REPO / "bench" / "results" / "eval_throughput.json"))
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    import torch

    from erasure.diffusion.tiny import build_tiny_pipeline
    from erasure.io import environment_info

    result = {"machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                          "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
                          "load_avg_start": os.getloadavg()}, "environment": environment_info()}
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        result["nudenet"] = bench_nudenet(args.images, tmp)
        logger.info("nudenet: %s", result["nudenet"])
        build_tiny_pipeline(tmp / "tiny")
        e2e = [bench_end_to_end(str(tmp / "tiny"), "tiny", args.prompts, args.rows, args.steps, args.batch_size, tmp)]
        logger.info("end-to-end: %s", e2e[-1])
        shapes = REPO / "models" / "shapes-sd"
        if (shapes / "model_index.json").is_file():
            e2e.append(bench_end_to_end(str(shapes), "shapes-sd", args.prompts, args.rows, args.steps,
                                        args.batch_size, tmp))
            logger.info("end-to-end: %s", e2e[-1])
        if (REPO / "prompts" / "shapes.csv").is_file() and (REPO / "models" / "shapes-judge.safetensors").is_file():
            if (shapes / "model_index.json").is_file():
                e2e.append(bench_shapes_object(str(shapes), "shapes-sd", args.rows, args.steps, args.batch_size, tmp))
            else:  # the trained model is not there yet: same architecture, random weights (speed only)
                arch = build_shapes_shaped(tmp / "shapes-arch")
                e2e.append(bench_shapes_object(str(arch), "shapes-arch-random-weights", args.rows, args.steps,
                                               args.batch_size, tmp))
            logger.info("end-to-end: %s", e2e[-1])
        result["end_to_end"] = e2e
    result["machine"]["load_avg_end"] = os.getloadavg()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, default=str) + "\n")
    sys.stdout.write(json.dumps({k: result[k] for k in ("machine", "nudenet", "end_to_end")}, indent=1, default=str) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
