"""LoRA extraction: an erased model's weight change as low-rank factors, in the formats people load.

Each changed weight of a ``Linear`` or ``Conv2d`` layer of the denoiser, ``delta = erased - original`` (a conv
weight reshaped to ``(out, in * kh * kw)``), is replaced by its truncated SVD ``U_r S_r V_r^T`` at a fixed rank or
at the smallest rank that keeps an energy fraction of ``sum(S^2)`` (Eckart-Young: the best rank-r approximation
in Frobenius norm). ``up = U_r S_r`` and ``down = V_r^T``, so the LoRA scale is 1 (``alpha = rank``).

Formats:
- ``peft``: diffusers/peft keys ``unet.<module>.lora_A.weight`` / ``lora_B.weight`` (with ``bias=True`` also
  ``lora_B.bias``, peft's ``lora_bias``: exact, but not fusable into bias-free layers), loaded by
  ``pipe.load_lora_weights(file)``;
- ``kohya``: ``lora_unet_<module with _>.lora_down.weight`` / ``lora_up.weight`` / ``alpha``, the layout
  A1111, ComfyUI (and diffusers) load. Kohya files carry no bias deltas.

Changes a LoRA cannot carry (norm layers; biases in the kohya format) are counted in the result
(:attr:`LoraExtraction.leftover`) and logged, so a user knows what the file leaves out.
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from erasure.io import atomic_save_safetensors

logger = logging.getLogger(__name__)

__all__ = ["LoraFactor", "LoraExtraction", "low_rank", "extract_lora", "to_peft", "to_kohya", "save_lora",
           "lora_from_run", "LORA_FORMATS"]

LORA_FORMATS = ("peft", "kohya")


@dataclass
class LoraFactor:
    """One layer's factors: ``delta ~= up @ down`` (``up``: out x r, ``down``: r x in*kh*kw)."""

    up: torch.Tensor
    down: torch.Tensor
    shape: tuple[int, ...]  # the weight's shape (2-D linear, 4-D conv)
    bias: torch.Tensor | None = None  # the bias delta, when the bias changed
    energy: float = 1.0  # fraction of the delta's squared Frobenius norm kept

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    def delta(self) -> torch.Tensor:
        return (self.up @ self.down).reshape(self.shape)


@dataclass
class LoraExtraction:
    factors: dict[str, LoraFactor] = field(default_factory=dict)  # by module name
    leftover: dict[str, float] = field(default_factory=dict)  # parameter -> ||delta|| a LoRA cannot carry
    clamped: dict[str, int] = field(default_factory=dict)  # module -> rank it was clamped to

    def stats(self) -> dict:
        ranks = [f.rank for f in self.factors.values()]
        return {"modules": len(ranks), "max_rank": max(ranks, default=0), "mean_rank": sum(ranks) / max(1, len(ranks)),
                "params": sum(f.up.numel() + f.down.numel() for f in self.factors.values()),
                "leftover_params": sorted(self.leftover), "clamped": len(self.clamped)}


