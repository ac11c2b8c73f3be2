"""Resumable, shardable, batched image generation from a prompt set.

Layout of an output folder ``DIR`` (one per (model, prompt set))::

    DIR/generation.json   settings, model/run id, prompt-file hash, package versions, filters, status
    DIR/images/<case>_<sample>.png   one PNG per (prompt row, sample); written atomically, with the
                                     generation record embedded as the PNG text chunk ``erasure-eval``
    DIR/manifest.jsonl    one JSON record per written image (model, run id, prompt, seed, guidance, ...)
    DIR/manifest.csv      the same records as a flat table

Sample ``k`` of a row uses seed ``evaluation_seed + k`` (rows without a seed use ``--seed + row index``),
the row's ``evaluation_guidance`` (else ``--guidance``). Re-running the same command skips images that are
already written and match their record, so a killed run loses at most the batch in flight.

Batches are fixed: this shard's images, ordered by (guidance, row, sample), are cut into slices of
``--batch-size`` per guidance value, and a slice with any image missing is generated whole. A diffusers image's
pixels depend on the batch it was generated in (a few uint8 values), so this keeps a resumed run bit-identical
to an uninterrupted one; ``--batch-size`` is therefore part of the settings (as is the shard count, in effect:
resume with the same one). Temp files left by a killed run are removed when the next run starts.

Sharding: rows are dealt round-robin over shards (row ``i`` of the filtered list goes to shard ``i % n``),
so shards never overlap and together cover every row. Under ``accelerate launch`` the shard count and
index come from accelerate's ``PartialState``; otherwise ``--num-shards/--shard-index`` run shards by hand.
Every shard writes the merged manifest of all images present when it finishes (under a file lock); under
accelerate the main process writes it after all shards are done.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import logging
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from erasure.diffusion.pipeline import MAX_GUIDANCE, MAX_SEED
from erasure.io import (
    atomic_path,
    atomic_write_json,
    atomic_write_text,
    check_output_path,
    clean_stale_temps,
    environment_info,
    file_sha256,
    read_json,
)
from erasure.jsonconfig import JsonConfig, field
from erasure_eval.prompts import PromptRow, filter_rows, load_prompts
from erasure_eval.protocols import GENERATE_KEYS, generation_stamp
from erasure_eval.schedulers import check_scheduler, use_scheduler

logger = logging.getLogger(__name__)

__all__ = [
    "GenerateConfig",
    "GenerationError",
    "ImageItem",
    "plan_items",
    "shard_rows",
    "run_generation",
    "merge_manifest",
    "read_manifest",
    "PNG_KEY",
]

PNG_KEY = "erasure-eval"
MANIFEST_FIELDS = (
    "file", "model", "run_id", "case_number", "sample", "row_index", "prompt", "seed", "guidance", "steps",
    "height", "width", "categories",
)


class GenerationError(ValueError):
    """Bad generation settings, or an output folder made with other settings."""


@dataclass
class GenerateConfig(JsonConfig):
    """Settings of ``erasure-eval generate``."""

    prompts: str = field(None, help="Prompt CSV (needs a 'prompt' column; uses evaluation_seed/evaluation_guidance/case_number/categories when present).")
    out: str = field(None, help="Output folder: images/ and manifest.jsonl/.csv are written there.")
    model: str | None = field(None, help="Base model: diffusers folder or hub id ('default' = the embedded shapes model). With --run, overrides the run's base model.")
    run: str | None = field(None, help="Run directory of an erased model (written by `erasure erase`).")
    samples: int = field(1, help="Images per prompt row; sample k uses seed + k.")
    category: list[str] = field(default_factory=list, help="Keep rows of this I2P category (e.g. sexual).")
    start: int | None = field(None, help="First CSV row (0-based data row) to keep.")
    end: int | None = field(None, help="Stop before this CSV row.")
    limit: int | None = field(None, help="Keep at most this many rows (after the other filters).")
    steps: int = field(25, help="Denoising steps (DDIM).")
    guidance: float = field(7.5, help="CFG scale for rows without evaluation_guidance.", min=0.0, max=MAX_GUIDANCE)
    seed: int = field(0, help="Seed base for rows without evaluation_seed (seed = this + row index).", min=0,
                      max=MAX_SEED)
    height: int | None = field(None, help="Image height (default: the model's native size).")
    width: int | None = field(None, help="Image width (default: the model's native size).")
    negative_prompt: str | None = field(None, help="Negative prompt for every image.")
    batch_size: int = field(8, help="Images per pipeline call.")
    device: str = field("auto", help="auto, cpu, cuda or cuda:N (ignored under accelerate launch).")
    num_shards: int | None = field(None, help="Split rows over this many shards (default: accelerate's process count, else 1).")
    shard_index: int | None = field(None, help="Which shard this process generates (0-based).")
    scheduler: Literal["ddim", "lms", "euler", "euler_a", "pndm", "dpm"] = field("ddim", help="Sampler.")
    protocol: str | None = field(None, help="Evaluation protocol (`erasure-eval protocols`): fixes sampler, steps, "
                                 "guidance, samples, seeds, size and prompt set; flags that contradict it are refused.")

    def __post_init__(self) -> None:
        self.check_fields()
        if not self.prompts:
            raise ValueError("--prompts is required")
        if not self.out:
            raise ValueError("--out is required")
        if self.samples < 1:
            raise ValueError(f"--samples must be >= 1, got {self.samples}")
        if self.steps < 1:
            raise ValueError(f"--steps must be >= 1, got {self.steps}")
        if self.batch_size < 1:
            raise ValueError(f"--batch-size must be >= 1, got {self.batch_size}")
        if self.seed < 0:
            raise ValueError(f"--seed must be >= 0, got {self.seed}")
        for name in ("height", "width"):
            v = getattr(self, name)
            if v is not None and v < 8:
                raise ValueError(f"--{name} must be >= 8, got {v}")
        if (self.num_shards is None) != (self.shard_index is None):
            raise ValueError("give --num-shards and --shard-index together")
        if self.num_shards is not None:
            if self.num_shards < 1 or not 0 <= self.shard_index < self.num_shards:  # type: ignore[operator]
                raise ValueError(f"--shard-index must be in [0, {self.num_shards}), got {self.shard_index}")
        if isinstance(self.category, str):
            self.category = [self.category]


@dataclass
class ImageItem:
    """One planned image: a (prompt row, sample) pair and everything that determines it."""

    file: str
    case_number: str
    sample: int
    row_index: int
    prompt: str
    seed: int
    guidance: float
    categories: list[str]
    extra: dict[str, str]

    def key(self) -> dict[str, Any]:
        """What is embedded in the PNG and checked on resume."""
        return {"case_number": self.case_number, "sample": self.sample, "seed": self.seed, "guidance": self.guidance}


def plan_items(rows: list[PromptRow], samples: int, default_guidance: float, seed_base: int) -> list[ImageItem]:
    items = []
    for r in rows:
        base = r.seed if r.seed is not None else seed_base + r.index
        g = r.guidance if r.guidance is not None else default_guidance
        for k in range(samples):
            items.append(ImageItem(
                file=f"{r.case_number}_{k}.png", case_number=r.case_number, sample=k, row_index=r.index,
                prompt=r.prompt, seed=base + k, guidance=float(g), categories=list(r.categories), extra=dict(r.extra),
            ))
    return items


def shard_rows(rows: list[PromptRow], num_shards: int, shard_index: int) -> list[PromptRow]:
    """Row ``i`` of ``rows`` goes to shard ``i % num_shards``: disjoint shards whose union is ``rows``."""
    if num_shards < 1 or not 0 <= shard_index < num_shards:
        raise ValueError(f"shard index {shard_index} out of range for {num_shards} shards")
    return rows[shard_index::num_shards]


def _png_record(path: Path) -> dict[str, Any] | None:
    """The generation record embedded in a PNG, or ``None`` when the file is missing/unreadable/foreign."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            if im.format != "PNG":
                return None
            raw = im.info.get(PNG_KEY)
            im.verify()  # chunk CRCs through the end of the file: catches truncated or damaged files
        return json.loads(raw) if raw else None
    except (OSError, ValueError, SyntaxError):
        return None


