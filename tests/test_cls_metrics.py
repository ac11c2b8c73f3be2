"""Classification metrics: the MIA attacker, the loss-threshold AUC, entropies and Avg. Gap."""

from __future__ import annotations

import math

import numpy as np
import torch

from erasure.classification.metrics import avg_gap, entropy, loss_auc, modified_entropy, svc_attack, svc_mia_efficacy


def test_mia_indistinguishable_is_chance():
    rng = np.random.default_rng(0)
    member, nonmember = rng.uniform(size=(300, 1)), rng.uniform(size=(300, 1))
    clf = svc_attack(member, nonmember)
    test_m, test_n = rng.uniform(size=(2000, 1)), rng.uniform(size=(2000, 1))
    acc = 0.5 * (clf.predict(test_m).mean() + 1 - clf.predict(test_n).mean())
    assert abs(acc - 0.5) < 0.06
    eff = svc_mia_efficacy(member, nonmember, rng.uniform(size=(2000, 1)))
    assert 20 < eff < 80  # chance level for a same-distribution target


def test_mia_separated_is_perfect():
    rng = np.random.default_rng(1)
    member = rng.uniform(0.9, 1.0, size=(200, 1))
    nonmember = rng.uniform(0.0, 0.4, size=(200, 1))
    assert svc_mia_efficacy(member, nonmember, rng.uniform(0.0, 0.4, size=(500, 1))) > 99
    assert svc_mia_efficacy(member, nonmember, rng.uniform(0.9, 1.0, size=(500, 1))) < 1


def test_loss_auc():
    rng = np.random.default_rng(2)
    assert abs(loss_auc(rng.exponential(size=4000), rng.exponential(size=4000)) - 50) < 3
    assert loss_auc(rng.uniform(0, 0.1, 100), rng.uniform(1, 2, 100)) == 100.0
    assert loss_auc(rng.uniform(1, 2, 100), rng.uniform(0, 0.1, 100)) == 0.0
    assert math.isnan(loss_auc([], [1.0]))


def test_entropies_from_definition():
    p = torch.tensor([[0.7, 0.2, 0.1]], dtype=torch.float64)
    y = torch.tensor([0])
    assert torch.allclose(entropy(p), -(p * p.log()).sum(1))
    expected = -(0.3 * math.log(0.7)) - (0.2 * math.log(0.8) + 0.1 * math.log(0.9))
    assert abs(float(modified_entropy(p, y)) - expected) < 1e-12
    # a confident correct prediction has lower modified entropy than a confident wrong one
    good, bad = torch.tensor([[0.98, 0.01, 0.01]]), torch.tensor([[0.01, 0.98, 0.01]])
    assert float(modified_entropy(good, y)) < float(modified_entropy(bad, y))


def test_avg_gap():
    ref = {"UA": 5.0, "MIA_efficacy": 10.0, "RA": 100.0, "TA": 95.0}
    row = {"UA": 7.0, "MIA_efficacy": 6.0, "RA": 99.0, "TA": 96.0}
    assert avg_gap(row, ref) == (2 + 4 + 1 + 1) / 4
    assert avg_gap(ref, ref) == 0.0
