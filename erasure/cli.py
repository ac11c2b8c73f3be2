"""Command line: ``erasure mask | erase | generate | export | methods | presets | recipes``.

Every flag of ``erase`` and ``mask`` comes from :class:`erasure.config.EraseConfig`, so ``--help`` lists
all of them with their defaults.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import shutil
import signal
import sys
import threading
from pathlib import Path

from erasure.jsonconfig import FieldValueError, add_config_arguments, given_fields
from erasure.progress import TqdmProgress
from erasure.threads import help_text as threads_help

logger = logging.getLogger("erasure")

EXIT_BAD_INPUT = 2
EXIT_CANCELLED = 130


def _concept_args(p: argparse.ArgumentParser, anchor_required: bool = True) -> None:
    g = p.add_argument_group("concept (or use --preset / --concept-file / --recipe)")
    g.add_argument("--preset", help="Named concept preset from prompts/presets (see `erasure presets`).")
    g.add_argument("--recipe", help="A paper's official setting, NAME or NAME:VARIANT (see `erasure recipes`); "
                   "--config and flags override it.")
    g.add_argument("--recipe-data", default=None, help="The user data a recipe reads (e.g. the Imagenette folder "
                   "ROOT with ROOT/train/<wnid>/*.JPEG for salun-objects).")
    g.add_argument("--concept-file", help="JSON file with one ConceptSpec or a list of them.")
    g.add_argument("--concept-name", default=None, help="Name of the concept given by the flags below.")
    g.add_argument("--forget-prompt", action="append", default=[], help="Prompt that produces the concept (repeatable).")
    g.add_argument(
        "--anchor-prompt", action="append", default=[],
        help="Remap target: once for all forget prompts, or once per forget prompt in the same order (repeatable)."
        + (" Without one, --anchor-rule decides (the model defaults: the nearest concept of the same kind)."
           if anchor_required else " Not needed for masks."),
    )
    g.add_argument("--retain-prompt", action="append", default=[], help="Prompt whose output must not change (repeatable).")
    g.add_argument("--forget-images", default=None, help="Folder of images to use as Df instead of generating them.")
    g.add_argument("--retain-images", default=None, help="Folder of images to use as Dr instead of generating them.")


def _build_config(args: argparse.Namespace, for_mask: bool = False):
    """The config of ``erase``/``mask`` and where each setting came from (``settings_source``).

    Layers, lowest to highest: built-in defaults, the model's defaults (:mod:`erasure.auto.defaults`), a preset or
    a recipe, ``--config``, explicit flags."""
    from erasure.auto.config import AutoConfig
    from erasure.auto.defaults import model_defaults, resolve_settings
    from erasure.config import ConceptSpec, EraseConfig
    from erasure.presets import load_preset

    base: dict = {}
    concepts: list[dict] = []
    layers: list[tuple[str, dict]] = []
    if args.config:
        base = _read_json_file(args.config, "--config")
        if not isinstance(base, dict):
            raise ValueError(f"--config {args.config}: expected a JSON object of EraseConfig fields")
        concepts = base.pop("concepts", [])
        if not isinstance(concepts, list):
            raise ValueError(f"--config {args.config}: \"concepts\" must be a list of concept objects")
    if args.preset:
        pr = load_preset(args.preset)
        layers.append((f"preset:{pr.name}", pr.config))
        concepts.extend(c.to_dict() for c in pr.concepts)
    if args.concept_file:
        data = _read_json_file(args.concept_file, "--concept-file")
        items = data if isinstance(data, list) else [data]
        if not items or not all(isinstance(c, dict) for c in items):
            raise ValueError(f"--concept-file {args.concept_file}: expected a concept object or a list of them")
        for i, c in enumerate(items):
            try:
                ConceptSpec.from_dict(c)
            except (ValueError, TypeError) as err:
                raise ValueError(f"--concept-file {args.concept_file}, concept {i + 1}: {err}") from None
        concepts.extend(items)
    if args.recipe_data and not args.recipe:
        raise ValueError("--recipe-data is read by a recipe: add --recipe NAME")
    if args.forget_prompt:
        anchors = args.anchor_prompt or (args.forget_prompt if for_mask else [])
        if args.recipe and not args.anchor_prompt:
            anchors = []
        # no anchor: the recipe decides (ESD needs none; UCE maps to the empty prompt), else auto.anchor_rule
        concepts.append(ConceptSpec(
            name=args.concept_name or args.forget_prompt[0][:40], forget_prompts=args.forget_prompt,
            anchor_prompts=anchors, retain_prompts=args.retain_prompt, forget_images=args.forget_images,
            retain_images=args.retain_images,
        ).to_dict())
    elif args.anchor_prompt or args.retain_prompt:
        raise ValueError("--anchor-prompt/--retain-prompt given without --forget-prompt")
    if args.recipe:
        recipe_config, concepts = _apply_recipe(args, base, concepts)
        layers.append((f"recipe:{args.recipe.partition(':')[0]}", recipe_config))
    if not concepts:
        raise ValueError("nothing to erase: give --forget-prompt, --preset or --concept-file")
    if args.config:
        layers.append(("config", base))
    flags = dict(given_fields(EraseConfig, args))
    flags.pop("concepts", None)
    method = flags.get("method") or next((lay.get("method") for _, lay in reversed(layers) if lay.get("method")), None)
    model = flags.get("model") or next((lay.get("model") for _, lay in reversed(layers) if lay.get("model")), "default")
    if not getattr(args, "no_model_defaults", False):
        mdef, msrc = model_defaults(model)
        if msrc:
            layers.insert(0, (msrc, mdef))
    method = method or next((lay.get("method") for _, lay in reversed(layers) if lay.get("method")), "salun")
    flags["method_args"] = _method_args(args, method, {})
    flags["auto"] = given_fields(AutoConfig, args)
    if for_mask and not any(c.get("retain_prompts") for c in concepts) and "alpha" in _method_flags(method) \
            and "alpha" not in flags["method_args"]:
        flags["method_args"]["alpha"] = 0.0
    layers.append(("flag", flags))
    data, source = resolve_settings(layers)
    data["concepts"] = concepts
    return EraseConfig.from_dict(data), source


def _apply_recipe(args: argparse.Namespace, base: dict, concepts: list[dict]) -> tuple[dict, list[dict]]:
    """The recipe's settings (a layer under ``--config`` and flags); its concepts (or, for a method-only recipe, the
    given ones)."""
    from erasure.config import EraseConfig
    from erasure.recipes import load_recipe, resolve_recipe

    recipe = load_recipe(args.recipe.partition(":")[0])
    if concepts and recipe.builder != "concept":
        raise ValueError(f"recipe {recipe.name} brings its own concept; drop --forget-prompt/--preset/--concept-file")
    pr = resolve_recipe(args.recipe, args.recipe_data, {**base, **given_fields(EraseConfig, args)}, concepts)
    if args.recipe.partition(":")[2] and concepts:
        raise ValueError(f"--recipe {args.recipe} names its concept; drop --forget-prompt/--preset/--concept-file")
    return dict(pr.config), [c.to_dict() for c in pr.concepts]


def _read_json_file(path: str, flag: str):
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{flag} {p}: no such file")
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise ValueError(f"{flag} {p}: not UTF-8 text; save it as UTF-8 JSON") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"{flag} {p}: not valid JSON ({err.msg} at line {err.lineno})") from None


def _method_flags(method: str) -> dict[str, str]:
    """Field name -> flag dest of ``method``'s config fields."""
    import dataclasses

    from erasure.jsonconfig import flag_dest
    from erasure.methods import get_method

    cls = get_method(method).config_cls
    return {f.name: flag_dest(f.name, cls.cli_prefix) for f in dataclasses.fields(cls)}