def low_rank(delta: torch.Tensor, rank: int | None = None, energy: float | None = None) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Truncated SVD of a 2-D ``delta``: returns ``(up, down, kept_energy)`` with ``up @ down ~= delta``.

    ``rank`` caps the rank (``None``: no cap); ``energy`` in (0, 1] picks the smallest rank whose singular values keep
    that fraction of ``sum(S^2)``. With neither, the full rank is kept.
    """
    d = delta.detach().to(torch.float64 if delta.numel() <= 1 << 20 else torch.float32)
    u, s, vh = torch.linalg.svd(d, full_matrices=False)
    s2 = s.double().pow(2)
    total = float(s2.sum())
    r = s.numel()
    if energy is not None and total > 0:
        cum = torch.cumsum(s2, 0) / total
        r = min(r, int(torch.searchsorted(cum, torch.tensor(energy, dtype=cum.dtype) - 1e-12)) + 1)
    if rank is not None:
        r = min(r, rank)
    r = max(1, r)
    kept = float(s2[:r].sum()) / total if total > 0 else 1.0
    return (u[:, :r] * s[:r]).to(delta.dtype).contiguous(), vh[:r].to(delta.dtype).contiguous(), kept


def _targets(module: torch.nn.Module) -> dict[str, torch.nn.Module]:
    return {n: m for n, m in module.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))}


def extract_lora(
    module: torch.nn.Module, original: Mapping[str, torch.Tensor], erased: Mapping[str, torch.Tensor],
    rank: int | None = None, energy: float | None = None, bias: bool = False,
) -> LoraExtraction:
    """Factor the change ``erased - original`` of ``module``'s parameters (named as in its ``state_dict``).

    Args:
        module (`nn.Module`): the denoiser (its layer types decide what a LoRA can carry); not modified.
        original (`Mapping[str, Tensor]`): the original values of (at least) the changed parameters.
        erased (`Mapping[str, Tensor]`): the erased values; parameters missing here are unchanged.
        rank (`int`, *optional*): the LoRA rank; larger than a layer's smallest dimension is clamped (with a warning).
        energy (`float`, *optional*): keep this fraction of each delta's squared norm (rank then is an upper bound).
        bias (`bool`, defaults to `False`): carry bias changes too (peft ``lora_bias``: exact, but diffusers then cannot
            ``fuse_lora`` into layers without a bias, such as attention projections); otherwise they are leftover.
    """
    if rank is not None and rank < 1:
        raise ValueError(f"LoRA rank must be at least 1, got {rank}")
    if energy is not None and not 0.0 < energy <= 1.0:
        raise ValueError(f"LoRA energy must be in (0, 1], got {energy}")
    targets = _targets(module)
    out = LoraExtraction()
    changed = {n: erased[n].float() - original[n].float() for n in erased
               if not torch.equal(erased[n], original[n])}
    for name, delta in changed.items():
        mod, _, kind = name.rpartition(".")
        layer = targets.get(mod)
        if layer is None or kind not in ("weight", "bias") or (kind == "bias" and not bias):
            out.leftover[name] = float(delta.norm())
            continue
        if kind == "bias":
            continue  # attached to the layer's factor below
        w = delta.reshape(delta.shape[0], -1)
        full = min(w.shape)
        if rank is not None and rank > full:
            out.clamped[mod] = full
        up, down, kept = low_rank(w, rank, energy)
        out.factors[mod] = LoraFactor(up, down, tuple(delta.shape), energy=kept)
    for name, delta in changed.items():
        mod, _, kind = name.rpartition(".")
        if bias and kind == "bias" and mod in targets:
            f = out.factors.get(mod)
            if f is None:  # only the bias changed: a rank-1 pair of zeros carries it
                w = targets[mod].weight
                f = out.factors[mod] = LoraFactor(torch.zeros(w.shape[0], 1), torch.zeros(1, w[0].numel()),
                                                  tuple(w.shape))
            f.bias = delta
    if out.clamped:
        dims = sorted(set(out.clamped.values()))
        example = next(iter(out.clamped.items()))
        warnings.warn(f"LoRA rank {rank} is larger than the smallest dimension of {len(out.clamped)} layer(s); clamped "
                      f"to their smallest dimension ({', '.join(map(str, dims[:8]))}{'...' if len(dims) > 8 else ''}; "
                      f"e.g. {example[0]}: {example[1]})", UserWarning, stacklevel=2)
    if out.leftover:
        n_bias = sum(n.endswith(".bias") and n.rpartition(".")[0] in targets for n in out.leftover)
        logger.warning("the LoRA leaves out %d changed tensor(s) (%d of Linear/Conv2d biases%s, %d others such as "
                       "norm layers; e.g. %s); the full weights (--out) carry them", len(out.leftover), n_bias,
                       ": --lora-bias carries those" if n_bias else "", len(out.leftover) - n_bias,
                       next(iter(out.leftover)))
    return out


def _ab(f: LoraFactor) -> tuple[torch.Tensor, torch.Tensor]:
    if len(f.shape) == 4:  # conv: down is a (r, in, kh, kw) conv, up a 1x1 conv
        return f.down.reshape(f.rank, *f.shape[1:]), f.up.reshape(f.shape[0], f.rank, 1, 1)
    return f.down, f.up


def to_peft(ext: LoraExtraction, prefix: str = "unet") -> dict[str, torch.Tensor]:
    """diffusers/peft keys (``{prefix}.<module>.lora_A.weight``, ``lora_B.weight``, ``lora_B.bias``); scale 1."""
    sd: dict[str, torch.Tensor] = {}
    for mod, f in ext.factors.items():
        a, b = _ab(f)
        sd[f"{prefix}.{mod}.lora_A.weight"] = a
        sd[f"{prefix}.{mod}.lora_B.weight"] = b
        if f.bias is not None:
            sd[f"{prefix}.{mod}.lora_B.bias"] = f.bias
    if any(k.endswith("lora_B.bias") for k in sd):  # peft's lora_bias applies to every layer: zeros where unchanged
        for mod, f in ext.factors.items():
            key = f"{prefix}.{mod}.lora_B.bias"
            if key not in sd:
                sd[key] = torch.zeros(f.shape[0], dtype=f.up.dtype)
    return sd


def to_kohya(ext: LoraExtraction, prefix: str = "lora_unet") -> dict[str, torch.Tensor]:
    """kohya keys (``lora_unet_<module>.lora_down.weight``, ``lora_up.weight``, ``alpha``); alpha = rank, scale 1."""
    sd: dict[str, torch.Tensor] = {}
    for mod, f in ext.factors.items():
        a, b = _ab(f)
        key = f"{prefix}_{mod.replace('.', '_')}"
        sd[f"{key}.lora_down.weight"] = a
        sd[f"{key}.lora_up.weight"] = b
        sd[f"{key}.alpha"] = torch.tensor(float(f.rank))
    return sd


def save_lora(ext: LoraExtraction, path: str | os.PathLike, fmt: Literal["peft", "kohya"] = "peft",
              dtype: torch.dtype | None = None, metadata: Mapping[str, str] | None = None,
              prefix: str = "unet") -> Path:
    """Write ``ext`` as one ``.safetensors`` file (atomic) in ``fmt``; ``dtype`` e.g. ``torch.float16`` halves it."""
    if fmt == "kohya" and any(f.bias is not None for f in ext.factors.values()):
        raise ValueError("kohya LoRA files carry no bias changes; extract without bias or use the peft format")
    if fmt not in LORA_FORMATS:
        raise ValueError(f"LoRA format must be one of {', '.join(LORA_FORMATS)}, got {fmt!r}")
    p = Path(path)
    if p.suffix != ".safetensors":
        raise ValueError(f"LoRA files are written as .safetensors, got {p.name}")
    sd = to_peft(ext, prefix) if fmt == "peft" else to_kohya(ext)
    if not sd:
        raise ValueError("the run changed no layer a LoRA can carry (no Linear or Conv2d weight differs)")
    if dtype is not None:
        sd = {k: v.to(dtype) for k, v in sd.items()}
    st = ext.stats()
    meta = {"format": "pt", "lora_format": fmt, "exported_by": "salun-erasure", "max_rank": str(st["max_rank"]),
            "modules": str(st["modules"]), "leftover_params": json.dumps(st["leftover_params"])}
    meta.update({str(k): str(v) for k, v in (metadata or {}).items()})
    if fmt == "kohya":
        meta.update({"ss_network_module": "networks.lora", "ss_network_dim": str(st["max_rank"]),
                     "ss_network_alpha": str(st["max_rank"])})
    atomic_save_safetensors(sd, p, metadata=meta)
    return p


def lora_from_run(run_dir: str | os.PathLike, rank: int | None = None, energy: float | None = None,
                  base_model: str | None = None, pipe=None, bias: bool = False) -> LoraExtraction:
    """Extract the LoRA of a run: its saved weights against the base model's (loaded here unless ``pipe`` is given)."""
    from erasure.runs import TE_PREFIX, load_run_weights, read_run

    info = read_run(run_dir)
    weights = load_run_weights(run_dir)
    if any(n.startswith(TE_PREFIX) for n in weights):
        raise ValueError(f"run {run_dir} changed the text encoder (method {info.get('method')}); a LoRA here carries "
                         "denoiser changes only: export the whole pipeline with `erasure export` instead")
    if pipe is None:
        from erasure.diffusion.pipeline import load_pipeline

        pipe = load_pipeline(base_model or info.get("base_model"), device="cpu")
    denoiser = _denoiser(pipe)
    state = denoiser.state_dict()
    missing = [n for n in weights if n not in state]
    if missing:
        raise ValueError(f"run {run_dir} does not match its base model (no parameter {missing[0]!r})")
    return extract_lora(denoiser, {n: state[n] for n in weights}, weights, rank=rank, energy=energy, bias=bias)


