"""Official-code-compatible modes of the classification methods (BE shadow neuron, soft-thresholding SalUn's anchor,
IU's rank-1 recursion) and the official CIFAR-10 45,000 / 5,000 split."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from erasure.classification.config import SetupConfig, TrainRecipe
from erasure.classification.data import DATASETS, TensorData, as_input, load_dataset, official_holdout
from erasure.classification.methods import salun_soft as soft_mod
from erasure.classification.methods.iu import exact_inverse_fisher_v, official_woodfisher
from erasure.classification.metrics import evaluate_unlearning
from erasure.classification.pipeline import Workspace, resolve_method_config, run_method


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """240 training / 120 test digits, small CNN trained for 6 epochs, class 0 forgotten."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    full = load_dataset("digits")
    g = torch.Generator().manual_seed(0)
    tr, te = torch.randperm(len(full.train), generator=g)[:240], torch.randperm(len(full.test), generator=g)[:120]
    bundle = dataclasses.replace(full, train=full.train.subset(tr), test=full.test.subset(te))
    setup = SetupConfig(scenario="class", forget_class=[0], cache_dir=str(tmp_path_factory.mktemp("cache")))
    ws = Workspace.create(setup, bundle=bundle, recipe=TrainRecipe(epochs=6, lr=0.05, batch_size=32, schedule="cosine"))
    original, _ = ws.original(0)
    yield ws, original, ws.split(0)
    torch.set_num_threads(n)


def _cfg(name, **kw):
    return resolve_method_config(name, "digits", "class", presets=False, overrides=kw)


def test_be_official_keeps_the_shadow_neuron_and_ua_counts_it(tiny):
    ws, original, split = tiny
    kw = dict(epochs=2, lr=5e-3, batch_size=16)
    pruned, rec_p = run_method(ws, "boundary_expand", _cfg("boundary_expand", **kw), 0, original, split)
    kept, rec_k = run_method(ws, "boundary_expand", _cfg("boundary_expand", prune_shadow=False, **kw), 0, original,
                             split)
    assert pruned.fc.out_features == 10 and kept.fc.out_features == 11
    assert torch.equal(kept.fc.weight[:10], pruned.fc.weight)  # same training; only the head's last row differs
    # a forget sample the K+1 model sends to the shadow class counts as forgotten there but not once pruned
    forget = ws.bundle.train.subset(split.forget)
    with torch.no_grad():
        to_shadow = int((kept(as_input(forget.x)).argmax(1) == 10).sum())
    assert to_shadow > 0
    assert rec_k["UA"] > rec_p["UA"]
    again = evaluate_unlearning(kept, ws.bundle.train, ws.bundle.test, split, seed=0)
    assert again["UA"] == pytest.approx(rec_k["UA"])


def _record_anchors(monkeypatch):
    seen = []
    orig = soft_mod.SoftThreshold.__call__

    def spy(self, step, total):
        seen.append((self.epoch, step, self.k(step, total), [t.clone() for t in self.theta0]))
        return orig(self, step, total)

    monkeypatch.setattr(soft_mod.SoftThreshold, "__call__", spy)
    return seen


def _same(a, b):
    return all(torch.equal(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize("official", [False, True])
def test_soft_threshold_anchor_per_run_or_per_epoch(tiny, monkeypatch, official):
    ws, original, split = tiny
    seen = _record_anchors(monkeypatch)
    kw = dict(epochs=3, lr=0.02, batch_size=64, mask_ratio=0.5)
    if official:
        kw.update(anchor="epoch", k_decay="epoch", order="mixed")
    run_method(ws, "salun_soft", _cfg("salun_soft", **kw), 0, original, split)
    theta_orig = [p.detach() for p in original.parameters() if p.requires_grad]
    epochs = sorted({e for e, *_ in seen})
    assert epochs == [0, 1, 2]
    for e in epochs:
        rows = [r for r in seen if r[0] == e]
        assert all(_same(r[3], rows[0][3]) for r in rows)  # constant within an epoch
        ks = [r[2] for r in rows]
        if official:
            assert len(set(ks)) == 1  # k held for the epoch
        else:
            assert ks == sorted(ks, reverse=True) and len(set(ks)) == len(ks)  # k lowered every step
    first = [r for r in seen if r[0] == 0][0][3]
    later = [r for r in seen if r[0] == 2][0][3]
    assert _same(first, theta_orig)
    assert _same(later, theta_orig) != official  # re-taken per epoch only in the official mode


def test_iu_exact_matches_the_dense_inverse_and_the_official_recursion_is_rank1():
    g = torch.Generator().manual_seed(0)
    n, p = 6, 15
    G = torch.randn(n, p, generator=g, dtype=torch.float64)
    v = torch.randn(p, generator=g, dtype=torch.float64)
    fisher = torch.eye(p, dtype=torch.float64) + G.T @ G / n
    dense = torch.linalg.solve(fisher, v)
    exact = exact_inverse_fisher_v(G, v, damping=1.0)
    assert torch.allclose(exact, dense, atol=1e-10)
    off = official_woodfisher(list(G), v, n=n)
    assert (off - dense).norm() / dense.norm() > 0.05  # not F^-1 v
    d = off - v
    cos = torch.dot(d, G[0]) / (d.norm() * G[0].norm())
    assert abs(float(cos)) == pytest.approx(1.0, abs=1e-9)  # v moved along the first gradient only


def test_iu_official_solver_runs_and_differs_from_exact(tiny):
    ws, original, split = tiny
    exact, _ = run_method(ws, "iu", _cfg("iu", alpha=50.0, n_samples=32), 0, original, split)
    official, rec = run_method(ws, "iu", _cfg("iu", alpha=50.0, solver="official", official_n=30), 0, original, split)
    assert rec["config"]["solver"] == "official"
    diffs = [not torch.equal(a, b) for a, b in zip(exact.parameters(), official.parameters())]
    moved = [not torch.equal(a, b) for a, b in zip(original.parameters(), official.parameters())]
    assert any(diffs) and any(moved)


def test_official_holdout_is_500_per_class_disjoint_and_seeded():
    y = np.arange(50_000) % 10
    held = official_holdout(y)
    assert len(held) == 5_000 and len(set(held.tolist())) == 5_000
    assert np.bincount(y[held], minlength=10).tolist() == [500] * 10
    assert np.array_equal(held, official_holdout(y))  # the fixed RandomState(1)
    assert not np.array_equal(held, official_holdout(y, seed=2))


def test_cifar10_loads_45k_by_default_and_50k_as_an_option(monkeypatch):
    y = torch.arange(50_000) % 10

    def fake(root, download):
        return (TensorData(torch.zeros(50_000, 3, 1, 1, dtype=torch.uint8), y),
                TensorData(torch.zeros(10, 3, 1, 1, dtype=torch.uint8), torch.arange(10)), {"source": "fake"})

    monkeypatch.setitem(DATASETS, "cifar10", dataclasses.replace(DATASETS["cifar10"], loader=fake))
    official = load_dataset("cifar10", "unused")
    full = load_dataset("cifar10", "unused", train_split="full")
    assert len(official.train) == 45_000 and len(full.train) == 50_000 and official.info["held_out"] == 5_000
    assert np.bincount(official.train.y.numpy(), minlength=10).tolist() == [4_500] * 10
    held = set(official_holdout(y.numpy()).tolist())
    # the kept images are exactly the complement of the hold-out, in order
    kept = [i for i in range(50_000) if i not in held]
    assert torch.equal(official.train.y, y[kept])
    assert SetupConfig().train_split == "official"
    with pytest.raises(ValueError, match="train_split"):
        SetupConfig(train_split="half")