def _is_done(images_dir: Path, item: ImageItem, settings_id: str) -> bool:
    rec = _png_record(images_dir / item.file)
    return rec is not None and rec.get("settings_id") == settings_id and rec.get("key") == item.key()


def _fixed_batches(items: list[ImageItem], batch_size: int) -> list[list[ImageItem]]:
    """``items`` ordered by (guidance, row, sample), cut into slices of ``batch_size`` per guidance value.

    The slices depend on the planned list only, never on what is already written, so a resumed run generates
    each missing image in the same batch as an uninterrupted run would (pixels depend on the batch)."""
    order = sorted(items, key=lambda it: (it.guidance, it.row_index, it.sample))
    out: list[list[ImageItem]] = []
    for it in order:
        if out and len(out[-1]) < batch_size and out[-1][0].guidance == it.guidance:
            out[-1].append(it)
        else:
            out.append([it])
    return out


def _has_images(images_dir: Path) -> bool:
    return images_dir.is_dir() and any(f.suffix == ".png" and not f.name.startswith(".") for f in images_dir.iterdir())


def _save_png(img, path: Path, record: dict[str, Any]) -> None:
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text(PNG_KEY, json.dumps(record, sort_keys=True))
    buf = io.BytesIO()
    img.save(buf, format="PNG", pnginfo=info)
    with atomic_path(path, ".png") as tmp:
        with open(tmp, "wb") as fh:
            fh.write(buf.getvalue())
            fh.flush()
            os.fsync(fh.fileno())


