"""Gradient-based weight saliency (SalUn), shared by the diffusion and the classification backends.

SalUn (Fan et al., ICLR 2024, https://arxiv.org/abs/2310.12508) scores every weight by the magnitude of
the forget loss's gradient, accumulated over the forget set, and keeps the top ``ratio`` of all weights
by one global threshold. Only those weights are fine-tuned.

The threshold is found without sorting: two histogram passes over the IEEE-754 bit patterns of the
(non-negative) scores find the exact k-th largest value (int32 ``bincount`` of the high 16 bits, then of the
low 16 bits inside the selected bucket). Memory beyond the scores is a few chunk-sized temporaries plus the boolean mask,
instead of the reference's two full argsorts (~37 GB at SD v1.4 size). Ties at the threshold are broken by (parameter order, flat index), so exactly k weights are kept.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Literal

import numpy as np
import torch

from erasure.io import CorruptFileError, atomic_save_safetensors, load_safetensors

logger = logging.getLogger(__name__)

__all__ = [
    "accumulate_gradients",
    "score_dtype_for",
    "threshold_mask",
    "compute_mask",
    "mask_stats",
    "save_mask",
    "load_mask",
    "pack_bits",
    "unpack_bits",
]

Progress = Callable[[int, int], None]
_CHUNK = 1 << 22
MASK_FORMAT = "salun-mask-packbits-v1"


SCORE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def score_dtype_for(score_dtype: str | torch.dtype, n_params: int) -> torch.dtype:
    """Resolve a score-dtype setting: a dtype, a name in :data:`SCORE_DTYPES`, or ``"auto"`` (float32 up to
    :data:`AUTO_FP32_MAX_PARAMS` scored weights, bfloat16 above, so SD v1.x masks stay exact and SDXL-size ones fit)."""
    if isinstance(score_dtype, torch.dtype):
        return score_dtype
    if score_dtype == "auto":
        return torch.float32 if n_params <= AUTO_FP32_MAX_PARAMS else torch.bfloat16
    try:
        return SCORE_DTYPES[score_dtype]
    except KeyError:
        raise ValueError(f"score dtype must be auto, {', '.join(SCORE_DTYPES)}; got {score_dtype!r}") from None


AUTO_FP32_MAX_PARAMS = 1_500_000_000


def accumulate_gradients(
    params: Mapping[str, torch.nn.Parameter],
    batches: Iterable[Any],
    loss_fn: Callable[[Any], torch.Tensor],
    progress: Progress | None = None,
    mode: Literal["abs_of_sum", "sum_of_abs"] = "abs_of_sum",
    total: int | None = None,
    score_dtype: str | torch.dtype = "float32",
) -> dict[str, torch.Tensor]:
    """Accumulate the forget-loss gradient over ``batches`` and return a saliency score per parameter.

    Each parameter's gradient is added into a score buffer of ``score_dtype`` the moment autograd has
    accumulated it (a post-accumulate-grad hook) and ``p.grad`` is freed at once, so no full gradient set is
    ever held: the extra memory is the score buffers (4 or 2 bytes per weight) plus the activations.
    With float32 the scores are bit-identical to summing ``p.grad`` over the batches; a 16-bit dtype rounds
    each sum once per batch (ties then appear at the threshold and are broken in parameter order).

    Args:
        params (`Mapping[str, Parameter]`): the parameters to score, by name; each must require grad.
        batches (`Iterable`): each item is passed to ``loss_fn``.
        loss_fn (`Callable`): returns a scalar loss for one batch; gradients flow to ``params``.
        progress (`Callable[[int, int], None]`, *optional*): called as ``progress(done, total)``.
        mode (`str`, defaults to `"abs_of_sum"`): ``"abs_of_sum"`` is the reference SalUn score
            ``|sum_b grad_b|``; ``"sum_of_abs"`` is ``sum_b |grad_b|``.
        total (`int`, *optional*): number of batches, for progress when ``batches`` has no ``len``.
        score_dtype (`str` or `torch.dtype`, defaults to `"float32"`): dtype of the score buffers
            (``"auto"``, ``"float32"``, ``"bfloat16"``, ``"float16"``; see :func:`score_dtype_for`).

    Returns:
        `dict[str, Tensor]`: non-negative scores of ``score_dtype`` shaped like the parameters (zeros where no
        gradient flowed).
    """
    if mode not in ("abs_of_sum", "sum_of_abs"):
        raise ValueError(f"mode must be 'abs_of_sum' or 'sum_of_abs', got {mode!r}")
    plist = list(params.items())
    dtype = score_dtype_for(score_dtype, sum(p.numel() for _, p in plist))
    acc: dict[str, torch.Tensor] = {}

    def hook_for(name: str) -> Callable[[torch.Tensor], None]:
        def hook(p: torch.Tensor) -> None:
            g = p.grad.detach()
            p.grad = None
            if mode == "sum_of_abs":
                g = g.abs()
            buf = acc.get(name)
            if buf is None:
                acc[name] = g.to(dtype)  # no copy when the dtypes match: the gradient is ours once p.grad is None
            else:
                buf.add_(g)  # computed in the wider dtype, rounded once into the buffer

        return hook

    for _, p in plist:
        p.grad = None
    handles = [p.register_post_accumulate_grad_hook(hook_for(name)) for name, p in plist]
    if total is None:
        total = len(batches) if hasattr(batches, "__len__") else 0  # type: ignore[arg-type]
    n = 0
    try:
        for batch in batches:
            loss = loss_fn(batch)
            if not torch.isfinite(loss):
                raise FloatingPointError(
                    f"forget loss is {loss.item()} at batch {n}; lower the learning rate or check inputs")
            loss.backward()
            del loss
            n += 1
            if progress is not None:
                progress(n, max(total, n))
    finally:
        for h in handles:
            h.remove()
        for _, p in plist:
            p.grad = None
    if n == 0:
        raise ValueError("no batches to accumulate gradients over (empty forget set)")
    scores: dict[str, torch.Tensor] = {}
    for name, p in plist:
        s = acc.pop(name, None)
        if s is None:
            s = torch.zeros(p.shape, dtype=dtype, device=p.device)
        elif mode == "abs_of_sum":
            s.abs_()
        scores[name] = s
    return scores


def _chunks(t: torch.Tensor) -> Iterable[torch.Tensor]:
    flat = t.reshape(-1)
    for i in range(0, flat.numel(), _CHUNK):
        yield flat[i : i + _CHUNK]


def _select_bucket(hist: torch.Tensor, k: int) -> tuple[int, int]:
    """Largest bucket b with count(>= b) >= k; returns (b, count strictly above b)."""
    cum_from_top = torch.flip(torch.cumsum(torch.flip(hist, [0]), 0), [0])  # cum[b] = count(>= b)
    idx = int(torch.nonzero(cum_from_top >= k).max())
    above = int(cum_from_top[idx + 1]) if idx + 1 < hist.numel() else 0
    return idx, above


def _halves(chunk: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """High and low 16-bit halves of float32 values, as strided numpy views (no copy for CPU float32)."""
    c = chunk.detach()
    if c.device.type != "cpu" or c.dtype != torch.float32:
        c = c.to("cpu", torch.float32)
    u16 = c.contiguous().numpy().view(np.uint16)  # little-endian: [low, high] per value
    return u16[1::2], u16[0::2]


def _kth_largest_histogram(scores: Mapping[str, torch.Tensor], k: int) -> tuple[float, int, int]:
    """Exact k-th largest value by two histogram passes over float bit patterns.

    Non-negative float32 values order like their bit patterns, so a histogram of the high 16 bits picks the
    bucket holding the k-th largest value and a histogram of the low 16 bits inside that bucket pins it down.
    Negative, infinite and NaN scores show up in the first histogram (high half >= 0x7F80) and are rejected.

    Returns (tau, count of scores > tau, count of scores == tau).
    """
    hist_hi = np.zeros(1 << 16, dtype=np.int64)
    for s in scores.values():
        for c in _chunks(s):
            hist_hi += np.bincount(_halves(c)[0], minlength=1 << 16)
    bad = int(hist_hi[0x7F80:].sum())
    if bad:
        raise ValueError(
            f"{bad} saliency scores are negative, infinite or NaN; scores must be finite magnitudes "
            "(a NaN usually means the forget loss diverged)"
        )
    hi, above_hi = _select_bucket(torch.from_numpy(hist_hi), k)
    hist_lo = np.zeros(1 << 16, dtype=np.int64)
    for s in scores.values():
        for c in _chunks(s):
            h, lo_half = _halves(c)
            sel = lo_half[h == hi]
            if sel.size:
                hist_lo += np.bincount(sel, minlength=1 << 16)
    lo, above_lo = _select_bucket(torch.from_numpy(hist_lo), k - above_hi)
    tau = float(np.array([(hi << 16) | lo], dtype=np.uint32).view(np.float32)[0])
    return tau, above_hi + above_lo, int(hist_lo[lo])


def threshold_mask(scores: Mapping[str, torch.Tensor], ratio: float, consume: bool = False) -> dict[str, torch.Tensor]:
    """Keep the ``round(ratio * total)`` largest scores over all tensors by one global threshold.

    Args:
        scores (`Mapping[str, Tensor]`): non-negative scores (e.g. from :func:`accumulate_gradients`).
        ratio (`float`): fraction of all weights to keep, in (0, 1].
        consume (`bool`, defaults to `False`): remove each score tensor from ``scores`` (a mutable dict) as soon as
            its mask exists, so scores and masks are never all in memory together.

    Returns:
        `dict[str, BoolTensor]`: masks shaped like the scores, with exactly ``k`` True entries in total
        (ties at the threshold are taken in parameter order, then flat index order).
    """
    if not (0.0 < float(ratio) <= 1.0) or math.isnan(float(ratio)):
        raise ValueError(f"mask ratio must be in (0, 1], got {ratio}")
    if not scores:
        raise ValueError("no scores to threshold")
    total = sum(s.numel() for s in scores.values())
    k = max(1, int(round(float(ratio) * total)))
    if k >= total:
        out = {n: torch.ones(s.shape, dtype=torch.bool, device=s.device) for n, s in scores.items()}
        if consume:
            scores.clear()  # type: ignore[attr-defined]
        return out
    tau, n_greater, n_equal = _kth_largest_histogram(scores, k)
    ties_needed = k - n_greater  # >= 1 by construction
    masks: dict[str, torch.Tensor] = {}
    for name in list(scores):
        sf = scores[name].detach()
        if consume:
            del scores[name]  # type: ignore[attr-defined]
        if n_equal == k - n_greater:  # every tie is kept: one comparison per weight
            masks[name] = sf >= tau
            continue
        m = sf > tau
        if ties_needed > 0:
            eq = sf == tau
            n_eq = int(torch.count_nonzero(eq))
            if n_eq:
                if n_eq <= ties_needed:
                    m |= eq
                    ties_needed -= n_eq
                else:
                    idx = torch.nonzero(eq.reshape(-1)).reshape(-1)[:ties_needed]
                    mflat = m.reshape(-1)
                    mflat[idx] = True
                    m = mflat.reshape(sf.shape)
                    ties_needed = 0
        masks[name] = m
    return masks


def compute_mask(
    params: Mapping[str, torch.nn.Parameter],
    batches: Iterable[Any],
    loss_fn: Callable[[Any], torch.Tensor],
    ratio: float,
    progress: Progress | None = None,
    mode: Literal["abs_of_sum", "sum_of_abs"] = "abs_of_sum",
    score_dtype: str | torch.dtype = "float32",
) -> dict[str, torch.Tensor]:
    """Saliency mask: :func:`accumulate_gradients` then :func:`threshold_mask`."""
    if not (0.0 < float(ratio) <= 1.0):
        raise ValueError(f"mask ratio must be in (0, 1], got {ratio}")
    scores = accumulate_gradients(params, batches, loss_fn, progress=progress, mode=mode, score_dtype=score_dtype)
    return threshold_mask(scores, ratio)


def mask_stats(mask: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """Total/kept counts, the kept ratio and the per-parameter kept ratio."""
    per_layer = {}
    total = kept = 0
    for name, m in mask.items():
        n, c = m.numel(), int(torch.count_nonzero(m))
        total += n
        kept += c
        per_layer[name] = {"numel": n, "kept": c, "ratio": c / n if n else 0.0}
    return {"total": total, "kept": kept, "ratio": kept / total if total else 0.0, "per_layer": per_layer}


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """Pack a boolean tensor into uint8 (8 flags per byte, most significant bit first)."""
    flat = mask.reshape(-1).to(torch.uint8)
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, torch.zeros(pad, dtype=torch.uint8, device=flat.device)])
    weights = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.uint8, device=flat.device)
    return (flat.view(-1, 8) * weights).sum(dim=1, dtype=torch.uint8)


def unpack_bits(packed: torch.Tensor, shape: tuple[int, ...] | list[int]) -> torch.Tensor:
    """Inverse of :func:`pack_bits`."""
    n = math.prod(shape) if len(shape) else 1
    shifts = torch.tensor([7, 6, 5, 4, 3, 2, 1, 0], dtype=torch.uint8, device=packed.device)
    bits = (packed.view(-1, 1) >> shifts) & 1
    return bits.reshape(-1)[:n].bool().reshape(tuple(shape))


def save_mask(
    mask: Mapping[str, torch.Tensor], path: str | os.PathLike, metadata: Mapping[str, Any] | None = None
) -> None:
    """Save a mask as packed bits in safetensors (1 bit per weight), with shapes and stats in the metadata."""
    shapes = {n: list(m.shape) for n, m in mask.items()}
    stats = mask_stats(mask)
    meta = {
        "format": MASK_FORMAT,
        "shapes": json.dumps(shapes),
        "kept": str(stats["kept"]),
        "total": str(stats["total"]),
        "ratio": repr(stats["ratio"]),
    }
    for k, v in (metadata or {}).items():
        meta[str(k)] = v if isinstance(v, str) else json.dumps(v)
    atomic_save_safetensors({n: pack_bits(m) for n, m in mask.items()}, path, metadata=meta)


def load_mask(path: str | os.PathLike, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Load a mask saved by :func:`save_mask` (or a safetensors file of bool tensors).

    Returns:
        `dict[str, BoolTensor]` keyed by parameter name, shaped like the parameters.
    """
    tensors, meta = load_safetensors(path)
    if meta.get("format") == MASK_FORMAT:
        try:
            shapes = json.loads(meta["shapes"])
        except (KeyError, json.JSONDecodeError) as err:
            raise CorruptFileError(f"{path}: mask metadata is damaged ({err}); recompute the mask") from err
        if set(shapes) != set(tensors):
            raise CorruptFileError(f"{path}: mask metadata does not match its tensors; recompute the mask")
        out = {n: unpack_bits(tensors[n], shapes[n]).to(device) for n in shapes}
    else:
        bad = [n for n, t in tensors.items() if t.dtype != torch.bool]
        if bad:
            raise CorruptFileError(f"{path} is not a mask file (non-boolean tensors such as {bad[0]!r})")
        out = {n: t.to(device) for n, t in tensors.items()}
    return out
