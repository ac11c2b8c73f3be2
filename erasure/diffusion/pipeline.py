"""Load Stable Diffusion pipelines (local folder or hub id), encode prompts, and generate seeded images.

Every image is generated from its own seed (the initial latent is drawn from ``torch.Generator(seed)``), so the
batch changes no random draw; it does change numerics: a few uint8 pixel values differ between batch sizes 1, 3
and 8 (measured on the tiny and the embedded model). Callers that resume (the Df/Dr cache, ``erasure-eval
generate``) therefore generate fixed batches of their full list.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# model_index.json ``_class_name`` values of the supported families (see erasure.backbones)
SUPPORTED_PIPELINES = ("StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline", "StableDiffusionXLPipeline",
                       "StableDiffusion3Pipeline", "FluxPipeline")
MAX_GUIDANCE = 1000.0
"""Largest accepted CFG scale (the I2P prompt set asks for up to 255; 1e300 overflows to an all-black image)."""
MAX_SEED = 2**63 - 1
"""Largest accepted seed flag/CSV value (torch generators take 64-bit seeds; seed + sample index must fit)."""

__all__ = [
    "MAX_GUIDANCE",
    "MAX_SEED",
    "ModelLoadError",
    "check_components",
    "check_guidance",
    "check_seed",
    "resolve_device",
    "resolve_model",
    "check_pipeline_class",
    "load_pipeline",
    "validate_prompts",
    "encode_prompts",
    "encode_conditions",
    "initial_latents",
    "generate",
    "model_fingerprint",
]


class ModelLoadError(ValueError):
    """The model path or id cannot be loaded as a diffusers Stable Diffusion pipeline."""


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """``"auto"`` -> cuda when available, else cpu. Raises on ``cuda`` without a GPU."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was requested but no CUDA GPU is available; use --device cpu")
    return dev


def resolve_model(model: str | os.PathLike | None) -> str:
    """``None``/``"default"`` -> the embedded shapes model; local paths are checked; hub ids are returned as is."""
    if model is None or str(model) in ("", "default"):
        from erasure.shapes import default_model_path

        path = Path(default_model_path())
        if not (path / "model_index.json").is_file():
            raise ModelLoadError(f"the embedded default model is missing at {path}; reinstall the package or pass --model")
        return str(path)
    s = str(model)
    p = Path(s).expanduser()
    if p.exists():
        if not p.is_dir():
            raise ModelLoadError(f"{s} is a file, not a diffusers pipeline folder; pass the pipeline folder or a hub id")
        if not (p / "model_index.json").is_file():
            raise ModelLoadError(
                f"{s} is not a diffusers pipeline folder (no model_index.json); pass the folder that holds "
                "unet/ (or transformer/), vae/, text_encoder/, tokenizer/ and scheduler/"
            )
        check_pipeline_class(p)
        check_components(p)
        return str(p.resolve())
    if not _HUB_ID.match(s):
        raise ModelLoadError(f"model folder not found: {s}; check the path (hub ids look like owner/name)")
    return s


