"""Metric registry and resumable, cached scoring of a generated image folder.

A metric is a class registered with :func:`register_metric`. It turns images into *per-image records*
(``score_images``) and records into a *summary* (``summarize``). Records are cached in
``DIR/scores/<metric>.json`` keyed by image file and content hash, together with ``record_config()`` (what
determines a record: detector/judge weights, model architecture). Re-scoring recomputes only images that are
new or changed, or everything when the record config changed; summaries are always recomputed from the
cached records, so new thresholds cost nothing. The cache is rewritten atomically every few seconds while
scoring, so a killed run resumes where it stopped.

Every result carries what makes it reproducible: model and run id, package versions, prompt-file hash, seeds,
guidance, steps, resolution, and how many of the planned images it covers (``coverage.complete``).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, ClassVar, Protocol, runtime_checkable

from erasure.io import CorruptFileError, atomic_write_json, environment_info, file_sha256, read_json
from erasure.registry import NAME_RULE, Registry

logger = logging.getLogger(__name__)

__all__ = [
    "METRICS",
    "Metric",
    "MetricError",
    "ImageMismatchError",
    "UnreadableImageError",
    "register_metric",
    "get_metric",
    "score_folder",
    "load_rgb",
]

SCORE_FORMAT = "erasure-eval-score-v1"


class MetricError(ValueError):
    """A metric cannot run: missing weights, missing manifest columns, bad parameters."""


class ImageMismatchError(MetricError):
    """The images folder does not match its manifest (missing files, or files made for other records)."""


class UnreadableImageError(MetricError):
    """An image file cannot be decoded."""


@runtime_checkable
class Metric(Protocol):
    """What a registered metric provides. ``items`` are manifest records plus ``path`` (absolute file path)."""

    name: ClassVar[str]
    needs_manifest: ClassVar[bool]

    def record_config(self) -> dict[str, Any]: ...

    def score_images(self, items: Sequence[dict[str, Any]]) -> list[dict[str, Any]]: ...

    def summarize(self, items: Sequence[dict[str, Any]], records: Sequence[dict[str, Any]]) -> dict[str, Any]: ...


METRICS: Registry[type] = Registry("metric", error=MetricError)


def register_metric(name: str) -> Callable[[type], type]:
    """Class decorator: register a metric under ``name`` (see :class:`erasure.registry.Registry`)."""
    if not isinstance(name, str) or not NAME_RULE.match(name):
        raise ValueError(f"metric names are lowercase letters and digits joined by '_' or '-', got {name!r}")

    def deco(cls: type) -> type:
        METRICS.register(name, cls)
        cls.name = name
        return cls

    return deco


def get_metric(name: str, **params: Any) -> Metric:
    """Instantiate a registered metric; unknown names list the registered ones."""
    import erasure_eval.metrics  # noqa: F401 - fills the registry

    return METRICS.lookup(name)(**params)


def load_rgb(path: str | os.PathLike):
    """Open an image as RGB, raising :class:`UnreadableImageError` with the file name when it cannot be decoded."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.load()
            return im.convert("RGB")
    except (OSError, ValueError, SyntaxError) as err:
        raise UnreadableImageError(f"cannot read image {path}: {err}") from err


def _check_manifest_images(root: Path, gen: dict[str, Any] | None, records: list[dict[str, Any]]) -> None:
    from erasure_eval.generate import _png_record  # noqa: PLC2701 - same package

    missing = [r["file"] for r in records if not (root / r["file"]).is_file()]
    if missing:
        raise ImageMismatchError(
            f"{len(missing)} image(s) listed in {root}/manifest.jsonl are missing (first: {missing[0]}); "
            "re-run `erasure-eval generate` with the same settings to restore them"
        )
    if gen is None:
        return
    bad = []
    for r in records:
        if not r["file"].endswith(".png"):
            continue
        rec = _png_record(root / r["file"])
        want = {"case_number": r.get("case_number"), "sample": r.get("sample"), "seed": r.get("seed"),
                "guidance": r.get("guidance")}
        if rec is None:
            try:
                load_rgb(root / r["file"])
            except UnreadableImageError:
                raise
            bad.append(r["file"])
        elif rec.get("key") != want or rec.get("settings_id") != gen.get("settings_id"):
            bad.append(r["file"])
    if bad:
        raise ImageMismatchError(
            f"{len(bad)} image(s) in {root}/images do not match their manifest records (first: {bad[0]}): "
            "they were made with other settings or replaced; re-generate into a fresh folder"
        )


def _reproducibility(gen: dict[str, Any] | None, records: list[dict[str, Any]]) -> dict[str, Any]:
    env = environment_info()
    if gen is None:
        return {"model": None, "run_id": None, "environment": env, "generation": None}
    seeds = [r.get("seed") for r in records]
    guid = sorted({r.get("guidance") for r in records if r.get("guidance") is not None})
    return {
        "model": gen.get("model"),
        "run_id": gen.get("run_id"),
        "method": gen.get("method"),
        "concepts": gen.get("concepts"),
        "prompts": gen.get("prompts"),
        "filters": gen.get("filters"),
        "steps": gen.get("steps"),
        "height": gen.get("height"),
        "width": gen.get("width"),
        "samples": gen.get("samples"),
        "guidance_values": guid,
        "seeds": seeds,
        "generation_environment": gen.get("environment"),
        "environment": env,
    }


