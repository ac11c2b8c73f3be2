"""Frechet distances between generated and reference images: Inception FID and the shapes judge's FD.

``fid``: the standard FID (Heusel et al., 2017) on the 2048-d pool3 features of the TF-ported Inception v3
used by pytorch-fid, torchmetrics and the ESD/SalUn evaluations. The network is torchvision's Inception3
with pytorch-fid's four modified blocks (pooling as in the TF graph), so the same weights file gives the
same features: pass ``--weights pt_inception-2015-12-05-6726825d.pth`` (pytorch-fid's release file; nothing
is downloaded). torchvision's ImageNet ``inception_v3_google-*.pth`` is accepted too, recorded as the
``torchvision`` variant, whose numbers are not comparable with the papers.

``judge_fd``: the Frechet distance in the shapes judge's 128-d penultimate feature space, for the embedded
model; it runs offline with the shipped judge. The reference is a folder of images or ``render``: the
renderer's drawing of each prompt row's own shape/colour/fill with the row's seed.

Features are cached per image (by content hash) in ``DIR/scores/<metric>-features/*.safetensors`` and the
reference statistics in ``DIR/scores/<metric>-ref-<hash>.safetensors``, so adding images costs only them.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from erasure_eval.base import MetricError, load_rgb, register_metric

logger = logging.getLogger(__name__)

__all__ = ["frechet_distance", "FIDMetric", "JudgeFDMetric", "build_fid_inception", "InceptionFeatures"]


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """``||mu1 - mu2||^2 + Tr(S1) + Tr(S2) - 2 Tr(sqrt(S1 S2))`` (Heusel et al.; pytorch-fid's formula).

    ``Tr(sqrt(S1 S2))`` is computed as the sum of the square roots of the eigenvalues of the symmetric PSD matrix
    ``sqrt(S1) S2 sqrt(S1)`` (similar to ``S1 S2``) with torch's float64 symmetric eigensolver: the same value as
    the trace of ``scipy.linalg.sqrtm(S1 @ S2)`` without its complex round-off. At 2048-d it takes about 3 s here,
    where scipy's ``sqrtm`` and ``eigh`` took tens of seconds (20-36 s for one ``eigh``) on the same shared 2-core machine.
    """
    import torch

    mu1, mu2 = np.atleast_1d(mu1).astype(np.float64), np.atleast_1d(mu2).astype(np.float64)
    sigma1, sigma2 = np.atleast_2d(sigma1).astype(np.float64), np.atleast_2d(sigma2).astype(np.float64)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise MetricError("the two feature sets have different dimensions")
    diff = mu1 - mu2
    s1, s2 = torch.from_numpy(sigma1), torch.from_numpy(sigma2)
    w, v = torch.linalg.eigh((s1 + s1.T) / 2)
    root1 = (v * w.clamp(min=0).sqrt()) @ v.T
    m = root1 @ s2 @ root1
    ev = torch.linalg.eigvalsh((m + m.T) / 2)
    tr_covmean = float(ev.clamp(min=0).sqrt().sum())
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_covmean)


def _stats(feats: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    if feats.shape[0] < 2:
        raise MetricError(f"a Frechet distance needs at least 2 images per set, got {feats.shape[0]}")
    return feats.mean(0), np.cov(feats, rowvar=False)


# --- Inception v3 as in pytorch-fid (TF graph pooling) ----------------------------------------------------------

def build_fid_inception(variant: str = "fid"):
    """torchvision Inception3 with pytorch-fid's FID blocks (``variant="fid"``, 1008 classes) or unchanged
    (``variant="torchvision"``, 1000 classes). Random weights; load a state dict afterwards."""
    import torch
    import torch.nn.functional as F
    from torchvision.models.inception import Inception3, InceptionA, InceptionC, InceptionE

    class FIDInceptionA(InceptionA):
        def forward(self, x):
            b1 = self.branch1x1(x)
            b5 = self.branch5x5_2(self.branch5x5_1(x))
            b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
            bp = self.branch_pool(F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False))
            return torch.cat([b1, b5, b3, bp], 1)

    class FIDInceptionC(InceptionC):
        def forward(self, x):
            b1 = self.branch1x1(x)
            b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
            bd = x
            for m in (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4,
                      self.branch7x7dbl_5):
                bd = m(bd)
            bp = self.branch_pool(F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False))
            return torch.cat([b1, b7, bd, bp], 1)

    class FIDInceptionE(InceptionE):
        def __init__(self, in_channels: int, pool: str):
            super().__init__(in_channels)
            self.pool = pool

        def forward(self, x):
            b1 = self.branch1x1(x)
            b3 = self.branch3x3_1(x)
            b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
            bd = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
            bd = torch.cat([self.branch3x3dbl_3a(bd), self.branch3x3dbl_3b(bd)], 1)
            if self.pool == "avg":
                p = F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)
            else:
                p = F.max_pool2d(x, kernel_size=3, stride=1, padding=1)
            return torch.cat([b1, b3, bd, self.branch_pool(p)], 1)

    if variant == "torchvision":
        return Inception3(num_classes=1000, aux_logits=True, transform_input=False, init_weights=False)
    if variant != "fid":
        raise ValueError(f"variant must be 'fid' or 'torchvision', got {variant!r}")
    net = Inception3(num_classes=1008, aux_logits=False, transform_input=False, init_weights=False)
    net.Mixed_5b = FIDInceptionA(192, pool_features=32)
    net.Mixed_5c = FIDInceptionA(256, pool_features=64)
    net.Mixed_5d = FIDInceptionA(288, pool_features=64)
    net.Mixed_6b = FIDInceptionC(768, channels_7x7=128)
    net.Mixed_6c = FIDInceptionC(768, channels_7x7=160)
    net.Mixed_6d = FIDInceptionC(768, channels_7x7=160)
    net.Mixed_6e = FIDInceptionC(768, channels_7x7=192)
    net.Mixed_7b = FIDInceptionE(1280, "avg")
    net.Mixed_7c = FIDInceptionE(2048, "max")
    return net


class InceptionFeatures:
    """2048-d pool3 features; input images are resized to 299 (bilinear) and scaled to [-1, 1]."""

    def __init__(self, weights: str, device: str = "cpu") -> None:
        import torch

        if not weights:
            raise MetricError(
                "the fid metric needs Inception weights: pass --weights PATH to pytorch-fid's "
                "pt_inception-2015-12-05-6726825d.pth (nothing is downloaded)"
            )
        if not os.path.isfile(weights):
            raise MetricError(f"Inception weights file not found: {weights}")
        try:
            if weights.endswith(".safetensors"):
                from safetensors.torch import load_file

                sd = load_file(weights)
            else:
                sd = torch.load(weights, map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001
            raise MetricError(f"cannot read Inception weights {weights}: {err}") from err
        fc = sd.get("fc.weight")
        if fc is None:
            raise MetricError(f"{weights} is not an Inception v3 state dict (no fc.weight)")
        self.variant = "fid" if fc.shape[0] == 1008 else "torchvision"
        if self.variant == "torchvision":
            logger.warning("%s is torchvision's Inception (1000 classes): FID values are not comparable with "
                           "pytorch-fid/torchmetrics numbers", weights)
        net = build_fid_inception(self.variant)
        try:
            net.load_state_dict(sd, strict=True)
        except RuntimeError as err:
            raise MetricError(f"{weights} does not fit the {self.variant} Inception v3: {err}") from err
        self.net = net.eval().to(device)
        self.device = device

    def __call__(self, images: list) -> np.ndarray:
        import torch
        import torch.nn.functional as F

        n = self.net
        x = torch.stack([torch.from_numpy(np.array(im.convert("RGB"), dtype=np.uint8)).permute(2, 0, 1) for im in images])
        x = x.float().to(self.device) / 255.0
        x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
        x = 2 * x - 1
        with torch.no_grad():
            x = n.Conv2d_2b_3x3(n.Conv2d_2a_3x3(n.Conv2d_1a_3x3(x)))
            x = n.maxpool1(x)
            x = n.maxpool2(n.Conv2d_4a_3x3(n.Conv2d_3b_1x1(x)))
            for name in ("Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c", "Mixed_6d",
                         "Mixed_6e", "Mixed_7a", "Mixed_7b", "Mixed_7c"):
                x = getattr(n, name)(x)
            x = F.adaptive_avg_pool2d(x, (1, 1)).flatten(1)
        return x.cpu().numpy().astype(np.float64)


class JudgeFeatures:
    """The shapes judge's penultimate (global-average-pooled) features."""

    def __init__(self, weights: str | None = None, device: str = "cpu", judge: Any = None) -> None:
        if judge is None:
            try:
                from erasure.shapes import load_judge

                judge = load_judge(weights, device=device)
            except (ImportError, FileNotFoundError, OSError, ValueError) as err:
                raise MetricError(f"cannot load the shapes judge for judge_fd: {err}") from err
        if not hasattr(judge, "net") or not hasattr(judge.net, "features"):
            raise MetricError("the shapes judge has no .net.features module to take features from")
        self.judge = judge

    def __call__(self, images: list) -> np.ndarray:
        import torch

        from erasure.shapes.data import to_tensor

        j = self.judge
        x = to_tensor(images, j.size).to(j.device)
        with torch.no_grad():
            f = j.net.features((x - j.net.mean) * 4.0)
        return f.cpu().numpy().astype(np.float64)


def _dir_fingerprint(paths: Sequence[Path]) -> str:
    h = hashlib.sha256()
    for p in sorted(paths):
        st = p.stat()
        h.update(f"{p.resolve()}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


class _FrechetBase:
    name: ClassVar[str]
    needs_manifest: ClassVar[bool] = False
    batch_size = 32

    def __init__(self, reference: str | None = None, weights: str | None = None, device: str = "cpu", **_: Any) -> None:
        if not reference:
            raise MetricError(f"the {self.name} metric needs --reference (a folder of reference images)")
        self.reference = reference
        self.weights = weights
        self.device = device
        self.workdir: Path | None = None
        self._extractor = None
        self.cache_key = self.name

    def extractor(self):
        raise NotImplementedError

    def bind(self, workdir: Path) -> None:
        self.workdir = workdir

    def _feat_dir(self) -> Path:
        assert self.workdir is not None
        return self.workdir / f"{self.name}-features"

    def _conf_tag(self) -> str:
        return repr(sorted(self.record_config().items()))

    def _load_store(self) -> dict[str, np.ndarray]:
        """Features by image hash, from every chunk file made with this record config."""
        from erasure.io import CorruptFileError, load_safetensors

        out: dict[str, np.ndarray] = {}
        d = self._feat_dir()
        if not d.is_dir():
            return out
        tag = self._conf_tag()
        for p in sorted(d.glob("*.safetensors")):
            try:
                tensors, meta = load_safetensors(p)
            except CorruptFileError:
                continue
            if meta.get("record_config") == tag:
                out.update({k: v.numpy() for k, v in tensors.items()})
        return out

    def _save_chunk(self, feats: dict[str, np.ndarray]) -> None:
        """One file per scored batch (appending, never rewriting: 30k images stay linear in I/O)."""
        import torch

        from erasure.io import atomic_save_safetensors

        name = hashlib.sha256("".join(sorted(feats)).encode()).hexdigest()[:20]
        atomic_save_safetensors({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in feats.items()},
                                self._feat_dir() / f"{name}.safetensors", {"record_config": self._conf_tag()})

    def _features(self, images: list) -> np.ndarray:
        out = []
        ext = self.extractor()
        for b in range(0, len(images), self.batch_size):
            out.append(ext(images[b: b + self.batch_size]))
        return np.concatenate(out)

    def score_images(self, items: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
        feats = self._features([load_rgb(it["path"]) for it in items])
        self._save_chunk({it["sha256"]: f.astype(np.float32) for it, f in zip(items, feats)})
        return [{"feature": it["sha256"]} for it in items]

    def _reference_paths(self) -> list[Path]:
        from erasure_eval.generate import read_manifest

        try:
            root, _, recs = read_manifest(self.reference)
        except FileNotFoundError as err:
            raise MetricError(f"reference folder for {self.name}: {err}") from err
        return [root / r["file"] for r in recs]

    def _reference_stats(self, items: Sequence[dict[str, Any]]) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
        from erasure.io import load_safetensors

        paths = self._reference_paths()
        key = hashlib.sha256((_dir_fingerprint(paths) + repr(sorted(self.record_config().items()))).encode()).hexdigest()[:16]
        cache = self.workdir / f"{self.name}-ref-{key}.safetensors" if self.workdir else None
        info = {"reference": str(Path(self.reference).resolve()), "reference_images": len(paths), "stats_key": key}
        if cache is not None and cache.is_file():
            t, _ = load_safetensors(cache)
            return t["mu"].numpy(), t["sigma"].numpy(), info
        feats = self._features([load_rgb(p) for p in paths])
        mu, sigma = _stats(feats)
        if cache is not None:
            import torch

            from erasure.io import atomic_save_safetensors

            atomic_save_safetensors({"mu": torch.from_numpy(mu), "sigma": torch.from_numpy(sigma)}, cache)
        return mu, sigma, info

    def summarize(self, items: Sequence[dict[str, Any]], records: Sequence[dict[str, Any]]) -> dict[str, Any]:
        store = self._load_store()
        missing = [r["feature"] for r in records if r["feature"] not in store]
        if missing:
            raise MetricError(f"{len(missing)} cached {self.name} features are missing; re-run with --overwrite")
        feats = np.stack([store[r["feature"]].astype(np.float64) for r in records])
        mu1, s1 = _stats(feats)
        mu2, s2, info = self._reference_stats(items)
        val = frechet_distance(mu1, s1, mu2, s2)
        return {self.name: val, "images": len(records), **info,
                "note": "Frechet distances are biased upwards for small sets; compare equal-size sets only"}

    def params(self) -> dict[str, Any]:
        return {"reference": self.reference}


@register_metric("fid")
class FIDMetric(_FrechetBase):
    """FID against ``--reference`` with user-supplied Inception weights (``--weights``)."""

    name: ClassVar[str] = "fid"

    def __init__(self, reference: str | None = None, weights: str | None = None, device: str = "cpu", **kw: Any) -> None:
        if not weights:
            InceptionFeatures(weights or "", device)  # raises the clear error
        super().__init__(reference, weights, device, **kw)

    def extractor(self):
        if self._extractor is None:
            self._extractor = InceptionFeatures(self.weights, self.device)
        return self._extractor

    def record_config(self) -> dict[str, Any]:
        from erasure.io import file_sha256

        if not hasattr(self, "_rconf"):
            self._rconf = {"network": "inception_v3_pool3", "weights": os.path.basename(self.weights),
                           "weights_sha256": file_sha256(self.weights)}
        return self._rconf


@register_metric("judge_fd")
class JudgeFDMetric(_FrechetBase):
    """Frechet distance in the shapes judge's feature space (offline; ``--reference`` folder or ``render``)."""

    name: ClassVar[str] = "judge_fd"

    def __init__(self, reference: str | None = "render", weights: str | None = None, device: str = "cpu",
                 judge_obj: Any = None, **kw: Any) -> None:
        super().__init__(reference or "render", weights, device, **kw)
        self._judge_obj = judge_obj
        self.needs_manifest = self.reference == "render"  # type: ignore[misc]

    def extractor(self):
        if self._extractor is None:
            self._extractor = JudgeFeatures(self.weights, self.device, self._judge_obj)
        return self._extractor

    def record_config(self) -> dict[str, Any]:
        from erasure_eval.object_acc import ShapesJudge

        return {"network": "shapes_judge_features", **ShapesJudge(self._judge_obj, self.weights).record_config()}

    def _reference_stats(self, items: Sequence[dict[str, Any]]):
        if self.reference != "render":
            return super()._reference_stats(items)
        from erasure.shapes import render

        imgs = []
        for it in items:
            ex = it.get("extra") or {}
            if not all((ex.get(k) or "").strip() for k in ("shape", "color", "fill")):
                continue
            size = int(it.get("height") or 64)
            imgs.append(render(ex["shape"], ex["color"], ex["fill"], int(it.get("seed") or 0), size=size))
        if len(imgs) < 2:
            raise MetricError("--reference render needs prompt rows with shape, color and fill columns")
        mu, sigma = _stats(self._features(imgs))
        return mu, sigma, {"reference": "render (each row's own shape/color/fill, row seed)", "reference_images": len(imgs)}
