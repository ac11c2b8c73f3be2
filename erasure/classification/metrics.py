"""Unlearning metrics as the SalUn paper defines them, implemented from their definitions.

* UA: 100 - accuracy on the forget set.   * RA: accuracy on the retain set.
* TA: accuracy on the test set (class-wise forgetting: on the test samples of the remaining classes).
* MIA-Efficacy: share of forget samples that a membership-inference attacker classifies as
  non-members. The attacker is an RBF support-vector classifier (C=3, gamma="auto", as in the paper's
  code) trained on a per-sample feature (default: the softmax confidence of the true label) to tell
  retain samples (members) from test samples (non-members), balanced in size.
* MIA-AUC (extra, threshold-free, does not flip): ROC AUC of a loss-threshold attack (lower loss =
  member) separating forget samples from held-out test samples of the same classes; 50 means the forget
  set looks like unseen data (the retrained ideal), 100 that it is fully recognised as training data.
* Avg. Gap: mean absolute difference to Retrain over UA, MIA-Efficacy, RA and TA.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from erasure.classification.data import Split, TensorData
from erasure.classification.engine import predict

logger = logging.getLogger(__name__)

__all__ = ["mia_features", "svc_attack", "svc_mia_efficacy", "loss_auc", "evaluate_unlearning", "avg_gap",
           "GAP_KEYS", "entropy", "modified_entropy"]

GAP_KEYS = ("UA", "MIA_efficacy", "RA", "TA")
_EPS = 1e-30


def entropy(p: torch.Tensor) -> torch.Tensor:
    """Shannon entropy ``-sum_i p_i log p_i`` of each row."""
    return -(p * p.clamp_min(_EPS).log()).sum(dim=1)


def modified_entropy(p: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Modified entropy of Song & Mittal (2021): ``-(1-p_y) log p_y - sum_{i != y} p_i log(1 - p_i)``."""
    py = p.gather(1, y.view(-1, 1)).squeeze(1)
    other = p * (1.0 - p).clamp_min(_EPS).log()
    other = other.sum(dim=1) - py * (1.0 - py).clamp_min(_EPS).log()
    return -(1.0 - py) * py.clamp_min(_EPS).log() - other


def mia_features(probs: torch.Tensor, y: torch.Tensor, kind: str = "confidence") -> np.ndarray:
    """Per-sample attack features from softmax outputs.

    Args:
        probs (`Tensor`): ``N x K`` softmax probabilities.
        y (`Tensor`): true labels.
        kind (`str`): ``confidence`` (p of the true label), ``entropy``, ``m_entropy`` or ``prob`` (full vector).

    Returns:
        `np.ndarray`: ``N x d`` float64 features.
    """
    if kind == "confidence":
        f = probs.gather(1, y.view(-1, 1))
    elif kind == "entropy":
        f = entropy(probs).view(-1, 1)
    elif kind == "m_entropy":
        f = modified_entropy(probs, y).view(-1, 1)
    elif kind == "prob":
        f = probs
    else:
        raise ValueError(f"unknown MIA feature {kind!r}")
    return f.detach().cpu().double().numpy()


def svc_attack(member: np.ndarray, nonmember: np.ndarray, C: float = 3.0, gamma: str | float = "auto"):
    """Fit the SVC membership attacker (label 1 = member) on equal-sized member/non-member features."""
    from sklearn.svm import SVC

    if len(member) == 0 or len(nonmember) == 0:
        raise ValueError("the MIA attacker needs member and non-member samples")
    X = np.concatenate([member, nonmember]).reshape(len(member) + len(nonmember), -1)
    Y = np.concatenate([np.ones(len(member)), np.zeros(len(nonmember))])
    clf = SVC(C=C, gamma=gamma, kernel="rbf")
    clf.fit(X, Y)
    return clf


def svc_mia_efficacy(shadow_member: np.ndarray, shadow_nonmember: np.ndarray, target: np.ndarray) -> float:
    """MIA-Efficacy in percent: share of ``target`` samples the attacker calls non-members."""
    clf = svc_attack(shadow_member, shadow_nonmember)
    pred = clf.predict(target.reshape(len(target), -1))
    return 100.0 * float(1.0 - pred.mean())