def _method_args(args: argparse.Namespace, method: str, base: dict) -> dict:
    """The method's own settings: ``base["method_args"]`` (or legacy top-level keys), then its flags.

    A flag of another method is refused rather than ignored."""
    import dataclasses

    from erasure.jsonconfig import flag_dest
    from erasure.methods import LEGACY_KEYS, METHODS

    mine = _method_flags(method)
    out = dict(base.pop("method_args", None) or {})
    for old, new in LEGACY_KEYS.items():  # --config files written before method_args
        if old in base:
            value = base.pop(old)
            if new in mine:
                out.setdefault(new, value)
    for name, dest in mine.items():
        if hasattr(args, dest):
            out[name] = getattr(args, dest)
    for spec in METHODS.values():
        for f in dataclasses.fields(spec.config_cls):
            dest = flag_dest(f.name, spec.config_cls.cli_prefix)
            if hasattr(args, dest) and dest not in mine.values():
                raise ValueError(f"--{dest.replace('_', '-')} is a setting of method {spec.name}, not of {method}; "
                                 f"drop it or choose --method {spec.name}")
    return out


def add_method_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per field of every registered method's config, in a group per config class."""
    from erasure.methods import METHODS

    seen: dict = {}
    groups: dict[type, list[str]] = {}
    for spec in METHODS.values():
        groups.setdefault(spec.config_cls, []).append(spec.name)
    for cls, names in groups.items():
        g = parser.add_argument_group(f"method settings ({', '.join(names)})")
        add_config_arguments(g, cls, prefix=cls.cli_prefix, seen=seen)


