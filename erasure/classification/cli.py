"""``erasure-cls``: classification unlearning from the command line.

Subcommands::

    erasure-cls train   --dataset digits --seed 0                      # train/cache the original model
    erasure-cls unlearn --method salun --seed 0 --out runs/cls/salun   # one method, one seed -> run dir
    erasure-cls bench   --dataset digits --scenario random --forget-fraction 0.1 --methods all --seeds 5 --out DIR
    erasure-cls bench   --scenario class --forget-class 3 --out DIR
    erasure-cls table   DIR                                            # rebuild the tables from DIR/results.json
    erasure-cls methods                                                # list methods and their config fields
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import shutil
import sys
from pathlib import Path
from typing import Any

from erasure.jsonconfig import add_config_arguments, config_from_args
from erasure.threads import help_text as threads_help

logger = logging.getLogger("erasure.classification.cli")

__all__ = ["main", "build_parser"]


def _parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _parse_sets(items: list[str] | None) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for item in items or []:
        if "=" not in item or "." not in item.split("=", 1)[0]:
            raise ValueError(f"--set expects method.key=value, got {item!r}")
        lhs, value = item.split("=", 1)
        method, key = lhs.split(".", 1)
        out.setdefault(method, {})[key] = _parse_value(value)
    return out


def build_parser() -> argparse.ArgumentParser:
    from erasure.classification.config import ClsBenchConfig, ClsTrainConfig, ClsUnlearnConfig

    ap = argparse.ArgumentParser(prog="erasure-cls", description="Classification unlearning (SalUn and baselines).",
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=f"{__doc__}\n{threads_help()}")
    ap.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = ap.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train", help="train (or load from the cache) the original model")
    p.add_argument("--config", help="JSON config file (flags override it)")
    add_config_arguments(p, ClsTrainConfig)
    p = sub.add_parser("unlearn", help="run one method on one seed")
    p.add_argument("--config", help="JSON config file (flags override it)")
    add_config_arguments(p, ClsUnlearnConfig)
    p.add_argument("--method-args", dest="method_args_json", help="JSON object of method config overrides, e.g. '{\"lr\": 0.01}'")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing run directory at --out (only once the new run is complete)")
    p = sub.add_parser("bench", help="every method x seed, then the paper's table")
    p.add_argument("--config", help="JSON config file (flags override it)")
    add_config_arguments(p, ClsBenchConfig)
    p.add_argument("--set", action="append", metavar="METHOD.KEY=VALUE",
                   help="override one method knob, e.g. --set salun.lr=0.01 (repeatable)")
    p = sub.add_parser("table", help="rebuild the tables of a bench folder from its results.json")
    p.add_argument("dir")
    p.add_argument("--no-plot", action="store_true")
    sub.add_parser("methods", help="list the registered methods and their config defaults")
    return ap


def _progress_bar(desc: str):
    from tqdm import tqdm

    bar = tqdm(desc=desc, leave=False, file=sys.stderr, dynamic_ncols=True)

    def cb(done: int, total: int) -> None:
        if bar.total != total:
            bar.reset(total=total)
        bar.n = done
        bar.refresh()

    return cb, bar


def main(argv: list[str] | None = None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    logging.getLogger("erasure.saliency").setLevel(logging.WARNING)
    try:
        return _run(args)
    except (ValueError, FileNotFoundError, FileExistsError, FloatingPointError) as err:
        logger.error("%s", err)
        return 2


def _base(args: argparse.Namespace) -> dict[str, Any]:
    if getattr(args, "config", None):
        p = Path(args.config)
        if not p.is_file():
            raise FileNotFoundError(f"config file not found: {p}")
        try:
            return json.loads(p.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise ValueError(f"{p}: invalid JSON ({err})") from err
    return {}


def _threads(n: int | None) -> None:
    if n is not None:
        import torch

        torch.set_num_threads(n)


def _run(args: argparse.Namespace) -> int:
    from erasure.classification.config import ClsBenchConfig, ClsTrainConfig, ClsUnlearnConfig

    if args.command == "methods":
        from erasure.classification.methods import METHODS

        for name, spec in METHODS.items():
            defaults = {f.name: (f.default if f.default is not dataclasses.MISSING else None)
                        for f in dataclasses.fields(spec.config_cls)}
            sys.stdout.write(f"{name:16s} {spec.paper}\n    {json.dumps(defaults)}\n")
        return 0
    if args.command == "table":
        from erasure.classification.bench import write_tables
        from erasure.io import read_json

        d = Path(args.dir)
        recs = read_json(d / "results.json")
        orig = read_json(d / "originals.json") if (d / "originals.json").is_file() else None
        write_tables(recs, d, originals=orig, plot=not args.no_plot)
        sys.stdout.write((d / "table.txt").read_text(encoding="utf-8"))
        return 0
    if args.command == "train":
        from erasure.classification.pipeline import Workspace

        cfg = config_from_args(ClsTrainConfig, args, _base(args))
        _threads(cfg.threads)
        ws = Workspace.create(cfg)
        cb, bar = _progress_bar("train")
        _, info = ws.original(cfg.seed, progress=cb)
        bar.close()
        if cfg.out:
            Path(cfg.out).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(info["path"], cfg.out)
        sys.stdout.write(json.dumps({k: v for k, v in info.items() if k != "key"}, indent=2) + "\n")
        return 0
    if args.command == "unlearn":
        base = _base(args)
        if args.method_args_json:
            try:
                base["method_args"] = json.loads(args.method_args_json)
            except json.JSONDecodeError as err:
                raise ValueError(f"--method-args is not valid JSON ({err})") from err
        cfg = config_from_args(ClsUnlearnConfig, args, base)
        _threads(cfg.threads)
        return _unlearn(cfg, overwrite=args.overwrite)
    if args.command == "bench":
        from erasure.classification.bench import run_bench

        base = _base(args)
        sets = _parse_sets(args.set)
        if sets:
            ov = dict(base.get("overrides", {}))
            for m, kv in sets.items():
                ov[m] = {**ov.get(m, {}), **kv}
            base["overrides"] = ov
        cfg = config_from_args(ClsBenchConfig, args, base)
        _threads(cfg.threads)
        cb, bar = _progress_bar("bench")
        run_bench(cfg, progress=cb)
        bar.close()
        sys.stdout.write((Path(cfg.out) / "table.txt").read_text(encoding="utf-8"))
        return 0
    raise ValueError(f"unknown command {args.command!r}")


def _unlearn(cfg, overwrite: bool = False) -> int:
    """Write the run through :class:`erasure.runs.RunDir` (``OUT.partial``, renamed onto ``OUT`` when complete; an old
    run is replaced only then), readable afterwards with :func:`erasure.runs.read_run`."""
    from erasure.classification.models import save_checkpoint
    from erasure.classification.pipeline import Workspace, resolve_method_config, run_method
    from erasure.io import atomic_write_json, environment_info
    from erasure.runs import CLS_RUN_FORMAT, RunDir, RunExistsError

    out = Path(cfg.out)
    run = RunDir(out)
    try:
        run.check_target(overwrite)
    except RunExistsError as err:
        raise FileExistsError(str(err).replace("output folder", "--out")) from None
    shutil.rmtree(run.partial, ignore_errors=True)  # left by a killed run; unlearn runs do not resume
    run.begin(overwrite)
    part = run.partial
    try:
        ws = Workspace.create(cfg)
        mcfg = resolve_method_config(cfg.method, cfg.dataset, cfg.scenario, cfg.presets, cfg.method_args)
        original, oinfo = ws.original(cfg.seed)
        split = ws.split(cfg.seed, save_to=part / "split.json")
        cb, bar = _progress_bar(cfg.method)
        model, rec = run_method(ws, cfg.method, mcfg, cfg.seed, original, split, progress=cb, artifacts_dir=part)
        bar.close()
        save_checkpoint(model, part / "weights.safetensors", extra={"method": cfg.method, "seed": cfg.seed})
        rec["original"] = {k: v for k, v in oinfo.items() if k != "key"}
        rec.update(environment_info())
        # as in diffusion runs, "config" is the whole run's config; the method's resolved settings are "method_config"
        atomic_write_json(part / "run.json", {**rec, "format": CLS_RUN_FORMAT, "method": cfg.method,
                                              "method_config": rec.get("config"), "config": cfg.to_dict()})
        run.publish()
    finally:
        shutil.rmtree(part, ignore_errors=True)
    cols = ("UA", "MIA_efficacy", "RA", "TA", "MIA_auc", "RTE_s")
    sys.stdout.write(" ".join(f"{k}={rec[k]:.2f}" for k in cols) + f"\nrun directory: {out}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
