"""Object-erasure accuracy: a judge classifies each generated image; forget vs retain accuracy.

Judges are registered in :data:`JUDGES`:

* ``shapes``: the embedded model's judge (``erasure.shapes.load_judge``), predicting ``shape``, ``color``
  and ``fill``; targets are the prompt CSV's ``shape``/``color``/``fill`` columns (a blank cell means the
  prompt leaves that attribute free, and the image is not judged on it).
* ``resnet50``: torchvision ResNet-50 with user-supplied ImageNet weights (``--weights``); the target is
  the ``label_idx`` column (ImageNet index) or the ``class`` column (an ImageNet class name such as
  ``tench`` or ``garbage truck``, as in imagenette.csv), or ``--target-class`` for files without one
  (UnlearnDiffAtk church.csv ...).

Forget accuracy: the share of images of the erased classes (``--forget``) still judged as their class (lower
is better erasure). Retain accuracy: the share of the other images judged as their own class (higher is
better). For the shapes judge a forget spec is ``attribute=value`` (``shape=circle``) or a bare value.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import Any, ClassVar, Protocol

from erasure.registry import NAME_RULE, Registry
from erasure_eval.base import MetricError, load_rgb, register_metric

logger = logging.getLogger(__name__)

__all__ = ["JUDGES", "Judge", "register_judge", "ObjectAccuracyMetric", "ShapesJudge", "ResNet50Judge",
           "accuracy_tables"]


class Judge(Protocol):
    attributes: tuple[str, ...]

    def record_config(self) -> dict[str, Any]: ...

    def predict(self, images: list) -> list[dict[str, Any]]: ...

    def targets(self, item: dict[str, Any]) -> dict[str, Any]: ...


JUDGES: Registry[type] = Registry("judge", error=MetricError)


def register_judge(name: str):
    if not isinstance(name, str) or not NAME_RULE.match(name):
        raise ValueError(f"judge names are lowercase letters and digits joined by '_' or '-', got {name!r}")

    def deco(cls: type) -> type:
        JUDGES.register(name, cls)
        cls.judge_name = name
        return cls

    return deco


def _weights_sha(path: str) -> str:
    from erasure.io import file_sha256

    return file_sha256(path)


@register_judge("shapes")
class ShapesJudge:
    """The embedded shapes model's judge (per-attribute: shape, color, fill)."""

    attributes = ("shape", "color", "fill")

    def __init__(self, judge: Any = None, weights: str | None = None, device: str = "cpu", **_: Any) -> None:
        self._judge = judge
        self.weights = weights
        self.device = device

    def _path(self) -> str | None:
        if self.weights:
            return self.weights
        try:
            from erasure.shapes import default_judge_path

            return str(default_judge_path())
        except (ImportError, AttributeError):
            return None

    def _load(self):
        if self._judge is None:
            try:
                from erasure.shapes import load_judge
            except ImportError as err:
                raise MetricError(f"the shapes judge is not available in this install (erasure.shapes.load_judge): {err}") from err
            try:
                self._judge = load_judge(self.weights, device=self.device)
            except (FileNotFoundError, OSError, ValueError) as err:
                raise MetricError(f"cannot load the shapes judge: {err}") from err
        return self._judge

    def record_config(self) -> dict[str, Any]:
        conf: dict[str, Any] = {"judge": "shapes"}
        p = self._path()
        if self._judge is not None and self.weights is None and getattr(self._judge, "fingerprint", None):
            conf["weights"] = self._judge.fingerprint  # an in-memory judge (tests)
        elif p and os.path.isfile(p):
            conf["weights"] = os.path.basename(p)
            conf["weights_sha256"] = _weights_sha(p)
        else:
            conf["weights"] = None
        return conf

    def predict(self, images: list) -> list[dict[str, Any]]:
        preds = self._load().predict(images)
        out = []
        for p in preds:
            rec = {a: p.get(a) for a in self.attributes if a in p}
            for k, v in p.items():
                if k not in rec and isinstance(v, (int, float, str)):
                    rec[k] = float(v) if isinstance(v, float) else v
            out.append(rec)
        return out

    def targets(self, item: dict[str, Any]) -> dict[str, Any]:
        extra = item.get("extra") or {}
        return {a: extra[a].strip() for a in self.attributes if (extra.get(a) or "").strip()}


IMAGENET_NORM = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


