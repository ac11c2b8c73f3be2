"""Metric registry and the object / CLIP / Frechet-distance metrics on small offline models."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # effective only if torch is not imported yet

import hashlib  # noqa: E402
import json  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from erasure_eval.base import METRICS, MetricError, get_metric, register_metric, score_folder  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SPECS = [("circle", "red", "solid"), ("circle", "blue", "striped"), ("square", "red", "dotted"),
         ("star", "green", "outline"), ("square", "blue", "solid"), ("star", "red", "striped")]


def _shapes_folder(tmp_path: Path, specs=SPECS, size: int = 64) -> Path:
    """A folder in the manifest layout, with rendered shapes standing in for generated images."""
    from erasure.shapes import render

    root = tmp_path / "shapes"
    (root / "images").mkdir(parents=True)
    lines = []
    for i, (s, c, f) in enumerate(specs):
        render(s, c, f, seed=i, size=size).save(root / "images" / f"{i}_0.png")
        lines.append(json.dumps({"file": f"images/{i}_0.png", "case_number": str(i), "sample": 0, "seed": i,
                                 "prompt": f"a {f} {c} {s}", "height": size,
                                 "extra": {"shape": s, "color": c, "fill": f}}))
    (root / "manifest.jsonl").write_text("\n".join(lines) + "\n")
    return root


class TableJudge:
    """A judge that answers from a table keyed by image content (to test the metric's bookkeeping)."""

    fingerprint = "table-judge-v1"

    def __init__(self, answers: dict[str, dict]):
        self.answers = answers

    def predict(self, images):
        return [dict(self.answers[hashlib.sha256(im.tobytes()).hexdigest()]) for im in images]


def test_registry_lists_metrics_and_rejects_duplicates():
    import erasure_eval.metrics  # noqa: F401

    assert {"nudenet", "object", "clip", "fid", "judge_fd"} <= set(METRICS)
    with pytest.raises(ValueError, match="already registered"):
        register_metric("nudenet")(type("X", (), {}))
    with pytest.raises(ValueError, match="lowercase"):
        register_metric("Bad-Name")
    with pytest.raises(MetricError, match="unknown metric"):
        get_metric("nope")


def test_python_dash_m_eval_lists_metrics():
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "erasure_eval", "metrics"], capture_output=True, text=True, cwd=REPO,
                         timeout=120, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert out.returncode == 0, out.stderr
    assert {"nudenet", "object", "clip", "fid", "judge_fd"} <= {line.split()[0] for line in out.stdout.splitlines()}


def test_accuracy_tables_forget_and_retain():
    from erasure_eval.object_acc import accuracy_tables

    targets = [{"shape": "circle", "color": "red"}, {"shape": "circle"}, {"shape": "square"}, {"shape": "star"}]
    preds = [{"shape": "square", "color": "red"}, {"shape": "circle"}, {"shape": "square"}, {"shape": "circle"}]
    out = accuracy_tables(targets, preds, [("shape", "circle")])
    assert out["forget"] == {"classes": ["shape=circle"], "images": 2, "correct": 1, "accuracy": 0.5}
    assert out["retain"] == {"images": 2, "correct": 1, "accuracy": 0.5}
    assert out["attributes"]["shape"]["per_class"]["circle"]["accuracy"] == 0.5
    assert out["attributes"]["color"] == {"images": 1, "correct": 1, "accuracy": 1.0,
                                          "per_class": {"red": {"images": 1, "correct": 1, "accuracy": 1.0}}}