def _is_main_process() -> bool:
    """False on the non-zero ranks of ``accelerate launch`` / torchrun (only rank 0 draws progress bars)."""
    return int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")) or 0) == 0


@contextlib.contextmanager
def _cancel_on_signal():
    """SIGINT/SIGTERM set a cancel event: the run checkpoints at the end of the step and stops (a second
    SIGINT interrupts at once). Under ``accelerate launch`` a signal to any rank stops every rank."""
    cancel = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield cancel
        return

    def handler(signum, frame):
        if cancel.is_set() and signum == signal.SIGINT:
            raise KeyboardInterrupt
        logger.warning("stopping at the end of this step (checkpoint, then exit); press Ctrl-C again to stop at once")
        cancel.set()

    old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield cancel
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def cmd_erase(args: argparse.Namespace) -> int:
    from erasure.auto.config import TuneConfig
    from erasure.auto.retain import check_sources
    from erasure.auto.tune import tune_and_erase
    from erasure.diffusion.train import EraseCancelled
    from erasure.io import check_output_path
    from erasure.jsonconfig import config_from_args

    check_output_path(args.out, "--out", "folder")
    cfg, source = _build_config(args)
    tune = config_from_args(TuneConfig, args)
    check_sources(cfg.auto)
    logger.info("settings: %s", ", ".join(f"{k}={_setting(cfg, k)} ({v})" for k, v in source.items() if v != "builtin"))
    bars = TqdmProgress() if _is_main_process() else None
    try:
        with _cancel_on_signal() as cancel:
            out = tune_and_erase(cfg, tune, args.out, overwrite=args.overwrite, progress=bars, cancel=cancel,
                                 run_info={"settings_source": source})
    except EraseCancelled as err:
        print(f"erasure erase: {err}", file=sys.stderr)
        return EXIT_CANCELLED
    finally:
        if bars is not None:
            bars.close()
    if not _is_main_process():
        return 0
    from erasure.runs import read_run

    info = read_run(out)
    logger.info("wrote %s (method %s, %s changed weights, %.1f s)", out, info["method"], info["changed_params"],
                info["timing_s"]["total"])
    return 0


def _setting(cfg, key: str):
    obj = cfg
    for part in key.split("."):
        obj = getattr(obj, part, None)
    return obj


