"""Class-forgetting metrics of the SalUn paper on a shapes class-conditional model, with the shapes judge.

* ``judge_accuracy``  per class, the share of generations the judge labels as that class;
* ``UA`` (unlearning accuracy) = 1 - the judge accuracy of the forget class (generations NOT labelled as it);
* ``judge_fd``  the Frechet distance between two image sets in the judge's 128-d features (the offline FID).

Images are drawn with the model's shipped sampler (DDIM steps and CFG scale in ``model_index.json``) and
per-image seeds; the judge reads 64 px (smaller images are upscaled bicubically by the judge).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

__all__ = ["draw_classes", "judge_labels", "class_report", "judge_fd", "unconditional_report"]


def draw_classes(model, classes: list[str], seeds: list[int], batch_size: int = 64, **kw: Any) -> dict[str, list]:
    """``{class: [PIL images, one per seed]}``."""
    return {c: model.sample([c] * len(seeds), list(seeds), batch_size=batch_size, **kw) for c in classes}


def judge_labels(judge, images: list) -> list[str]:
    return [p["shape"] for p in judge.predict(images)]


def judge_features(judge, images: list) -> np.ndarray:
    from erasure.shapes.data import to_tensor

    x = to_tensor(images, judge.size).to(judge.device)
    with torch.no_grad():
        return judge.net.features((x - judge.net.mean) * 4.0).cpu().numpy().astype(np.float64)


def judge_fd(judge, images_a: list, images_b: list) -> float:
    """Frechet distance of two image sets in the judge's feature space (biased upwards for small sets)."""
    from erasure_eval.fid import frechet_distance

    fa, fb = judge_features(judge, images_a), judge_features(judge, images_b)
    return frechet_distance(fa.mean(0), np.cov(fa, rowvar=False), fb.mean(0), np.cov(fb, rowvar=False))


def class_report(judge, images: dict[str, list], forget: str | None = None) -> dict[str, Any]:
    """Per-class judge accuracy (and what the images were labelled as), UA of ``forget`` and the mean
    accuracy of the other classes."""
    per: dict[str, Any] = {}
    for c, ims in images.items():
        labels = judge_labels(judge, ims)
        counts: dict[str, int] = {}
        for lab in labels:
            counts[lab] = counts.get(lab, 0) + 1
        per[c] = {"accuracy": sum(lab == c for lab in labels) / max(1, len(labels)), "n": len(labels), "labels": counts}
    out: dict[str, Any] = {"per_class": per}
    others = [c for c in per if c != forget]
    if others:
        out["other_accuracy"] = float(np.mean([per[c]["accuracy"] for c in others]))
    if forget is not None and forget in per:
        out["ua"] = 1.0 - per[forget]["accuracy"]
        out["forget_shown"] = per[forget]["labels"].get(forget, 0)
    return out


def unconditional_report(judge, model, forget: str, seeds: list[int], batch_size: int = 64) -> dict[str, Any]:
    """What the null class (the model's unconditional distribution) draws: the judge's label counts and the share
    labelled ``forget``. Class-conditional metrics (UA, the other classes' accuracy and FD) never look here, so a
    method that only relabels the class scores perfectly on them while the model still draws it; the original
    draws each of ``k`` balanced classes about 1/k of the time, a model retrained without the class about 0."""
    images = model.sample([None] * len(seeds), list(seeds), batch_size=batch_size)
    per = class_report(judge, {"null": images})["per_class"]["null"]  # its label counts; "accuracy" means nothing here
    return {"n": per["n"], "labels": per["labels"], "forget_share": per["labels"].get(forget, 0) / max(1, per["n"])}