@register_judge("resnet50")
class ResNet50Judge:
    """torchvision ResNet-50 with user-supplied ImageNet weights (``.pth`` state dict or ``.safetensors``)."""

    attributes = ("label",)

    def __init__(self, weights: str | None = None, target_class: str | None = None, device: str = "cpu",
                 batch_size: int = 32, **_: Any) -> None:
        if not weights:
            raise MetricError(
                "the resnet50 judge needs ImageNet weights: pass --weights PATH (e.g. torchvision's "
                "resnet50-0676ba61.pth or resnet50-11ad3fa6.pth; downloading is not done for you)"
            )
        if not os.path.isfile(weights):
            raise MetricError(f"ResNet-50 weights file not found: {weights}")
        self.weights = weights
        self.target_class = target_class
        self.device = device
        self.batch_size = batch_size
        self._model = None
        from torchvision.models import ResNet50_Weights

        self.categories = list(ResNet50_Weights.IMAGENET1K_V1.meta["categories"])
        self._by_name = {c.lower(): i for i, c in enumerate(self.categories)}

    def _load(self):
        if self._model is None:
            import torch
            from torchvision.models import resnet50

            m = resnet50(weights=None)
            try:
                if self.weights.endswith(".safetensors"):
                    from safetensors.torch import load_file

                    sd = load_file(self.weights)
                else:
                    sd = torch.load(self.weights, map_location="cpu", weights_only=True)
                if isinstance(sd, dict) and "state_dict" in sd:
                    sd = sd["state_dict"]
                m.load_state_dict(sd)
            except Exception as err:  # noqa: BLE001 - torch/safetensors raise many types
                raise MetricError(f"{self.weights} is not a torchvision ResNet-50 state dict: {err}") from err
            self._model = m.eval().to(self.device)
        return self._model

    def record_config(self) -> dict[str, Any]:
        return {"judge": "resnet50", "weights": os.path.basename(self.weights), "weights_sha256": _weights_sha(self.weights)}

    def predict(self, images: list) -> list[dict[str, Any]]:
        import torch
        import torchvision.transforms.functional as TF

        model = self._load()
        out = []
        for b in range(0, len(images), self.batch_size):
            xs = []
            for im in images[b: b + self.batch_size]:
                x = TF.center_crop(TF.resize(TF.pil_to_tensor(im).float() / 255.0, 256, antialias=True), 224)
                xs.append(TF.normalize(x, *IMAGENET_NORM))
            with torch.no_grad():
                prob = torch.softmax(model(torch.stack(xs).to(self.device)), dim=1).cpu()
            top = prob.topk(5, dim=1)
            for v, i in zip(top.values, top.indices):
                out.append({"label": int(i[0]), "label_name": self.categories[int(i[0])], "confidence": float(v[0]),
                            "top5": [int(j) for j in i]})
        return out

    def class_index(self, name: str) -> int:
        key = name.strip().lower()
        if key.isdigit():
            return int(key)
        if key not in self._by_name:
            raise MetricError(f"class {name!r} is not an ImageNet class name (e.g. 'tench', 'garbage truck')")
        return self._by_name[key]

    def targets(self, item: dict[str, Any]) -> dict[str, Any]:
        extra = item.get("extra") or {}
        if (extra.get("label_idx") or "").strip():
            return {"label": int(float(extra["label_idx"]))}
        if (extra.get("class") or "").strip():
            return {"label": self.class_index(extra["class"])}
        if self.target_class:
            return {"label": self.class_index(self.target_class)}
        return {}


def accuracy_tables(
    targets: Sequence[dict[str, Any]], preds: Sequence[dict[str, Any]], forget: Sequence[tuple[str, Any]]
) -> dict[str, Any]:
    """Per-attribute and per-class accuracy, and forget/retain accuracy.

    Args:
        targets: per image, ``{attribute: target}`` (missing attributes are not judged).
        preds: per image, ``{attribute: prediction}``.
        forget: ``(attribute, value)`` pairs of erased classes.
    """
    attrs = sorted({a for t in targets for a in t})
    per_attr: dict[str, Any] = {}
    for a in attrs:
        per_class: dict[str, dict[str, int]] = {}
        for t, p in zip(targets, preds):
            if a not in t:
                continue
            e = per_class.setdefault(str(t[a]), {"images": 0, "correct": 0})
            e["images"] += 1
            e["correct"] += int(str(p.get(a)) == str(t[a]))
        n = sum(e["images"] for e in per_class.values())
        c = sum(e["correct"] for e in per_class.values())
        for e in per_class.values():
            e["accuracy"] = e["correct"] / e["images"]
        per_attr[a] = {"images": n, "correct": c, "accuracy": c / n if n else None, "per_class": per_class}
    out: dict[str, Any] = {"attributes": per_attr}
    if forget:
        fset = {(a, str(v)) for a, v in forget}
        fa = [a for a, _ in fset]
        f_n = f_c = r_n = r_c = 0
        for t, p in zip(targets, preds):
            hit = [(a, str(t[a])) for a in fa if a in t and (a, str(t[a])) in fset]
            if hit:
                f_n += 1
                f_c += int(all(str(p.get(a)) == v for a, v in hit))
            else:
                judged = [a for a in set(fa) if a in t] or list(t)
                if not judged:
                    continue
                r_n += 1
                r_c += int(all(str(p.get(a)) == str(t[a]) for a in judged))
        out["forget"] = {"classes": sorted(f"{a}={v}" for a, v in fset), "images": f_n, "correct": f_c,
                         "accuracy": f_c / f_n if f_n else None}
        out["retain"] = {"images": r_n, "correct": r_c, "accuracy": r_c / r_n if r_n else None}
    return out