def cmd_mask(args: argparse.Namespace) -> int:
    from erasure.diffusion.train import compute_mask
    from erasure.io import check_output_path
    from erasure.saliency import mask_stats

    check_output_path(args.out, "--out", "file")
    cfg, _ = _build_config(args, for_mask=True)
    bars = TqdmProgress() if _is_main_process() else None
    try:
        mask = compute_mask(cfg, out=args.out, progress=bars, overwrite=args.overwrite)
    finally:
        if bars is not None:
            bars.close()
    st = mask_stats(mask)
    logger.info("wrote %s: %d of %d weights salient (%.4f)", args.out, st["kept"], st["total"], st["ratio"])
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from erasure.diffusion.pipeline import check_guidance, check_seed, generate, load_pipeline
    from erasure.io import atomic_path, check_output_path
    from erasure.runs import load_erased_pipeline

    out = Path(args.out)
    if out.suffix.lower() != ".png":
        raise ValueError(f"--out must be a .png file, got {out}")
    seeds = [check_seed(s) for s in (args.seed or [0])]
    check_guidance(args.guidance)
    if args.steps < 1:
        raise ValueError(f"--steps must be >= 1, got {args.steps}")
    for name in ("height", "width"):
        if getattr(args, name) < 0:
            raise ValueError(f"--{name} must be >= 0 (0 = the model's native size), got {getattr(args, name)}")
    targets = [out] if len(seeds) == 1 else [out.with_name(f"{out.stem}_seed{s}.png") for s in seeds]
    for t in targets:
        if t.is_dir():
            raise FileExistsError(f"--out {t} is a folder; give a .png file path")
        if t.exists() and not args.overwrite:
            raise FileExistsError(f"{t} exists; pass --overwrite or choose another --out")
    for t in targets:
        check_output_path(t, "--out", "file")
    if args.run:
        pipe = load_erased_pipeline(args.run, device=args.device, base_model=args.model)
    else:
        pipe = load_pipeline(args.model, device=args.device)
    images = generate(pipe, args.prompt, seeds, steps=args.steps, guidance=args.guidance, height=args.height or None,
                      width=args.width or None, negative_prompt=args.negative_prompt)
    for t, im in zip(targets, images):
        with atomic_path(t, ".png") as tmp:
            im.save(tmp, format="PNG")
        logger.info("wrote %s", t)
    return 0


EXPORT_MARKER = ".salun-erasure-export"
"""A file export writes into every folder it makes; --overwrite replaces only folders that hold it."""


def _check_export_targets(out: Path, single_file: str | None, overwrite: bool) -> None:
    """Validate every output path before any work (nothing is written when one is wrong)."""
    from erasure.io import check_output_path

    check_output_path(out, "--out", "folder")
    if single_file:
        check_output_path(single_file, "--single-file", "file")
    if out.exists():
        if not overwrite:
            raise FileExistsError(f"{out} exists; pass --overwrite or choose another --out")
        if any(out.iterdir()) and not (out / EXPORT_MARKER).is_file():
            raise FileExistsError(f"{out} holds files that `erasure export` did not write; refusing to replace it even "
                                  "with --overwrite: choose another --out")
    if not out.parent.is_dir():
        raise FileNotFoundError(f"the folder of --out does not exist: {out.parent}")
    if single_file:
        sf = Path(single_file)
        if sf.suffix != ".safetensors":
            raise ValueError(f"--single-file must end in .safetensors, got {sf}")
        if sf.exists() and not overwrite:
            raise FileExistsError(f"{sf} exists; pass --overwrite or choose another --single-file")
        if not sf.parent.is_dir():
            raise FileNotFoundError(f"the folder of --single-file does not exist: {sf.parent}")


def cmd_export(args: argparse.Namespace) -> int:
    from erasure.io import publish_dir
    from erasure.lora import check_lora_args, export_lora
    from erasure.runs import load_erased_pipeline, read_run

    if args.out is None and not args.lora:
        raise ValueError("give --out DIR (a diffusers folder), --lora FILE, or both")
    if args.single_file and args.out is None:
        raise ValueError("--single-file needs --out too (the folder export)")
    check_lora_args(args.lora, args.lora_rank, args.lora_energy, args.lora_format, args.lora_bias, args.overwrite)
    out = Path(args.out) if args.out is not None else None
    if out is not None:
        _check_export_targets(out, args.single_file, args.overwrite)
    read_run(args.run)  # a bad run folder fails before anything is loaded
    if args.lora:  # first, from the base model (one denoiser in memory at a time)
        ext = export_lora(args.run, args.lora, args.lora_rank, args.lora_energy, args.lora_format, args.lora_bias,
                          args.overwrite)
        st = ext.stats()
        logger.info("wrote %s LoRA %s (%d layers, rank up to %d)", args.lora_format, args.lora, st["modules"],
                    st["max_rank"])
        del ext
    if out is None:
        return 0
    pipe = load_erased_pipeline(args.run, device="cpu")
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        pipe.save_pretrained(str(tmp), safe_serialization=True)
        (tmp / EXPORT_MARKER).write_text(json.dumps({"run": str(Path(args.run).resolve())}) + "\n")
        publish_dir(tmp, out)
    except OSError as err:  # e.g. a full disk: one line, nothing half-written left behind
        raise FileExistsError(f"could not write {out}: {err.strerror or err}") from err
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    logger.info("wrote diffusers pipeline folder %s", out)
    if args.single_file:
        from erasure.export import save_single_file

        save_single_file(pipe, args.single_file, overwrite=args.overwrite)
        logger.info("wrote single-file checkpoint %s", args.single_file)
    return 0