def check_pipeline_class(folder: str | os.PathLike) -> None:
    """Raise :class:`ModelLoadError` when ``folder/model_index.json`` names a pipeline no backbone supports.

    Read before diffusers loads anything, so an unsupported folder gets one line naming what is supported
    instead of an error from deep inside ``from_pretrained``. A missing ``_class_name`` is left to diffusers.
    """
    index_file = Path(folder) / "model_index.json"
    try:
        index = json.loads(index_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ModelLoadError(f"{index_file} is not readable JSON ({err}); is {folder} a diffusers pipeline folder?") from err
    if not isinstance(index, dict):
        raise ModelLoadError(f"{index_file} is not a diffusers model index (expected a JSON object)")
    name = index.get("_class_name")
    if name is not None and name not in SUPPORTED_PIPELINES:
        raise ModelLoadError(
            f"{folder} is a {name} folder; supported: StableDiffusionPipeline (SD v1/v2), StableDiffusionXLPipeline, "
            "StableDiffusion3Pipeline, FluxPipeline"
        )


def check_guidance(guidance: float, what: str = "--guidance") -> float:
    """Raise ``ValueError`` unless ``guidance`` is a finite number in ``[0, MAX_GUIDANCE]``."""
    g = float(guidance)
    if not 0.0 <= g <= MAX_GUIDANCE:  # also False for NaN
        raise ValueError(f"{what} must be between 0 and {MAX_GUIDANCE:g}, got {guidance!r}")
    return g


def check_seed(seed: int, what: str = "--seed") -> int:
    """Raise ``ValueError`` unless ``seed`` is an integer in ``[0, MAX_SEED]`` (``2**63 - 1``)."""
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
        raise ValueError(f"{what} must be an integer from 0 to 2**63-1 ({MAX_SEED}), got {seed!r}")
    return seed


def check_components(folder: str | os.PathLike) -> None:
    """Raise :class:`ModelLoadError` naming the first component folder (``unet/``, ``vae/``, ...) that
    ``model_index.json`` lists but ``folder`` lacks, or that has no ``config.json`` (tokenizers and schedulers
    are only checked to exist). diffusers itself reports "no file named config.json found in directory <root>"."""
    index = json.loads((Path(folder) / "model_index.json").read_text(encoding="utf-8"))
    for name, value in index.items():
        if name.startswith("_") or not isinstance(value, list) or len(value) != 2 or value[0] is None:
            continue
        sub = Path(folder) / name
        if not sub.is_dir():
            raise ModelLoadError(f"{folder} has no {name}/ folder, which its model_index.json lists ({value[1]}); "
                                 "copy the complete pipeline folder")
        if name in ("unet", "transformer", "vae", "text_encoder") and not (sub / "config.json").is_file():
            raise ModelLoadError(f"{sub} has no config.json; copy the complete {name}/ folder of the pipeline")


def model_fingerprint(model: str) -> str:
    """A string identifying the model's weights: hub id, or folder + weight file sizes/mtimes."""
    p = Path(model)
    if not p.is_dir():
        return f"hub:{model}"
    parts = [str(p.resolve())]
    for f in sorted(p.rglob("*")):
        if f.is_file() and f.suffix in (".safetensors", ".bin", ".json"):
            st = f.stat()
            parts.append(f"{f.relative_to(p)}:{st.st_size}:{st.st_mtime_ns}")
    return "|".join(parts)


def load_pipeline(
    model: str | os.PathLike | None = None,
    device: str | torch.device = "auto",
    dtype: torch.dtype | None = None,
    scheduler: str = "ddim",
    drop_t5: bool = False,
):
    """Load a diffusers pipeline of a supported family (SD v1/v2, SDXL, SD3, FLUX; see :mod:`erasure.backbones`).

    Args:
        model (`str`, *optional*): local folder or hub id; ``None`` loads the embedded shapes model.
        device (`str`, defaults to `"auto"`): ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.
        dtype (`torch.dtype`, *optional*): defaults to float32 (float16 for inference on CUDA is the caller's choice).
        scheduler (`str`, defaults to `"ddim"`): ``ddim`` (the family's erasure sampler: DDIM for UNet families,
            the folder's flow-matching Euler scheduler for SD3/FLUX) or ``keep`` (the folder's own scheduler).
        drop_t5 (`bool`, defaults to False): SD3 only: load without the T5 text encoder.
    """
    from erasure.backbones import detect_family, get_backbone

    path = resolve_model(model)
    dev = resolve_device(device)
    offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
    try:
        backbone = get_backbone(detect_family(path))
    except ValueError as err:
        raise ModelLoadError(f"cannot load {path}: {err}") from err
    if scheduler not in ("ddim", "keep"):
        raise ValueError(f"scheduler must be 'ddim' or 'keep', got {scheduler!r}")
    if drop_t5 and backbone.name != "sd3":
        raise ValueError(f"--drop-t5 applies to SD3 models only; {path} is a {backbone.label} pipeline")
    kwargs = backbone.load_kwargs(path, drop_t5=True) if drop_t5 else backbone.load_kwargs(path)
    try:
        pipe = backbone.pipeline_cls().from_pretrained(path, dtype=dtype or torch.float32, **kwargs)
    except Exception as err:  # diffusers raises many types (OSError, ValueError, EnvironmentError, HF errors)
        if not Path(path).exists():
            hint = "the hub is not reachable offline (HF_HUB_OFFLINE=1)" if offline else "it could not be downloaded"
            raise ModelLoadError(
                f"cannot load hub model {path!r}: {hint}; download it elsewhere and pass the local folder"
            ) from err
        raise ModelLoadError(f"cannot load {path} as a {backbone.label} pipeline: {err}") from err
    backbone.set_scheduler(pipe, scheduler)
    pipe.set_progress_bar_config(disable=True)
    pipe._name_or_path = path  # noqa: SLF001 - recorded in run.json
    return pipe.to(dev)


def validate_prompts(prompts: Sequence[str], tokenizer, what: str = "prompt") -> list[str]:
    """Reject empty prompts; warn (with the number of tokens cut) when a prompt exceeds the 77-token limit."""
    if isinstance(prompts, str):
        prompts = [prompts]
    out = []
    limit = tokenizer.model_max_length
    for p in prompts:
        if not isinstance(p, str) or not p.strip():
            raise ValueError(f"empty {what}: every {what} must contain text")
        n = len(tokenizer(p, truncation=False).input_ids)
        if n > limit:
            logger.warning(
                "%s is %d tokens, over the %d-token limit: the last %d tokens are cut (%r...)",
                what, n, limit, n - limit, p[:60],
            )
        out.append(p.strip())
    return out


@torch.no_grad()
def encode_prompts(pipe, prompts: Sequence[str]) -> torch.Tensor:
    """The token embeddings the denoiser consumes (``[len(prompts), L, dim]``; SD v1/v2: the CLIP hidden states).

    The full conditioning of any family (pooled embeddings, size ids) is :func:`encode_conditions`."""
    cond = encode_conditions(pipe, prompts)
    return cond if isinstance(cond, torch.Tensor) else cond["prompt_embeds"]


def encode_conditions(pipe, prompts: Sequence[str], resolution: int | None = None):
    """Everything the pipeline's denoiser needs for ``prompts``, one row each: an :class:`erasure.backbones.Cond`
    (SD v1/v2: the plain ``[n, 77, D]`` embedding tensor)."""
    from erasure.backbones import backbone_of

    return backbone_of(pipe).encode(pipe, prompts, resolution)


def initial_latents(pipe, seed: int, height: int, width: int, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The starting noise for one image, drawn on CPU from ``torch.Generator().manual_seed(seed)`` (FLUX: packed)."""
    from erasure.backbones import backbone_of

    return backbone_of(pipe).initial_latents(pipe, seed, height, width, dtype)


def default_resolution(pipe) -> int:
    from erasure.backbones import backbone_of

    return backbone_of(pipe).default_resolution(pipe)


def generate(
    pipe,
    prompts: Sequence[str] | str,
    seeds: Sequence[int] | int,
    steps: int = 25,
    guidance: float | Sequence[float] = 7.5,
    height: int | None = None,
    width: int | None = None,
    batch_size: int = 8,
    negative_prompt: str | None = None,
    progress: Callable[[int, int], None] | None = None,
):
    """Generate one image per (prompt, seed) pair; a single prompt or seed is broadcast.

    Returns:
        `list[PIL.Image.Image]` in input order. Images depend on (prompt, seed, steps, guidance, size) and, at the
        level of a few uint8 values, on the other images of their batch.
    """
    if isinstance(prompts, str):
        prompts = [prompts]
    if isinstance(seeds, int):
        seeds = [seeds]
    prompts, seeds = list(prompts), [int(s) for s in seeds]
    if len(prompts) == 1 and len(seeds) > 1:
        prompts = prompts * len(seeds)
    if len(seeds) == 1 and len(prompts) > 1:
        seeds = seeds * len(prompts)
    if len(prompts) != len(seeds):
        raise ValueError(f"got {len(prompts)} prompts and {len(seeds)} seeds; give one seed per prompt")
    guidances = [float(guidance)] * len(prompts) if isinstance(guidance, (int, float)) else [float(g) for g in guidance]
    for g in guidances:
        check_guidance(g, "guidance")
    for s in seeds:
        if not 0 <= s < 2**64:
            raise ValueError(f"seed must be from 0 to 2**64-1, got {s}")
    if len(guidances) != len(prompts):
        raise ValueError("give one guidance value per prompt, or a single value")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if batch_size < 1:
        raise ValueError(f"batch size must be >= 1, got {batch_size}")
    from erasure.backbones import backbone_of

    backbone = backbone_of(pipe)
    validate_prompts(prompts, pipe.tokenizer)
    size = backbone.default_resolution(pipe)
    height, width = height or size, width or size
    multiple = backbone.size_multiple(pipe)
    if height % multiple or width % multiple:
        raise ValueError(f"height and width must be multiples of {multiple}")
    images = []
    order = list(range(len(prompts)))
    # batch rows that share a guidance value (a pipeline call takes one guidance scale)
    order.sort(key=lambda i: guidances[i])
    out: dict[int, object] = {}
    done = 0
    i = 0
    while i < len(order):
        g = guidances[order[i]]
        batch = [order[i]]
        i += 1
        while i < len(order) and len(batch) < batch_size and guidances[order[i]] == g:
            batch.append(order[i])
            i += 1
        lat = torch.cat([initial_latents(pipe, seeds[j], height, width) for j in batch]).to(pipe.device)
        res = backbone.call(pipe, [prompts[j] for j in batch], lat, height, width, steps, g, negative_prompt)
        for j, im in zip(batch, res):
            out[j] = im
        done += len(batch)
        if progress is not None:
            progress(done, len(prompts))
    images = [out[j] for j in range(len(prompts))]
    return images