def _shard_context(cfg: GenerateConfig):
    """(num_shards, shard_index, device, state) — accelerate's PartialState when launched under accelerate."""
    if cfg.num_shards is not None:
        return cfg.num_shards, cfg.shard_index, cfg.device, None
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        import torch
        from accelerate import PartialState

        # on CPU accelerate only goes multi-process (gloo) when asked with cpu=True
        state = PartialState(cpu=not torch.cuda.is_available() or os.environ.get("ACCELERATE_USE_CPU") == "True")
        return state.num_processes, state.process_index, state.device, state
    return 1, 0, cfg.device, None


def _model_identity(cfg: GenerateConfig) -> dict[str, Any]:
    """Model label, run id and a weights fingerprint, without loading the model."""
    from erasure.diffusion.pipeline import model_fingerprint, resolve_model

    if cfg.run:
        from erasure import read_run

        info = read_run(cfg.run)
        base = resolve_model(cfg.model or info.get("base_model"))
        run_dir = Path(cfg.run).resolve()
        return {
            "model": base, "run_id": info.get("run_id") or run_dir.name, "run_dir": str(run_dir),
            "method": info.get("method"), "concepts": info.get("concepts"),
            "fingerprint": model_fingerprint(base) + "|run:" + file_sha256(run_dir / "weights.safetensors"),
        }
    base = resolve_model(cfg.model)
    return {"model": base, "run_id": "original", "run_dir": None, "method": None, "concepts": None,
            "fingerprint": model_fingerprint(base)}


def _settings_id(settings: dict[str, Any]) -> str:
    import hashlib

    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Hold an exclusive inter-process lock on ``path`` (``filelock``: flock on POSIX, msvcrt on Windows)."""
    from filelock import FileLock

    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(path):
        yield


def _load_pipe(cfg: GenerateConfig, device: Any):
    from erasure.diffusion.pipeline import ModelLoadError, load_pipeline

    if cfg.run:
        from erasure import load_erased_pipeline

        return load_erased_pipeline(cfg.run, device=device, base_model=cfg.model)
    try:
        return load_pipeline(cfg.model, device=device)
    except ModelLoadError:
        raise
    except Exception as err:  # noqa: BLE001 - report any loader failure as a model error
        raise ModelLoadError(f"cannot load model {cfg.model!r}: {err}") from err


def _resolution(cfg: GenerateConfig, model: str) -> tuple[int, int]:
    """The output size, read from the model's configs without loading weights."""
    if cfg.height and cfg.width:
        return cfg.height, cfg.width
    p = Path(model)
    size = None
    if p.is_dir():
        try:
            from erasure.backbones import detect_family, get_backbone

            size = get_backbone(detect_family(p)).folder_resolution(p)
        except (FileNotFoundError, KeyError, ValueError, TypeError):
            size = None
    if size is None:
        size = 512
    return cfg.height or size, cfg.width or size


