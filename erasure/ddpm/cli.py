"""``erasure erase|generate`` for class-conditional DDPMs (the ``erasure`` CLI hands over here).

    erasure erase --model models/shapes-ddpm --forget-class circle [--anchor-class square|random] \\
        --method salun|rl|esd-class|ft|retrain --out runs/circle
    erasure generate --model models/shapes-ddpm | --run runs/circle --class circle --seed 0 --out circle.png
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from erasure.jsonconfig import add_config_arguments, given_fields

logger = logging.getLogger("erasure")

__all__ = ["wants_class_ddpm", "build_parser", "main"]


def _flag_value(argv: list[str], flag: str) -> str | None:
    for i, a in enumerate(argv):
        if a == flag and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith(flag + "="):
            return a.split("=", 1)[1]
    return None


def wants_class_ddpm(argv: list[str]) -> bool:
    """True for ``erase``/``generate`` command lines about a class-conditional DDPM (model folder, run or flags)."""
    from erasure.ddpm.model import is_class_ddpm_folder

    if not argv or argv[0] not in ("erase", "generate"):
        return False
    if any(a == f or a.startswith(f + "=") for a in argv for f in ("--forget-class", "--class")):
        return True
    model = _flag_value(argv, "--model")
    if model and is_class_ddpm_folder(model):
        return True
    run = _flag_value(argv, "--run")
    if run and (Path(run) / "run.json").is_file():
        try:
            import json

            return json.loads((Path(run) / "run.json").read_text()).get("format") == "salun-erasure-ddpm-run-v1"
        except (OSError, ValueError):
            return False
    return False


def cmd_erase(args: argparse.Namespace) -> int:
    from erasure.ddpm.erase import ClassEraseCancelled, ClassEraseConfig, erase_class
    from erasure.ddpm.methods import CLASS_METHODS
    from erasure.io import check_output_path, read_json
    from erasure.progress import TqdmProgress

    check_output_path(args.out, "--out", "folder")
    base = dict(read_json(args.config)) if args.config else {}
    flags = given_fields(ClassEraseConfig, args)
    method = flags.get("method", base.get("method", "salun"))
    spec = CLASS_METHODS.lookup(method)
    margs = dict(base.get("method_args") or {})
    margs.update(given_fields(spec.config_cls, args))
    cfg = ClassEraseConfig.from_dict({**base, **flags, "method_args": margs})
    bars = TqdmProgress()
    from erasure.cli import _cancel_on_signal

    try:
        with _cancel_on_signal() as cancel:
            out = erase_class(cfg, args.out, overwrite=args.overwrite, progress=bars, cancel=cancel)
    except ClassEraseCancelled as err:
        print(f"erasure erase: {err}", file=sys.stderr)
        return 130
    finally:
        bars.close()
    info = read_json(Path(out) / "run.json")
    logger.info("wrote %s (method %s, forget %s, %s changed weights, %.1f s)", out, info["method"], info["forget_class"],
                info["changed_params"], info["timing_s"]["total"])
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from PIL import Image

    from erasure.ddpm.erase import load_class_run, resolve_model_dir
    from erasure.ddpm.model import load_class_ddpm
    from erasure.io import atomic_path, check_output_path

    out = Path(args.out)
    if out.suffix.lower() != ".png":
        raise ValueError(f"--out must be a .png file, got {out}")
    seeds = args.seed or [0]
    if any(s < 0 for s in seeds):
        raise ValueError("--seed must be >= 0")
    targets = [out] if len(seeds) == 1 else [out.with_name(f"{out.stem}_seed{s}.png") for s in seeds]
    for t in targets:
        if t.exists() and not args.overwrite:
            raise FileExistsError(f"{t} exists; pass --overwrite or choose another --out")
        check_output_path(t, "--out", "file")
    device = "cpu" if args.device == "auto" else args.device
    if args.run:
        model = load_class_run(args.run, device, base_model=args.model)
    else:
        model = load_class_ddpm(resolve_model_dir(args.model or "default"), device)
    model.class_index(args.class_name)  # unknown class: one-line error before any work
    if args.guidance is not None and args.guidance < 1:
        raise ValueError(f"--guidance must be >= 1, got {args.guidance}")
    if args.steps is not None and args.steps < 1:
        raise ValueError(f"--steps must be >= 1, got {args.steps}")
    images = model.sample([args.class_name] * len(seeds), seeds, args.guidance, args.steps)
    for t, im in zip(targets, images):
        if args.size and args.size != im.size[0]:
            im = im.resize((args.size, args.size), Image.BICUBIC)
        with atomic_path(t, ".png") as tmp:
            im.save(tmp, format="PNG")
        logger.info("wrote %s", t)
    return 0


def build_parser() -> argparse.ArgumentParser:
    from erasure.ddpm.erase import ClassEraseConfig
    from erasure.ddpm.methods import CLASS_METHODS

    parser = argparse.ArgumentParser(prog="erasure", description="Class-wise forgetting in class-conditional DDPMs.")
    parser.add_argument("-v", "--verbose", action="store_true", help="Debug logging.")
    sub = parser.add_subparsers(dest="command", required=True)
    pe = sub.add_parser("erase", help="Forget one class; writes a run directory.")
    pe.add_argument("--out", required=True, help="Run directory to create.")
    pe.add_argument("--overwrite", action="store_true", help="Replace an existing run at --out.")
    pe.add_argument("--config", help="JSON ClassEraseConfig to start from (flags override it).")
    add_config_arguments(pe, ClassEraseConfig)
    seen: dict = {}
    for cls in dict.fromkeys(s.config_cls for s in CLASS_METHODS.values()):
        names = ", ".join(n for n, s in CLASS_METHODS.items() if s.config_cls is cls)
        add_config_arguments(pe.add_argument_group(f"method settings ({names})"), cls, seen=seen)
    pe.set_defaults(func=cmd_erase)
    pg = sub.add_parser("generate", help="Draw one class with the original model or an erased run.")
    pg.add_argument("--model", default=None, help="Class-conditional DDPM folder (default: models/shapes-ddpm; with "
                    "--run: the run's base model).")
    pg.add_argument("--run", help="Run directory of a class-forgetting run.")
    pg.add_argument("--class", dest="class_name", required=True, help="Class name to draw.")
    pg.add_argument("--seed", type=int, action="append", help="Seed (repeatable: one image per seed). Default 0.")
    pg.add_argument("--steps", type=int, default=None, help="DDIM steps (default: the model's).")
    pg.add_argument("--guidance", type=float, default=None, help="CFG scale (default: the model's).")
    pg.add_argument("--size", type=int, default=0, help="Resize the output to this many pixels (0 = native; "
                    "the shapes judge reads 64).")
    pg.add_argument("--device", default="auto", help="auto, cpu or cuda.")
    pg.add_argument("--out", required=True, help="PNG file (with several seeds: NAME_seedS.png).")
    pg.add_argument("--overwrite", action="store_true", help="Replace existing files.")
    pg.set_defaults(func=cmd_generate)
    return parser


def main(argv: list[str]) -> int:
    from erasure.runs import RunDirError

    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("diffusers", "transformers"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, FileExistsError, ImportError, RunDirError) as err:
        print(f"erasure {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"erasure {args.command}: interrupted; re-run the same command to resume", file=sys.stderr)
        return 130