def cmd_methods(args: argparse.Namespace) -> int:
    import dataclasses

    from erasure.jsonconfig import flag_dest
    from erasure.methods import METHODS

    for m in METHODS.values():
        flags = " ".join("--" + flag_dest(f.name, m.config_cls.cli_prefix).replace("_", "-")
                         for f in dataclasses.fields(m.config_cls))
        print(f"{m.name:8s} {m.shape:4s} mask={'yes' if m.needs_mask else 'no ':3s} {m.description}  {m.paper}"
              + f"\n{'':8s} families: {', '.join(m.families)}"
              + (f"\n{'':8s} settings: {flags}" if flags else ""))
    return 0


def cmd_recipes(args: argparse.Namespace) -> int:
    from erasure.recipes import list_recipes, load_recipe

    for name in list_recipes():
        r = load_recipe(name)
        src = r.source
        variants = r.variant_names()
        print(f"{name:14s} v{r.version} {r.description}\n{'':14s} source: github.com/{src['repo']}/blob/"
              f"{src['commit'][:12]}/{src['file']}"
              + (f"\n{'':14s} variants: {', '.join(variants)}" if variants else "")
              + (f"\n{'':14s} data: {r.data['flag']} ({r.data['layout']})" if r.data else ""))
    return 0


def cmd_presets(args: argparse.Namespace) -> int:
    from erasure.presets import list_presets, load_preset

    for name in list_presets():
        pr = load_preset(name)
        print(f"{name:18s} [{pr.model or '-':6s} {pr.kind or '-':7s}] {pr.description}")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from erasure.bench import BenchConfig, run_bench
    from erasure.jsonconfig import config_from_args

    cfg = config_from_args(BenchConfig, args)
    bars = TqdmProgress() if sys.stderr.isatty() else None
    try:
        data = run_bench(cfg, progress=bars)
    finally:
        if bars is not None:
            bars.close()
    for r in data["rows"]:
        print(f"{r['method']:12s} forget {r['forget']!s:>8} retain {r['retain']!s:>8} n={r['n_seeds']}")
    print(f"leaderboard: {cfg.out}/leaderboard.{{csv,md,json,html,svg}}")
    return 0


def _auto_arguments(p: argparse.ArgumentParser, with_tune: bool) -> None:
    from erasure.auto.config import AutoConfig, TuneConfig

    add_config_arguments(p.add_argument_group("automatic retain and neighbour sets (erasure.auto)"), AutoConfig)
    if with_tune:
        add_config_arguments(p.add_argument_group("budgeted tuning"), TuneConfig)