def loss_auc(member_loss: np.ndarray | torch.Tensor, nonmember_loss: np.ndarray | torch.Tensor) -> float:
    """ROC AUC (percent) of the loss-threshold attack: score ``-loss``, members labelled 1 (ties count half)."""
    from sklearn.metrics import roc_auc_score

    m = np.asarray(member_loss, dtype=np.float64).reshape(-1)
    n = np.asarray(nonmember_loss, dtype=np.float64).reshape(-1)
    if len(m) == 0 or len(n) == 0:
        return float("nan")
    y = np.concatenate([np.ones(len(m)), np.zeros(len(n))])
    return 100.0 * float(roc_auc_score(y, -np.concatenate([m, n])))


def _acc(logits: torch.Tensor, y: torch.Tensor) -> float:
    if len(y) == 0:
        return float("nan")
    return 100.0 * float((logits.argmax(1) == y).float().mean())


@torch.no_grad()
def evaluate_unlearning(
    model: nn.Module,
    train: TensorData,
    test: TensorData,
    split: Split,
    seed: int = 0,
    mia_feature: str = "confidence",
    batch_size: int = 1024,
) -> dict[str, float]:
    """UA, RA, TA, MIA-Efficacy and MIA-AUC (all percent) of ``model`` for one split.

    The attacker's member set is a random subset of the retain set (drawn with ``seed``) of the same size
    as its non-member set, the test set (class-wise: the test samples of the remaining classes).

    Returns:
        `dict[str, float]`: ``UA``, ``RA``, ``TA``, ``MIA_efficacy``, ``MIA_auc`` and, for class-wise
        forgetting, ``TA_forgotten`` (test accuracy on the forgotten classes).
    """
    forget, retain = train.subset(split.forget), train.subset(split.retain)
    if split.scenario == "class":
        fc = torch.tensor(split.forget_classes)
        in_f = torch.isin(test.y, fc)
        test_keep, test_forgot = test.subset(torch.nonzero(~in_f).view(-1)), test.subset(torch.nonzero(in_f).view(-1))
    else:
        test_keep, test_forgot = test, test
    lf, lr_, lt = (predict(model, d.x, batch_size) for d in (forget, retain, test_keep))
    out = {"UA": 100.0 - _acc(lf, forget.y), "RA": _acc(lr_, retain.y), "TA": _acc(lt, test_keep.y)}
    if split.scenario == "class":
        lt_f = predict(model, test_forgot.x, batch_size)
        out["TA_forgotten"] = _acc(lt_f, test_forgot.y)
    else:
        lt_f = lt
    # SVC attacker: retain subset (members) vs test (non-members), balanced
    g = torch.Generator().manual_seed(int(seed) + 7919)
    n_shadow = min(len(retain), len(test_keep))
    pick = torch.randperm(len(retain), generator=g)[:n_shadow]
    pick_t = torch.randperm(len(test_keep), generator=g)[:n_shadow]
    pr, pt, pf = (F.softmax(z.double(), dim=1) for z in (lr_[pick], lt[pick_t], lf))
    feats = (mia_features(pr, retain.y[pick], mia_feature), mia_features(pt, test_keep.y[pick_t], mia_feature),
             mia_features(pf, forget.y, mia_feature))
    out["MIA_efficacy"] = svc_mia_efficacy(*feats)
    # loss-threshold AUC: forget vs unseen test samples of the same classes
    out["MIA_auc"] = loss_auc(F.cross_entropy(lf, forget.y, reduction="none"),
                              F.cross_entropy(lt_f, test_forgot.y, reduction="none"))
    return out


def avg_gap(row: Mapping[str, float], reference: Mapping[str, float], keys: Sequence[str] = GAP_KEYS) -> float:
    """Mean absolute difference to the reference (Retrain) over ``keys``."""
    vals = [abs(float(row[k]) - float(reference[k])) for k in keys]
    return float(sum(vals) / len(vals)) if vals and all(map(math.isfinite, vals)) else float("nan")
