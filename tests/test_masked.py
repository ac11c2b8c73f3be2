from __future__ import annotations

import pytest
import torch

from erasure.masked import MaskedUpdate, make_optimizer, prepare_masked_params


def _setup(seed=0):
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(10, 20), torch.nn.ReLU(), torch.nn.Linear(20, 3))
    named = dict(net.named_parameters())
    g = torch.Generator().manual_seed(seed)
    mask = {n: torch.rand(p.shape, generator=g) > 0.5 for n, p in named.items()}
    ref = {n: p.detach().clone() for n, p in named.items()}
    return net, named, mask, ref


OPTIMIZERS = [
    ("sgd", dict(momentum=0.9, weight_decay=5e-2)),
    ("sgd", dict(momentum=0.9, weight_decay=5e-2, nesterov=True)),
    ("adam", dict(weight_decay=1e-2)),
    ("adamw", dict(weight_decay=1e-1)),
]


@pytest.mark.parametrize("name,kw", OPTIMIZERS)
def test_frozen_weights_bit_identical(name, kw):
    net, named, mask, ref = _setup()
    wd = kw.pop("weight_decay")
    trainable = prepare_masked_params(named, mask)
    opt, decoupled = make_optimizer(name, trainable.values(), lr=0.05, weight_decay=wd, **kw)
    upd = MaskedUpdate(trainable, mask, weight_decay=wd, decoupled_weight_decay=decoupled)
    for _ in range(30):
        loss = net(torch.randn(16, 10)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        upd.before_step(0.05)
        opt.step()
        upd.after_step()
    assert upd.frozen_values_equal(ref)
    for n, p in named.items():
        assert torch.equal(p.detach()[~mask[n]], ref[n][~mask[n]])
        assert not torch.equal(p.detach()[mask[n]], ref[n][mask[n]]), f"salient weights of {n} did not move"


def test_unmasked_optimizer_would_move_frozen_weights():
    """The guard is needed: the plain optimizer with weight decay moves zero-gradient weights."""
    net, named, mask, ref = _setup()
    opt = torch.optim.AdamW(net.parameters(), lr=0.05, weight_decay=0.1)
    for _ in range(3):
        opt.zero_grad()
        net(torch.randn(4, 10)).pow(2).mean().backward()
        for n, p in named.items():
            p.grad[~mask[n]] = 0
        opt.step()
    assert not all(torch.equal(p.detach()[~mask[n]], ref[n][~mask[n]]) for n, p in named.items())


def test_nan_gradient_outside_mask_does_not_leak():
    net, named, mask, ref = _setup()
    trainable = prepare_masked_params(named, mask)
    opt, dec = make_optimizer("sgd", trainable.values(), lr=0.1)
    upd = MaskedUpdate(trainable, mask)
    net(torch.randn(4, 10)).sum().backward()
    w = named["0.weight"]
    w.grad[~mask["0.weight"]] = float("nan")
    upd.before_step(0.1)
    opt.step()
    upd.after_step()
    assert torch.isfinite(w).all() and upd.frozen_values_equal(ref)


def test_restore_frozen_for_foreign_optimizers():
    """An optimizer that moves every weight (like quantised state can) is undone by restore_frozen."""

    class Drifting(torch.optim.SGD):
        @torch.no_grad()
        def step(self, closure=None):
            super().step(closure)
            for group in self.param_groups:
                for p in group["params"]:
                    p.add_(1e-3)

    net, named, mask, ref = _setup()
    trainable = prepare_masked_params(named, mask)
    opt = Drifting(trainable.values(), lr=0.01)
    upd = MaskedUpdate(trainable, mask, restore_frozen=True)
    for _ in range(5):
        opt.zero_grad()
        net(torch.randn(4, 10)).pow(2).mean().backward()
        upd.before_step(0.01)
        opt.step()
        upd.after_step()
    assert upd.frozen_values_equal(ref)


def test_fully_masked_out_params_are_frozen_and_errors():
    net, named, mask, _ = _setup()
    mask["2.bias"] = torch.zeros_like(mask["2.bias"])
    trainable = prepare_masked_params(named, mask)
    assert "2.bias" not in trainable and not named["2.bias"].requires_grad
    bad = dict(mask, **{"0.weight": torch.ones(3, 3, dtype=torch.bool)})
    with pytest.raises(ValueError, match="shape"):
        MaskedUpdate(named, bad)
    with pytest.raises(ValueError, match="unknown optimizer"):
        make_optimizer("lion", trainable.values(), lr=0.1)
    with pytest.raises(ValueError, match="no trainable"):
        make_optimizer("sgd", [], lr=0.1)