def run_generation(
    cfg: GenerateConfig,
    progress: Callable[[int, int], None] | None = None,
    pipe: Any = None,
) -> dict[str, Any]:
    """Generate the missing images of ``cfg`` (this shard's rows) and write the merged manifest.

    Args:
        cfg (`GenerateConfig`): settings.
        progress (`Callable[[int, int], None]`, *optional*): called with (done, total) for this shard.
        pipe (*optional*): an already loaded pipeline for ``cfg.model``/``cfg.run`` (skips loading).

    Returns:
        `dict`: ``{"planned", "shard_planned", "generated", "skipped", "seconds", "manifest"}``.
    """
    from erasure_eval.class_generate import is_class_generation, run_class_generation

    if is_class_generation(cfg):  # a class-conditional DDPM: the CSV names a class per row
        return run_class_generation(cfg, progress)
    out = Path(cfg.out)
    try:
        check_output_path(out / "images", "--out", "folder")
        check_output_path(out, "--out", "folder")
    except FileExistsError as err:
        raise GenerationError(f"{err} (the images and manifest are written into this folder)") from None
    prompt_set = load_prompts(cfg.prompts)
    rows = filter_rows(prompt_set.rows, cfg.category or None, cfg.start, cfg.end, cfg.limit)
    num_shards, shard_index, device, state = _shard_context(cfg)
    ident = _model_identity(cfg)
    height, width = _resolution(cfg, ident["model"])
    if cfg.scheduler != "ddim" and pipe is None:
        check_scheduler(ident["model"], cfg.scheduler)  # before anything is written
    settings = {
        "model_fingerprint": ident["fingerprint"], "steps": cfg.steps, "default_guidance": cfg.guidance,
        "seed_base": cfg.seed, "height": height, "width": width, "negative_prompt": cfg.negative_prompt,
        "prompt_sha256": prompt_set.sha256, "batch_size": cfg.batch_size,
    }
    if cfg.scheduler != "ddim":  # DDIM folders keep their settings id from before the sampler became a setting
        settings["scheduler"] = cfg.scheduler
    stamp = generation_stamp(cfg.protocol, cfg.prompts, {k: getattr(cfg, k) for k in GENERATE_KEYS}) if cfg.protocol else None
    sid = _settings_id(settings)
    images_dir = out / "images"
    gen_json = out / "generation.json"
    if gen_json.is_file():
        prev = read_json(gen_json)
        if prev.get("settings_id") != sid and _has_images(images_dir):
            diff = [k for k in settings if prev.get("settings", {}).get(k) != settings[k]]
            raise GenerationError(
                f"{out} holds images made with other settings (differs in: {', '.join(diff) or 'model'}); "
                "use a new --out folder or delete the old one"
            )
    items_all = plan_items(rows, cfg.samples, cfg.guidance, cfg.seed)
    my_rows = shard_rows(rows, num_shards, shard_index)
    my_items = plan_items(my_rows, cfg.samples, cfg.guidance, cfg.seed)
    header = {
        "format": "erasure-eval-generation-v1",
        "settings_id": sid,
        "settings": settings,
        "model": ident["model"], "run_id": ident["run_id"], "run_dir": ident["run_dir"], "method": ident["method"],
        "concepts": ident["concepts"],
        "prompts": {"path": prompt_set.path, "sha256": prompt_set.sha256, "name": prompt_set.name,
                    "columns": prompt_set.columns, "rows_in_file": len(prompt_set.rows) + len(prompt_set.skipped_empty),
                    "skipped_empty_prompt_cases": prompt_set.skipped_empty},
        "filters": {"category": cfg.category, "start": cfg.start, "end": cfg.end, "limit": cfg.limit},
        "samples": cfg.samples, "steps": cfg.steps, "height": height, "width": width,
        "default_guidance": cfg.guidance, "negative_prompt": cfg.negative_prompt,
        "seeds": "evaluation_seed + sample (rows without one: seed_base + row index + sample)",
        "scheduler": cfg.scheduler, "protocol": stamp,
        "environment": environment_info(),
    }
    images_dir.mkdir(parents=True, exist_ok=True)
    with _locked(out / ".lock"):
        # a record of a run that wrote no image yet (e.g. refused a bad CSV row) is replaced, never held against
        # the corrected command
        if not gen_json.is_file() or (read_json(gen_json).get("settings_id") != sid and not _has_images(images_dir)):
            atomic_write_json(gen_json, dict(header, status={"planned": len(items_all), "written": 0, "complete": False}))
    clean_stale_temps(images_dir)
    batches = _fixed_batches(my_items, cfg.batch_size)
    done_flags = {it.file: _is_done(images_dir, it, sid) for it in my_items}
    todo = [b for b in batches if not all(done_flags[it.file] for it in b)]
    pending = [it for it in my_items if not done_flags[it.file]]
    skipped = len(my_items) - len(pending)
    logger.info("shard %d/%d: %d images planned, %d already written, %d to generate",
                shard_index, num_shards, len(my_items), skipped, len(pending))
    t0 = time.perf_counter()
    done = 0
    if pending:
        from erasure.diffusion.pipeline import generate

        if pipe is None:
            pipe = _load_pipe(cfg, device)
        for batch in todo:
            with use_scheduler(pipe, cfg.scheduler):
                imgs = generate(
                    pipe, [it.prompt for it in batch], [it.seed for it in batch], steps=cfg.steps,
                    guidance=[it.guidance for it in batch], height=height, width=width, batch_size=cfg.batch_size,
                    negative_prompt=cfg.negative_prompt,
                )
            for it, im in zip(batch, imgs):
                if not done_flags[it.file]:
                    _save_png(im, images_dir / it.file, {"settings_id": sid, "key": it.key(), "run_id": ident["run_id"]})
                    done += 1
            if progress is not None:
                progress(skipped + done, len(my_items))
    elif progress is not None:
        progress(len(my_items), len(my_items))
    seconds = time.perf_counter() - t0
    if state is not None:
        state.wait_for_everyone()
    manifest = None
    if state is None or state.is_main_process:
        manifest = merge_manifest(out, items_all, header)
    return {"planned": len(items_all), "shard_planned": len(my_items), "generated": done, "skipped": skipped,
            "seconds": seconds, "manifest": manifest, "num_shards": num_shards, "shard_index": shard_index}