def score_folder(
    images: str | os.PathLike,
    metric: Metric,
    out: str | os.PathLike | None = None,
    overwrite: bool = False,
    batch_size: int = 32,
    progress: Callable[[int, int], None] | None = None,
    save_every_s: float = 10.0,
) -> dict[str, Any]:
    """Score a generation folder (or a bare folder of images) with ``metric``, reusing cached records.

    Args:
        images (`str`): a folder written by ``erasure-eval generate`` (or its ``images/``), or any image folder.
        metric (`Metric`): an instance from :func:`get_metric`.
        out (`str`, *optional*): also write the result JSON here.
        overwrite (`bool`, defaults to `False`): ignore cached records.
        batch_size (`int`, defaults to 32): images per ``score_images`` call (and cache save granularity).
        progress (`Callable[[int, int], None]`, *optional*): called with (done, total).

    Returns:
        `dict`: ``{"format", "metric", "params", "summary", "coverage", "reproducibility", "records"}``.
    """
    from erasure_eval.generate import read_manifest

    root, gen, records = read_manifest(images)
    if not records:
        raise ImageMismatchError(f"{root}/manifest.jsonl lists no images; run `erasure-eval generate` first")
    if metric.needs_manifest and not (root / "manifest.jsonl").is_file():
        raise MetricError(
            f"metric {metric.name!r} needs the prompts of each image: score a folder written by "
            f"`erasure-eval generate` (with manifest.jsonl), not a bare image folder ({root})"
        )
    _check_manifest_images(root, gen, records)
    items = [dict(r, path=str(root / r["file"])) for r in records]
    key = getattr(metric, "cache_key", None) or metric.name
    cache_path = root / "scores" / f"{key}.json"
    rconf = metric.record_config()
    cached: dict[str, Any] = {}
    if cache_path.is_file() and not overwrite:
        try:
            prev = read_json(cache_path)
            if prev.get("format") == SCORE_FORMAT and prev.get("record_config") == rconf:
                cached = prev.get("records", {})
            else:
                logger.info("%s: record config changed; re-scoring every image", cache_path)
        except CorruptFileError:
            logger.warning("%s is corrupt; re-scoring every image", cache_path)
    hashes = {it["file"]: file_sha256(it["path"]) for it in items}
    for it in items:
        it["sha256"] = hashes[it["file"]]
    (root / "scores").mkdir(parents=True, exist_ok=True)
    if hasattr(metric, "bind"):
        metric.bind(root / "scores")
    if hasattr(metric, "set_generation"):
        metric.set_generation(gen)
    todo = [it for it in items if cached.get(it["file"], {}).get("sha256") != hashes[it["file"]]]
    logger.info("%s on %s: %d images, %d cached, %d to score", metric.name, root, len(items),
                len(items) - len(todo), len(todo))
    new: dict[str, Any] = {k: v for k, v in cached.items() if k in hashes and v.get("sha256") == hashes[k]}

    def save(summary: dict[str, Any] | None = None) -> None:
        atomic_write_json(cache_path, {"format": SCORE_FORMAT, "metric": metric.name, "record_config": rconf,
                                       "records": new, "summary": summary})

    last = time.monotonic()
    done = len(items) - len(todo)
    if progress is not None:
        progress(done, len(items))
    for b in range(0, len(todo), batch_size):
        batch = todo[b: b + batch_size]
        recs = metric.score_images(batch)
        if len(recs) != len(batch):
            raise RuntimeError(f"metric {metric.name} returned {len(recs)} records for {len(batch)} images")
        for it, rec in zip(batch, recs):
            new[it["file"]] = {"sha256": hashes[it["file"]], "record": rec}
        done += len(batch)
        if progress is not None:
            progress(done, len(items))
        if time.monotonic() - last > save_every_s:
            save()
            last = time.monotonic()
    per_image = [new[it["file"]]["record"] for it in items]
    summary = metric.summarize(items, per_image)
    planned = (gen or {}).get("status", {}).get("planned", len(items))
    coverage = {"images": len(items), "planned": planned, "complete": bool(gen) and len(items) >= planned}
    if gen is not None and not gen.get("status", {}).get("complete", False):
        coverage["complete"] = False
    if gen is None:
        coverage["note"] = "no generation.json (not written by `erasure-eval generate`): completeness is unknown"
    save(summary)
    result = {
        "format": SCORE_FORMAT,
        "metric": metric.name,
        "folder": str(root.resolve()),
        "params": getattr(metric, "params", lambda: {})(),
        "record_config": rconf,
        "summary": summary,
        "coverage": coverage,
        "reproducibility": _reproducibility(gen, records),
        "records": [{"file": it["file"], **rec} for it, rec in zip(items, per_image)],
    }
    if gen is None:
        logger.info("%s: %d images scored; no generation.json, so completeness is unknown", metric.name, len(items))
    elif not coverage["complete"]:
        logger.warning("%s covers %d of %d planned images: the result is PARTIAL (if every shard has finished, re-run "
                       "the generate command once to refresh the manifest)", metric.name, len(items), planned)
    result["cache_key"] = key
    atomic_write_json(root / "scores" / f"{key}.summary.json", {k: v for k, v in result.items() if k != "records"})
    if out is not None:
        atomic_write_json(out, result)
    return result