@register_metric("object")
class ObjectAccuracyMetric:
    """Object-erasure accuracy with a pluggable judge (``--judge shapes|resnet50``).

    Args:
        judge (`str`, defaults to `"shapes"`): a key of :data:`JUDGES`.
        forget (`list[str]`, *optional*): erased classes (``shape=circle``, ``circle``, ``tench``).
        weights (`str`, *optional*): judge weights (required by ``resnet50``).
        target_class (`str`, *optional*): the class of every image when the CSV has no class column.
    """

    name: ClassVar[str] = "object"
    needs_manifest: ClassVar[bool] = True

    def __init__(self, judge: str = "shapes", forget: Sequence[str] | None = None, judge_obj: Any = None,
                 **kwargs: Any) -> None:
        if judge not in JUDGES:
            raise MetricError(f"unknown judge {judge!r}; registered: {', '.join(sorted(JUDGES))}")
        self.judge_name = judge
        self.judge = JUDGES[judge](judge=judge_obj, **kwargs) if judge == "shapes" else JUDGES[judge](**kwargs)
        # plain strings, or concept dicts with a "name" (as in a run's config)
        self.forget_specs = [f["name"] if isinstance(f, dict) else str(f) for f in (forget or [])]
        self.run_concepts: list[str] = []
        self.cache_key = f"object-{judge}"

    def set_generation(self, gen: dict[str, Any] | None) -> None:
        """Without ``--forget``, the erased classes are the run's concept names that name a class of the prompt set."""
        concepts = (gen or {}).get("concepts") or []
        self.run_concepts = [c.get("name") if isinstance(c, dict) else str(c) for c in concepts]
        self.run_concepts = [c for c in self.run_concepts if c]

    def record_config(self) -> dict[str, Any]:
        return self.judge.record_config()

    def params(self) -> dict[str, Any]:
        return {"judge": self.judge_name, "forget": self.forget_specs}

    def score_images(self, items: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
        return self.judge.predict([load_rgb(it["path"]) for it in items])

    def _forget_pairs(self, items: Sequence[dict[str, Any]], targets: list[dict[str, Any]]) -> list[tuple[str, Any]]:
        pairs = []
        attrs = self.judge.attributes
        if not self.forget_specs and self.run_concepts:
            known = {str(v) for t in targets for v in t.values()}
            if self.judge_name == "resnet50":
                known |= {self.judge.categories[int(v)].lower() for t in targets for v in t.values()}
            specs = [c for c in self.run_concepts if c.lower() in {k.lower() for k in known}]
            if specs:
                logger.info("forget classes from the run's concepts: %s", ", ".join(specs))
                self.forget_specs = specs
        for spec in self.forget_specs:
            if "=" in spec:
                a, v = (s.strip() for s in spec.split("=", 1))
                if a not in attrs:
                    raise MetricError(f"--forget {spec}: the {self.judge_name} judge has attributes {', '.join(attrs)}")
            elif self.judge_name == "resnet50":
                a, v = "label", self.judge.class_index(spec)
            else:
                owners = [a for a in attrs if any(str(t.get(a)) == spec for t in targets)]
                if not owners:
                    raise MetricError(f"--forget {spec!r} matches no target in the prompt set (attributes: {', '.join(attrs)})")
                a, v = owners[0], spec
            pairs.append((a, v))
        return pairs

    def summarize(self, items: Sequence[dict[str, Any]], records: Sequence[dict[str, Any]]) -> dict[str, Any]:
        targets = [self.judge.targets(it) for it in items]
        if not any(targets):
            raise MetricError(
                f"the prompt set has no target column for the {self.judge_name} judge "
                f"(shapes: shape/color/fill; resnet50: label_idx or class, or pass --target-class)"
            )
        out = accuracy_tables(targets, records, self._forget_pairs(items, targets))
        out["judge"] = self.judge_name
        out["judged_images"] = sum(1 for t in targets if t)
        return out
