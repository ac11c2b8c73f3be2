"""Classification backend: data, splits, configs and bad-input errors (CPU, offline)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from erasure.classification.config import ClsBenchConfig, ClsTrainConfig, ClsUnlearnConfig, TrainRecipe
from erasure.classification.data import Split, augment_batch, load_dataset, make_split
from erasure.classification.methods import METHODS
from erasure.classification.models import build_model, load_checkpoint, save_checkpoint


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


def test_digits_bundled(digits):
    assert digits.train.x.shape[1:] == (1, 8, 8) and len(digits.train) + len(digits.test) == 1797
    assert float(digits.train.x.min()) >= 0.0 and float(digits.train.x.max()) <= 1.0
    assert set(digits.test.y.tolist()) == set(range(10))


def test_upsampled_digits():
    b = load_dataset("digits", image_size=16)
    assert b.train.x.shape[-2:] == (16, 16) and b.image_size == 16


def test_split_deterministic_and_disjoint(digits, tmp_path):
    a = make_split("digits", digits.train.y, 10, "random", 3, 0.1)
    b = make_split("digits", digits.train.y, 10, "random", 3, 0.1)
    c = make_split("digits", digits.train.y, 10, "random", 4, 0.1)
    assert a.forget == b.forget and a.forget != c.forget
    assert len(a.forget) == round(0.1 * len(digits.train))
    assert not set(a.forget) & set(a.retain) and len(a.forget) + len(a.retain) == len(digits.train)
    a.save(tmp_path / "s.json")
    assert Split.load(tmp_path / "s.json") == a


def test_class_split(digits):
    s = make_split("digits", digits.train.y, 10, "class", 0, forget_classes=[3, 5])
    ys = digits.train.y
    assert set(ys[s.forget].tolist()) == {3, 5} and not ({3, 5} & set(ys[s.retain].tolist()))


@pytest.mark.parametrize("frac", [0.0, 1.0, -0.1, 1.5])
def test_bad_fraction(digits, frac):
    with pytest.raises(ValueError, match="forget fraction"):
        make_split("digits", digits.train.y, 10, "random", 0, frac)
    with pytest.raises(ValueError, match="forget fraction"):
        ClsBenchConfig(forget_fraction=frac)


def test_unknown_class(digits):
    with pytest.raises(ValueError, match="unknown class"):
        make_split("digits", digits.train.y, 10, "class", 0, forget_classes=[10])
    with pytest.raises(ValueError, match="unknown class"):
        ClsUnlearnConfig(scenario="class", forget_class=[12])
    with pytest.raises(ValueError, match="every class"):
        make_split("digits", digits.train.y, 10, "class", 0, forget_classes=list(range(10)))
    with pytest.raises(ValueError, match="forget-class"):
        ClsUnlearnConfig(scenario="class")


def test_data_root_without_dataset(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not contain cifar10"):
        load_dataset("cifar10", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_dataset("svhn", str(tmp_path / "nope"))
    with pytest.raises(ValueError, match="data-root"):
        load_dataset("cifar100", None)
    with pytest.raises(ValueError, match="unknown dataset"):
        load_dataset("mnist")


def test_checkpoint_other_architecture(tmp_path):
    cnn = build_model("small_cnn", 10, 1, (0.3,), (0.4,), seed=0)
    save_checkpoint(cnn, tmp_path / "cnn.safetensors", extra={"a": 1})
    resnet = build_model("resnet18", 10, 1, (0.3,), (0.4,), seed=0)
    with pytest.raises(ValueError, match="architecture 'small_cnn'"):
        load_checkpoint(resnet, tmp_path / "cnn.safetensors")
    other_head = build_model("small_cnn", 5, 1, (0.3,), (0.4,), seed=0)
    with pytest.raises(ValueError, match="shape"):
        load_checkpoint(other_head, tmp_path / "cnn.safetensors")
    same = build_model("small_cnn", 10, 1, (0.3,), (0.4,), seed=1)
    assert load_checkpoint(same, tmp_path / "cnn.safetensors") == {"a": 1}
    for k, v in cnn.state_dict().items():
        assert torch.equal(v, same.state_dict()[k])


def test_resnet18_cifar_stem():
    m = build_model("resnet18", 10, 3, (0.5,) * 3, (0.25,) * 3, seed=0)
    assert m.conv1.kernel_size == (3, 3) and m.conv1.stride == (1, 1)
    assert not any(isinstance(x, torch.nn.MaxPool2d) for x in m.modules())
    assert m(torch.rand(2, 3, 32, 32)).shape == (2, 10)
    assert m(torch.rand(2, 3, 8, 8)).shape == (2, 10)


def test_augment_shapes():
    x = torch.rand(5, 3, 8, 8)
    y = augment_batch(x, torch.Generator().manual_seed(0))
    assert y.shape == x.shape


CONFIGS = [ClsTrainConfig(), ClsUnlearnConfig(method="ga", method_args={"lr": 0.1}),
           ClsBenchConfig(scenario="class", forget_class=[2], methods=["salun,ga"], overrides={"ga": {"lr": 1.0}}),
           TrainRecipe()] + [spec.config_cls() for spec in METHODS.values()]


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: type(c).__name__)
def test_config_json_roundtrip(cfg, tmp_path):
    again = type(cfg).from_json(cfg.to_json())
    assert again == cfg
    cfg.save(tmp_path / "c.json")
    assert type(cfg).load(tmp_path / "c.json") == cfg
    for f in dataclasses.fields(cfg):
        assert f.metadata.get("help"), f"{type(cfg).__name__}.{f.name} has no help text"


def test_config_validation():
    with pytest.raises(ValueError):
        ClsUnlearnConfig(method="nope")
    with pytest.raises(ValueError):
        ClsBenchConfig(methods=["all", "ga"])
    with pytest.raises(ValueError):
        ClsBenchConfig(seeds=0)
    with pytest.raises(ValueError):
        METHODS["salun"].config_cls(mask_ratio=0.0)
    with pytest.raises(ValueError):
        METHODS["ft"].config_cls(lr=-1.0)
    with pytest.raises(ValueError, match="unknown field"):
        METHODS["ga"].config_cls.from_dict({"learning_rate": 1.0})
    assert ClsBenchConfig(methods=["salun,ga", "rl"]).methods == ["salun", "ga", "rl"]