def test_object_metric_with_pluggable_shapes_judge(tmp_path):
    from PIL import Image

    from erasure_eval.object_acc import ObjectAccuracyMetric

    root = _shapes_folder(tmp_path)
    answers = {}
    for i, (s, c, _f) in enumerate(SPECS):
        with Image.open(root / "images" / f"{i}_0.png") as im:
            key = hashlib.sha256(im.convert("RGB").tobytes()).hexdigest()
        pred_shape = "square" if (s == "circle" and i == 0) else s  # circle 0 erased, circle 1 still drawn
        answers[key] = {"shape": pred_shape, "color": c, "fill": "solid", "shape_conf": 0.9}
    metric = ObjectAccuracyMetric(judge="shapes", forget=["shape=circle"], judge_obj=TableJudge(answers))
    res = score_folder(root, metric)
    s = res["summary"]
    assert s["forget"]["accuracy"] == 0.5 and s["retain"]["accuracy"] == 1.0
    assert s["attributes"]["color"]["accuracy"] == 1.0 and s["attributes"]["fill"]["correct"] == 2
    assert res["records"][0]["shape_conf"] == 0.9
    assert (root / "scores" / "object-shapes.json").is_file()
    # a bare value is resolved to its attribute
    metric2 = ObjectAccuracyMetric(judge="shapes", forget=["red"], judge_obj=TableJudge(answers))
    assert score_folder(root, metric2)["summary"]["forget"]["classes"] == ["color=red"]
    # without --forget, the run's concept names that name a class are the forget classes
    metric3 = ObjectAccuracyMetric(judge="shapes", judge_obj=TableJudge(answers))
    metric3.set_generation({"concepts": [{"name": "circle"}, {"name": "nudity"}]})
    targets = [metric3.judge.targets({"extra": {"shape": s, "color": c, "fill": f}}) for s, c, f in SPECS]
    assert metric3._forget_pairs([], targets) == [("shape", "circle")]
    # the report draws forget vs retain accuracy
    from erasure_eval.report import build_report

    summary = build_report([root], tmp_path / "report")
    assert (tmp_path / "report" / "object_accuracy.png").is_file()
    assert summary["table"][0]["object-shapes.forget_accuracy"] == 1.0  # the last scoring (forget=red) is reported
    with pytest.raises(MetricError, match="matches no target"):
        score_folder(root, ObjectAccuracyMetric(judge="shapes", forget=["hexagon"], judge_obj=TableJudge(answers)))


def test_object_metric_needs_a_manifest(tmp_path):
    from erasure_eval.object_acc import ObjectAccuracyMetric

    root = _shapes_folder(tmp_path)
    (root / "manifest.jsonl").unlink()
    with pytest.raises(MetricError, match="needs the prompts"):
        score_folder(root, ObjectAccuracyMetric(judge="shapes", judge_obj=TableJudge({})))


@pytest.mark.skipif(not (REPO / "models" / "shapes-judge.safetensors").is_file(), reason="shapes judge not trained yet")
def test_real_shapes_judge_on_rendered_images(tmp_path):
    from erasure_eval.object_acc import ObjectAccuracyMetric

    root = _shapes_folder(tmp_path)
    res = score_folder(root, ObjectAccuracyMetric(judge="shapes", forget=["shape=circle"]))
    s = res["summary"]
    assert s["attributes"]["shape"]["accuracy"] >= 0.8 and s["attributes"]["color"]["accuracy"] >= 0.8
    assert s["forget"]["images"] == 2 and s["retain"]["images"] == 4
    assert res["record_config"]["weights_sha256"]
    from erasure_eval.fid import JudgeFDMetric

    fd = score_folder(root, JudgeFDMetric(reference="render"))  # offline FD with the shipped judge
    assert fd["summary"]["judge_fd"] == pytest.approx(0.0, abs=1e-3) and fd["record_config"]["weights_sha256"]