def lora_file_size(ext: LoraExtraction, bytes_per_value: int = 4) -> int:
    """Bytes of the factors (without the safetensors header)."""
    return bytes_per_value * sum(f.up.numel() + f.down.numel() + (0 if f.bias is None else f.bias.numel())
                                 for f in ext.factors.values())


def _denoiser(pipe) -> torch.nn.Module:
    return pipe.unet if getattr(pipe, "unet", None) is not None else pipe.transformer


def check_lora_args(path: str | None, rank: int | None, energy: float | None, fmt: str, bias: bool,
                    overwrite: bool) -> None:
    """Refuse bad LoRA export settings before any work (one-line errors that name the fix)."""
    if path is None:
        if rank is not None or energy is not None or bias:
            raise ValueError("--lora-rank/--lora-energy/--lora-bias need --lora FILE")
        return
    from erasure.io import check_output_path

    p = check_output_path(path, "--lora", "file")
    if p.suffix != ".safetensors":
        raise ValueError(f"--lora must end in .safetensors, got {p}")
    if p.exists() and not overwrite:
        raise FileExistsError(f"{p} exists; pass --overwrite or choose another --lora")
    if not p.parent.is_dir():
        raise FileNotFoundError(f"the folder of --lora does not exist: {p.parent}")
    if rank is None and energy is None:
        raise ValueError("--lora needs --lora-rank R (e.g. 8) or --lora-energy E (e.g. 0.9)")
    if rank is not None and rank < 1:
        raise ValueError(f"--lora-rank must be at least 1, got {rank}")
    if energy is not None and not 0.0 < energy <= 1.0:
        raise ValueError(f"--lora-energy must be in (0, 1], got {energy}")
    if fmt not in LORA_FORMATS:
        raise ValueError(f"--lora-format must be one of {', '.join(LORA_FORMATS)}, got {fmt!r}")
    if bias and fmt == "kohya":
        raise ValueError("--lora-bias needs --lora-format peft (kohya files carry no bias changes)")