def merge_manifest(out: str | os.PathLike, items: list[ImageItem], header: dict[str, Any]) -> dict[str, Any]:
    """Write manifest.jsonl/.csv for every planned image present in ``out/images`` and the status in generation.json."""
    out = Path(out)
    images_dir = out / "images"
    sid = header["settings_id"]
    with _locked(out / ".lock"):
        records = []
        for it in items:
            if not _is_done(images_dir, it, sid):
                continue
            records.append({
                "file": f"images/{it.file}", "model": header["model"], "run_id": header["run_id"],
                "case_number": it.case_number, "sample": it.sample, "row_index": it.row_index, "prompt": it.prompt,
                "seed": it.seed, "guidance": it.guidance, "steps": header["steps"], "height": header["height"],
                "width": header["width"], "categories": it.categories, "extra": it.extra,
            })
        status = {"planned": len(items), "written": len(records), "complete": len(records) == len(items)}
        atomic_write_text(out / "manifest.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
        buf = io.StringIO()
        extra_cols = sorted({k for r in records for k in r["extra"]})
        w = csv.writer(buf)
        w.writerow(list(MANIFEST_FIELDS) + extra_cols)
        for r in records:
            w.writerow([";".join(r[k]) if k == "categories" else r[k] for k in MANIFEST_FIELDS]
                       + [r["extra"].get(k, "") for k in extra_cols])
        atomic_write_text(out / "manifest.csv", buf.getvalue())
        atomic_write_json(out / "generation.json", dict(header, status=status))
    if not status["complete"]:
        logger.warning("%s: %d of %d planned images written so far (other shards may still be running)",
                       out, status["written"], status["planned"])
    return status


def read_manifest(folder: str | os.PathLike) -> tuple[Path, dict[str, Any] | None, list[dict[str, Any]]]:
    """Find the generation folder for ``folder`` (the folder itself or its parent when given ``images/``).

    Returns:
        `(root, generation_json_or_None, records)`; without a manifest the records list every image file
        in the folder (``{"file": ...}`` only).

    Raises:
        FileNotFoundError: the folder does not exist or holds no images.
    """
    p = Path(folder)
    if not p.is_dir():
        raise FileNotFoundError(f"images folder not found: {p}")
    root = p
    if not (p / "manifest.jsonl").is_file() and p.name == "images" and (p.parent / "manifest.jsonl").is_file():
        root = p.parent
    if (root / "manifest.jsonl").is_file():
        gen = read_json(root / "generation.json") if (root / "generation.json").is_file() else None
        records = []
        for n, line in enumerate((root / "manifest.jsonl").read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise ValueError(f"{root}/manifest.jsonl line {n} is not JSON ({err})") from err
        return root, gen, records
    if (root / "generation.json").is_file() or (p.name == "images" and (p.parent / "generation.json").is_file()):
        raise FileNotFoundError(
            f"{root} was made by `erasure-eval generate` but has no manifest.jsonl yet (interrupted run?): "
            "re-run the same generate command to finish it and write the manifest"
        )
    img_dir = p / "images" if (p / "images").is_dir() else p
    exts = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}
    files = sorted(f for f in img_dir.iterdir() if f.suffix.lower() in exts and not f.name.startswith("."))
    if not files:
        raise FileNotFoundError(f"no images (png/jpg/webp/bmp) and no manifest.jsonl in {p}")
    return root, None, [{"file": str(f.relative_to(root))} for f in files]

