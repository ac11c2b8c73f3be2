"""How far the official SalUn IU recursion (``Wfisher.py``'s ``woodfisher``) lands from the exact ``F^-1 v``.

Digits, small CNN (this toolkit's offline default), 10% random forgetting; both use the same first ``N + 2``
retain samples (the official loop's), ``F = I + G^T G / N_used``. Prints the relative distance and the cosine of
the official result and of ``v`` itself to ``F^-1 v``. Usage: ``python bench/iu_official_gap.py [--seeds 3]``.
"""

from __future__ import annotations

import argparse
import json

import torch

from erasure.classification.config import SetupConfig, TrainRecipe
from erasure.classification.methods.iu import (
    _flat_params,
    _mean_grad,
    _per_sample_grads,
    _sample_grads_in_order,
    exact_inverse_fisher_v,
    official_woodfisher,
)
from erasure.classification.pipeline import Workspace


def _rel(x: torch.Tensor, ref: torch.Tensor) -> float:
    return float((x - ref).norm() / ref.norm())


def _cos(x: torch.Tensor, ref: torch.Tensor) -> float:
    return float(torch.dot(x, ref) / (x.norm() * ref.norm()))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--cache-dir", default="/tmp/iu-gap-cache")
    a = ap.parse_args()
    torch.set_num_threads(1)
    ws = Workspace.create(SetupConfig(scenario="random", forget_fraction=0.1, cache_dir=a.cache_dir),
                          recipe=TrainRecipe(epochs=15, lr=0.05, batch_size=64, schedule="cosine"))
    rows = []
    for seed in range(a.seeds):
        model, _ = ws.original(seed)
        model.eval()
        split = ws.split(seed)
        forget, retain = ws.bundle.train.subset(split.forget), ws.bundle.train.subset(split.retain)
        n_f, n_r = len(forget), len(retain)
        v = (n_f / (n_f + n_r)) * (_mean_grad(model, forget, 256) - _mean_grad(model, retain, 256))
        used = min(a.n + 2, n_r)
        G = _per_sample_grads(model, retain.subset(torch.arange(used)), 64)
        exact = exact_inverse_fisher_v(G, v, 1.0)
        off = official_woodfisher(_sample_grads_in_order(model, retain, used), v, a.n)

        rows.append({"seed": seed, "params": sum(p.numel() for p in _flat_params(model).values()), "samples": used,
                     "official_rel_dist": round(_rel(off, exact), 4), "official_cos": round(_cos(off, exact), 4),
                     "v_rel_dist": round(_rel(v, exact), 4), "v_cos": round(_cos(v, exact), 4)})
        print(json.dumps(rows[-1]), flush=True)


if __name__ == "__main__":
    main()