def export_lora(run_dir: str | os.PathLike, path: str | os.PathLike, rank: int | None, energy: float | None,
                fmt: str = "peft", bias: bool = False, overwrite: bool = False) -> LoraExtraction:
    """Extract a run's LoRA against its base model and write it to ``path`` (checked first, written atomically)."""
    check_lora_args(str(path), rank, energy, fmt, bias, overwrite)
    from erasure.diffusion.pipeline import load_pipeline
    from erasure.runs import read_run

    pipe = load_pipeline(read_run(run_dir).get("base_model"), device="cpu")
    prefix = "unet" if getattr(pipe, "unet", None) is not None else "transformer"
    with warnings.catch_warnings(record=True) as caught:  # one log line each, not a warnings traceback line
        warnings.simplefilter("always")
        ext = lora_from_run(run_dir, rank=rank, energy=energy, pipe=pipe, bias=bias)
    for w in caught:
        logger.warning("%s", w.message)
    del pipe
    save_lora(ext, path, fmt, prefix=prefix, metadata={"run": str(Path(run_dir).resolve()), "rank": str(rank),
                                                       "energy": str(energy)})
    return ext


def add_lora_arguments(parser) -> None:
    """The ``--lora*`` flags of ``erasure export``."""
    g = parser.add_argument_group("LoRA", "the run's weight change as a low-rank adapter (SVD of each changed layer)")
    g.add_argument("--lora", default=None, metavar="FILE",
                   help="Write the erasure as a LoRA .safetensors file (alone when --out is omitted).")
    g.add_argument("--lora-rank", type=int, default=None, metavar="R",
                   help="LoRA rank (a layer whose smallest dimension is smaller is clamped to it, with a warning).")
    g.add_argument("--lora-energy", type=float, default=None, metavar="E",
                   help="Per layer, the smallest rank keeping this fraction of the change's squared norm, in (0, 1] "
                        "(with --lora-rank, R caps it).")
    g.add_argument("--lora-format", choices=LORA_FORMATS, default="peft",
                   help="peft: diffusers `pipe.load_lora_weights`; kohya: lora_down/lora_up/alpha keys for A1111 and "
                        "ComfyUI (diffusers loads it too).")
    g.add_argument("--lora-bias", action="store_true",
                   help="Also carry bias changes (peft lora_bias; exact, but diffusers cannot fuse_lora it into "
                        "bias-free layers). Norm-layer changes are never in a LoRA.")