def test_resnet50_judge_with_user_weights(tmp_path):
    import torch
    from torchvision.models import resnet50

    from erasure_eval.object_acc import ObjectAccuracyMetric

    with pytest.raises(MetricError, match="needs ImageNet weights"):
        ObjectAccuracyMetric(judge="resnet50")
    torch.manual_seed(0)
    w = tmp_path / "r50.pth"
    torch.save(resnet50(weights=None).state_dict(), w)
    root = _shapes_folder(tmp_path, SPECS[:2])
    lines = [json.loads(x) for x in (root / "manifest.jsonl").read_text().splitlines()]
    for rec, cls in zip(lines, ["tench", "English springer"]):
        rec["extra"] = {"class": cls}
    (root / "manifest.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    m = ObjectAccuracyMetric(judge="resnet50", weights=str(w), forget=["tench"])
    res = score_folder(root, m)
    assert all(0 <= r["label"] < 1000 and len(r["top5"]) == 5 for r in res["records"])
    assert res["summary"]["forget"]["images"] == 1 and res["summary"]["retain"]["images"] == 1
    assert m.judge.class_index("garbage truck") == 569 and m.judge.class_index("tench") == 0


def test_clip_score_offline_with_weights_file(tmp_path):
    import open_clip
    import torch

    from erasure_eval.clip_score import ClipScoreMetric

    with pytest.raises(MetricError, match="needs weights"):
        ClipScoreMetric(arch="ViT-B-32")
    with pytest.raises(MetricError, match="HF_HUB_OFFLINE"):
        ClipScoreMetric(arch="ViT-B-32", pretrained="openai")._load()
    cfg = {"embed_dim": 16,
           "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 16, "head_width": 16},
           "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
    cfg_path = tmp_path / "tiny-clip-test.json"
    cfg_path.write_text(json.dumps(cfg))
    open_clip.add_model_config(str(cfg_path))
    torch.manual_seed(0)
    w = tmp_path / "tiny-clip.pt"
    torch.save(open_clip.create_model("tiny-clip-test").state_dict(), w)
    root = _shapes_folder(tmp_path, SPECS[:3])
    res = score_folder(root, ClipScoreMetric(arch="tiny-clip-test", weights=str(w), config=str(cfg_path)))
    vals = [r["clip_score"] for r in res["records"]]
    assert len(vals) == 3 and all(0 <= v <= 100 for v in vals)
    assert res["summary"]["clip_score"] == pytest.approx(sum(vals) / 3)
    assert res["record_config"]["weights_sha256"]


def test_frechet_distance_math():
    from erasure_eval.fid import frechet_distance

    rng = np.random.default_rng(0)
    x = rng.normal(size=(500, 4))
    mu, s = x.mean(0), np.cov(x, rowvar=False)
    assert frechet_distance(mu, s, mu, s) == pytest.approx(0.0, abs=1e-6)
    # 1-d Gaussians: (m1-m2)^2 + (s1-s2)^2
    assert frechet_distance(np.array([0.0]), np.array([[4.0]]), np.array([3.0]), np.array([[1.0]])) == pytest.approx(10.0)
    # equals the textbook formula with scipy's sqrtm
    from scipy import linalg

    y = rng.normal(size=(300, 6)) @ rng.normal(size=(6, 6))
    x = rng.normal(size=(300, 6))
    s1, s2 = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    m1, m2 = x.mean(0), y.mean(0)
    ref = ((m1 - m2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(linalg.sqrtm(s1 @ s2).real)
    assert frechet_distance(m1, s1, m2, s2) == pytest.approx(ref, rel=1e-8)


def _random_inception(variant: str = "fid", seed: int = 0):
    """A random Inception v3 whose activations keep their scale through the network (He-normal convolutions) and
    whose batch norms all differ from the identity, so a wrong layer, pooling or order changes the features."""
    import torch

    from erasure_eval.fid import build_fid_inception

    net = build_fid_inception(variant)
    g = torch.Generator().manual_seed(seed)
    for m in net.modules():
        if isinstance(m, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(m.weight, nonlinearity="relu", generator=g)
        elif isinstance(m, torch.nn.BatchNorm2d):
            m.weight.data.uniform_(0.5, 1.5, generator=g)
            m.bias.data.normal_(0.0, 0.1, generator=g)
            m.running_mean.normal_(0.0, 0.1, generator=g)
            m.running_var.uniform_(0.5, 1.5, generator=g)
    return net.eval()


def _pytorch_fid_features(state_dict, images, monkeypatch) -> np.ndarray:
    """2048-d pool3 features from pytorch-fid's own InceptionV3 (the reference this port follows), built with
    ``state_dict`` in place of its download."""
    import pytorch_fid.inception as pfi
    import torch

    monkeypatch.setattr(pfi, "load_state_dict_from_url", lambda *a, **k: state_dict)
    net = pfi.InceptionV3([pfi.InceptionV3.BLOCK_INDEX_BY_DIM[2048]]).eval()
    x = torch.stack([torch.from_numpy(np.array(im.convert("RGB"))).permute(2, 0, 1) for im in images]).float() / 255
    with torch.no_grad():
        return net(x)[0].flatten(1).double().numpy()


def test_fid_inception_port_matches_pytorch_fid_features(tmp_path, monkeypatch):
    """Same random weights, same images (64 px, so the resize to 299 is exercised): the same 2048-d features."""
    import torch

    from erasure.shapes import render
    from erasure_eval.fid import InceptionFeatures

    sd = _random_inception("fid").state_dict()
    torch.save(sd, tmp_path / "w.pth")
    images = [render(s, c, f, seed=i, size=64) for i, (s, c, f) in enumerate(SPECS[:3])]
    ours = InceptionFeatures(str(tmp_path / "w.pth"))(images)
    ref = _pytorch_fid_features(sd, images, monkeypatch)
    assert ours.shape == ref.shape == (3, 2048)
    assert ref.std(axis=0).mean() > 0.1  # features that differ between images, not a collapsed network
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-5)

    # torchvision's ImageNet layout (1000 classes): the features are torchvision's own avgpool output
    net = _random_inception("torchvision")
    torch.save(net.state_dict(), tmp_path / "tv.pth")
    ext = InceptionFeatures(str(tmp_path / "tv.pth"))
    assert ext.variant == "torchvision"
    pooled = []
    net.avgpool.register_forward_hook(lambda m, i, o: pooled.append(o.flatten(1)))
    x = torch.stack([torch.from_numpy(np.array(im)).permute(2, 0, 1) for im in images]).float() / 255
    with torch.no_grad():
        net(2 * torch.nn.functional.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False) - 1)
    np.testing.assert_allclose(ext(images), pooled[0].double().numpy(), rtol=0, atol=1e-5)


def test_fid_metric_against_a_reference_folder(tmp_path, monkeypatch):
    """The metric's FID between two different folders equals the Frechet distance of pytorch-fid's features of
    exactly those images (generated set vs reference set, not one of them twice), and its caches are written."""
    import torch

    from erasure.shapes import render
    from erasure_eval.fid import FIDMetric

    with pytest.raises(MetricError, match="needs Inception weights"):
        FIDMetric(reference=str(tmp_path))
    sd = _random_inception("fid").state_dict()
    w = tmp_path / "inception-fid.pth"
    torch.save(sd, w)
    gen = _shapes_folder(tmp_path, SPECS[:3])
    ref_dir = tmp_path / "reference"
    ref_dir.mkdir()
    ref_images = [render(s, c, f, seed=10 + i, size=64) for i, (s, c, f) in enumerate(SPECS[2:])]
    for i, im in enumerate(ref_images):
        im.save(ref_dir / f"r{i}.png")
    res = score_folder(gen, FIDMetric(reference=str(ref_dir), weights=str(w)))

    from PIL import Image

    gen_images = [Image.open(gen / "images" / f"{i}_0.png").convert("RGB") for i in range(3)]
    a, b = _pytorch_fid_features(sd, gen_images, monkeypatch), _pytorch_fid_features(sd, ref_images, monkeypatch)
    # FID = |mu_a - mu_b|^2 + Tr(S_a) + Tr(S_b) - 2 Tr sqrt(S_a S_b), with S = X^T X / (n - 1) for the centred
    # features X; S_a S_b has the nonzero eigenvalues of the 3x3 (A B^T)(A B^T)^T / ((n_a - 1)(n_b - 1))
    A, B = a - a.mean(0), b - b.mean(0)
    C = A @ B.T
    cross = np.sqrt(np.clip(np.linalg.eigvalsh(C @ C.T / ((len(a) - 1) * (len(b) - 1))), 0, None)).sum()
    want = (((a.mean(0) - b.mean(0)) ** 2).sum() + (A**2).sum() / (len(a) - 1) + (B**2).sum() / (len(b) - 1)
            - 2 * cross)
    # rel 1e-5: the 2048-d eigensolver's round-off on the ~2045 zero eigenvalues adds ~5e-4 to Tr sqrt (scipy's
    # sqrtm differs from the exact value by as much)
    assert want > 1.0 and res["summary"]["fid"] == pytest.approx(want, rel=1e-5)
    assert res["summary"]["images"] == 3 and res["summary"]["reference_images"] == 4
    assert res["record_config"]["weights_sha256"]
    assert list((gen / "scores").glob("fid-ref-*.safetensors"))


@pytest.mark.weights("ERASURE_FID_WEIGHTS")
def test_fid_port_matches_pytorch_fid_on_the_real_weights(monkeypatch):
    """With pytorch-fid's pt_inception-2015-12-05-6726825d.pth at $ERASURE_FID_WEIGHTS: the same features."""
    import matplotlib.cbook as cbook
    import torch
    from PIL import Image

    from erasure_eval.fid import InceptionFeatures

    path = os.environ.get("ERASURE_FID_WEIGHTS", "")
    assert os.path.isfile(path), f"set ERASURE_FID_WEIGHTS to pytorch-fid's pt_inception-*.pth (got {path!r})"
    photo = Image.open(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)).convert("RGB")
    images = [photo, photo.rotate(90), photo.crop((100, 100, 400, 400))]
    ext = InceptionFeatures(path)
    assert ext.variant == "fid"
    sd = torch.load(path, map_location="cpu", weights_only=True)
    np.testing.assert_allclose(ext(images), _pytorch_fid_features(sd, images, monkeypatch), rtol=0, atol=1e-5)


def test_judge_feature_frechet_distance_offline(tmp_path):
    import torch

    from erasure.shapes.judge import Judge, JudgeNet, judge_config
    from erasure_eval.fid import JudgeFDMetric

    torch.manual_seed(0)
    judge = Judge(JudgeNet(), judge_config())
    judge.fingerprint = "random-judge"
    gen = _shapes_folder(tmp_path)
    same = score_folder(gen, JudgeFDMetric(reference=str(gen), judge_obj=judge))
    assert same["summary"]["judge_fd"] == pytest.approx(0.0, abs=1e-6)
    rendered = score_folder(gen, JudgeFDMetric(reference="render", judge_obj=judge))
    assert rendered["summary"]["judge_fd"] == pytest.approx(0.0, abs=1e-6)  # the images are these renders
    assert rendered["summary"]["reference_images"] == len(SPECS)