def build_parser() -> argparse.ArgumentParser:
    from erasure.config import EraseConfig

    parser = argparse.ArgumentParser(prog="erasure", description="SalUn concept erasure for Stable Diffusion.",
                                     epilog=threads_help())
    parser.add_argument("-v", "--verbose", action="store_true", help="Debug logging.")
    sub = parser.add_subparsers(dest="command", required=True)

    pe = sub.add_parser("erase", help="Erase concepts; writes a run directory.")
    pe.add_argument("--out", required=True, help="Run directory to create (RUN_DIR).")
    pe.add_argument("--overwrite", action="store_true", help="Replace an existing run at --out.")
    pe.add_argument("--config", help="JSON EraseConfig to start from (flags override it).")
    pe.add_argument("--no-model-defaults", action="store_true",
                    help="Ignore the model's erasure_defaults.json (and the paper's SD v1/v2 settings).")
    _concept_args(pe)
    add_config_arguments(pe, EraseConfig)
    add_method_arguments(pe)
    _auto_arguments(pe, with_tune=True)
    pe.set_defaults(func=cmd_erase)

    pm = sub.add_parser("mask", help="Compute and save a SalUn saliency mask.")
    pm.add_argument("--out", required=True, help="Mask file to write (.safetensors).")
    pm.add_argument("--overwrite", action="store_true", help="Replace an existing mask file.")
    pm.add_argument("--config", help="JSON EraseConfig to start from (flags override it).")
    pm.add_argument("--no-model-defaults", action="store_true",
                    help="Ignore the model's erasure_defaults.json (and the paper's SD v1/v2 settings).")
    _concept_args(pm, anchor_required=False)
    add_config_arguments(pm, EraseConfig, skip=("steps", "lr", "optimizer", "weight_decay", "momentum",
                                                "max_grad_norm", "grad_accum", "checkpoint_every", "mask_path",
                                                "retain_images_per_prompt", "mixed_precision", "gradient_checkpointing"))
    pm.set_defaults(func=cmd_mask)

    pg = sub.add_parser("generate", help="Generate images with the base model or an erased run.")
    pg.add_argument("--model", default=None, help="Base model folder or hub id (default: embedded shapes model; "
                    "with --run: the run's own base model).")
    pg.add_argument("--run", help="Run directory whose erased denoiser (UNet or transformer) to use.")
    pg.add_argument("--prompt", required=True, help="Prompt.")
    pg.add_argument("--negative-prompt", default=None, help="Negative prompt.")
    pg.add_argument("--seed", type=int, action="append", help="Seed (repeatable: one image per seed). Default 0.")
    pg.add_argument("--steps", type=int, default=25, help="DDIM steps.")
    pg.add_argument("--guidance", type=float, default=7.5, help="CFG scale.")
    pg.add_argument("--height", type=int, default=0, help="Height in pixels (0 = native).")
    pg.add_argument("--width", type=int, default=0, help="Width in pixels (0 = native).")
    pg.add_argument("--device", default="auto", help="auto, cpu or cuda.")
    pg.add_argument("--out", required=True, help="PNG file (with several seeds: NAME_seedS.png).")
    pg.add_argument("--overwrite", action="store_true", help="Replace existing files.")
    pg.set_defaults(func=cmd_generate)

    px = sub.add_parser("export", help="Write an erased run as a diffusers pipeline folder, a single file and/or a LoRA.")
    px.add_argument("--run", required=True, help="Run directory.")
    px.add_argument("--out", default=None, help="Diffusers folder to write (omit it to write only --lora).")
    px.add_argument("--single-file", default=None, help="Also write a single-file .safetensors checkpoint (the A1111/ComfyUI "
                    "layout; SD v1 and SDXL).")
    from erasure.lora import add_lora_arguments

    add_lora_arguments(px)
    px.add_argument("--overwrite", action="store_true", help="Replace existing outputs.")
    px.set_defaults(func=cmd_export)

    pb = sub.add_parser("bench", help="Erase with several methods x seeds, evaluate under a protocol, write a "
                        "leaderboard (resumable).")
    from erasure.bench import BenchConfig

    add_config_arguments(pb, BenchConfig)
    pb.set_defaults(func=cmd_bench)

    sub.add_parser("methods", help="List erasure methods.").set_defaults(func=cmd_methods)
    sub.add_parser("presets", help="List concept presets.").set_defaults(func=cmd_presets)
    sub.add_parser("recipes", help="List the papers' settings (recipes) with their sources.").set_defaults(func=cmd_recipes)
    return parser


def _quiet_library_progress_bars() -> None:
    """The CLI shows its own per-stage bars; hide diffusers'/transformers' loading bars (process-wide)."""
    try:
        import diffusers.utils.logging as dlog
        import transformers.utils.logging as tlog

        dlog.disable_progress_bar()
        tlog.disable_progress_bar()
    except ImportError:  # pragma: no cover
        pass


def main(argv: list[str] | None = None) -> int:
    from erasure.ddpm.cli import wants_class_ddpm

    argv = sys.argv[1:] if argv is None else list(argv)
    if wants_class_ddpm(argv):  # class-conditional DDPMs (--forget-class / --class, or such a model or run)
        from erasure.ddpm.cli import main as class_main

        return class_main(argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("diffusers", "transformers"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    _quiet_library_progress_bars()
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, FileExistsError, ImportError) as err:
        flag = f"{err.flag}: " if isinstance(err, FieldValueError) and err.flag not in str(err) else ""
        print(f"erasure {args.command}: error: {flag}{err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print(f"erasure {args.command}: interrupted; re-run the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
