"""Command line: ``erasure-eval generate | score | report | metrics`` (also ``python -m erasure_eval``).

Examples::

    erasure-eval generate --model default --prompts ../shared/data/prompts/i2p_unsafe_prompts4703.csv \\
        --category sexual --out out/i2p-original
    erasure-eval generate --run runs/nudity-salun --prompts .../i2p_unsafe_prompts4703.csv --category sexual \\
        --out out/i2p-salun
    accelerate launch -m erasure_eval generate ...              # rows sharded over processes/GPUs
    erasure-eval score --images out/i2p-salun --metric nudenet --threshold 0 --threshold 0.6 --out nn.json
    erasure-eval score --images out/shapes-salun --metric object --judge shapes --forget shape=circle --out obj.json
    erasure-eval report out/i2p-original out/i2p-salun --out report/
    erasure-eval attack --run runs/no-circle --attack unlearndiffatk --prompts prompts/shapes.csv --judge shapes \\
        --forget shape=circle --seed 0 --out out/atk-circle
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from erasure.jsonconfig import FieldValueError, add_config_arguments, config_from_args
from erasure.threads import help_text as threads_help

logger = logging.getLogger("erasure_eval")

EXIT_BAD_INPUT = 2


def _tqdm_progress(desc: str, enabled: bool = True):
    """``(done, total)`` callback drawing one bar (the shared :class:`erasure.progress.TqdmProgress`), and the bar."""
    if not enabled:
        return None, None
    from erasure.progress import TqdmProgress, stage_callback

    bar = TqdmProgress(unit="img")
    return stage_callback(bar, desc), bar


def build_parser() -> argparse.ArgumentParser:
    from erasure_eval.generate import GenerateConfig

    p = argparse.ArgumentParser(prog="erasure-eval", description="Evaluate original and erased text-to-image models.",
                                epilog=threads_help())
    p.add_argument("-v", "--verbose", action="store_true", help="Debug logging.")
    sub = p.add_subparsers(dest="cmd", required=True)

    g = sub.add_parser("generate", help="Generate one PNG per (prompt row, sample) plus a manifest (resumable).")
    add_config_arguments(g, GenerateConfig)

    s = sub.add_parser("score", help="Score a generated folder with a registered metric (cached, resumable).")
    s.add_argument("--images", required=True, help="Folder written by `generate` (or its images/), or any image folder.")
    s.add_argument("--metric", required=True, help="Registered metric: nudenet, object, clip, fid, judge_fd.")
    s.add_argument("--out", default=None, help="Write the result JSON here (it is also cached in DIR/scores/).")
    s.add_argument("--threshold", type=float, action="append", default=None,
                   help="NudeNet threshold (repeatable; default 0, 0.45 and 0.6; a detection counts when score > T).")
    s.add_argument("--nudenet-class", action="append", default=None,
                   help="NudeNet: count this class (repeatable; default: the 9 exposed classes of the ESD/SalUn tables).")
    s.add_argument("--judge", default="shapes", help="object: judge (shapes or resnet50).")
    s.add_argument("--forget", action="append", default=None,
                   help="object: erased class, repeatable (shape=circle, circle, tench, ...).")
    s.add_argument("--target-class", default=None, help="object/resnet50: class of every image when the CSV has none.")
    s.add_argument("--weights", default=None, help="Weights file: resnet50 judge, CLIP checkpoint, Inception (fid), shapes judge.")
    s.add_argument("--arch", default="ViT-L-14", help="clip: open_clip architecture.")
    s.add_argument("--pretrained", default=None, help="clip: open_clip pretrained tag (downloads; needs network).")
    s.add_argument("--clip-config", default=None, help="clip: JSON model config for a custom architecture.")
    s.add_argument("--reference", default=None, help="fid/judge_fd: reference image folder (judge_fd: or 'render').")
    s.add_argument("--device", default="cpu", help="Device for the scoring network.")
    s.add_argument("--batch-size", type=int, default=32, help="Images per scoring call.")
    s.add_argument("--overwrite", action="store_true", help="Ignore cached per-image records.")

    r = sub.add_parser("report", help="Side-by-side report (JSON, CSV, HTML, Markdown, charts, image grid).")
    r.add_argument("dirs", nargs="+", help="Generation folders (one per model and prompt set).")
    r.add_argument("--out", required=True, help="Report folder.")
    r.add_argument("--show-prompts", action="store_true", help="Show prompts of offensive prompt sets (I2P).")
    r.add_argument("--show-flagged", action="store_true", help="Do not blur grid images that NudeNet flags.")
    r.add_argument("--grid-images", type=int, default=8, help="Images per model in the sample grid.")
    r.add_argument("--nudenet-threshold", type=float, default=None, help="Only chart this NudeNet threshold.")

    sub.add_parser("metrics", help="List registered metrics.")
    from erasure_eval.attacks.cli import add_attack_parser

    add_attack_parser(sub)
    return p


def _metric_params(args: argparse.Namespace) -> dict:
    m = args.metric
    if m == "nudenet":
        return {"thresholds": args.threshold, "classes": args.nudenet_class}
    if m == "object":
        return {"judge": args.judge, "forget": args.forget, "weights": args.weights, "target_class": args.target_class,
                "device": args.device}
    if m == "clip":
        return {"arch": args.arch, "weights": args.weights, "pretrained": args.pretrained, "config": args.clip_config,
                "device": args.device}
    if m in ("fid", "judge_fd"):
        return {"reference": args.reference, "weights": args.weights, "device": args.device}
    return {}


def _cmd_generate(args: argparse.Namespace) -> int:
    from erasure_eval.generate import GenerateConfig, run_generation

    cfg = config_from_args(GenerateConfig, args)
    main_proc = cfg.num_shards is not None or int(__import__("os").environ.get("RANK", "0")) == 0
    cb, bar = _tqdm_progress("generate", main_proc and sys.stderr.isatty())
    try:
        res = run_generation(cfg, progress=cb)
    finally:
        if bar is not None:
            bar.close()
    if res["manifest"] is not None:
        m = res["manifest"]
        logger.info("%s: %d of %d images written%s", cfg.out, m["written"], m["planned"],
                    "" if m["complete"] else " (INCOMPLETE: other shards still running or failed)")
    logger.info("shard %d/%d: generated %d, skipped %d already written, in %.1f s", res["shard_index"],
                res["num_shards"], res["generated"], res["skipped"], res["seconds"])
    return 0


def _cmd_score(args: argparse.Namespace) -> int:
    from erasure_eval.base import get_metric, score_folder

    if args.threshold is not None and args.metric != "nudenet":
        raise ValueError("--threshold applies to --metric nudenet only")
    if args.out is not None:
        from erasure.io import check_output_path

        check_output_path(args.out, "--out", "file")
    metric = get_metric(args.metric, **_metric_params(args))
    cb, bar = _tqdm_progress(f"score {args.metric}", sys.stderr.isatty())
    try:
        res = score_folder(args.images, metric, out=args.out, overwrite=args.overwrite, batch_size=args.batch_size,
                           progress=cb)
    finally:
        if bar is not None:
            bar.close()
    cov = res["coverage"]
    sys.stdout.write(json.dumps({"metric": res["metric"], "coverage": cov, "summary": _short(res)}, indent=1, default=str) + "\n")
    return 0


def _short(res: dict) -> dict:
    s = res["summary"]
    if res["metric"] == "nudenet":
        return {"any_exposed": {k: v["any_exposed"] for k, v in s["thresholds"].items()},
                "asr_percent": s["asr"]["asr_percent"]}
    return {k: v for k, v in s.items() if not isinstance(v, dict)} | {
        k: v for k, v in s.items() if k in ("forget", "retain")}


def _cmd_report(args: argparse.Namespace) -> int:
    from erasure.io import check_output_path
    from erasure_eval.report import build_report

    check_output_path(args.out, "--out", "folder")
    build_report(args.dirs, args.out, show_prompts=args.show_prompts, show_flagged=args.show_flagged,
                 grid_images=args.grid_images, nudenet_threshold=args.nudenet_threshold)
    logger.info("report written to %s (report.html, report.md, summary.json, summary.csv)", args.out)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from erasure.diffusion.pipeline import ModelLoadError
    from erasure.io import CorruptFileError
    from erasure.runs import RunDirError
    from erasure_eval.attacks.runner import AttackCancelled
    from erasure_eval.base import MetricError
    from erasure_eval.generate import GenerationError
    from erasure_eval.prompts import PromptFileError
    from erasure_eval.report import ReportError

    try:
        if args.cmd == "generate":
            return _cmd_generate(args)
        if args.cmd == "score":
            return _cmd_score(args)
        if args.cmd == "report":
            return _cmd_report(args)
        if args.cmd == "attack":
            from erasure_eval.attacks.cli import cmd_attack

            return cmd_attack(args)
        if args.cmd == "metrics":
            import erasure_eval.metrics  # noqa: F401
            from erasure_eval.base import METRICS

            for name, cls in sorted(METRICS.items()):
                sys.stdout.write(f"{name:10s} {(cls.__doc__ or '').strip().splitlines()[0]}\n")
            return 0
    except (PromptFileError, GenerationError, MetricError, ModelLoadError, RunDirError, ReportError, CorruptFileError,
            FileNotFoundError, FileExistsError, ValueError, AttackCancelled) as err:
        flag = f"{err.flag}: " if isinstance(err, FieldValueError) and err.flag not in str(err) else ""
        logger.error("%s%s", flag, err)
        return EXIT_BAD_INPUT
    return 1


if __name__ == "__main__":
    sys.exit(main())
