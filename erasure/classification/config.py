"""Config dataclasses of the classification backend: one per entry point, validated, JSON round-trip.

``TrainRecipe`` is the original model's training recipe (also Retrain's default). ``OptimConfig`` holds
the generic knobs every iterative method shares; each method's own config (``methods/<id>.py``) extends
it with the method knobs. ``ClsTrainConfig``, ``ClsUnlearnConfig`` and ``ClsBenchConfig`` are the
``erasure-cls train|unlearn|bench`` entry points; CLI flags are generated from their fields.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any, Literal

from erasure.jsonconfig import JsonConfig, field

__all__ = ["TrainRecipe", "OptimConfig", "SetupConfig", "ClsTrainConfig", "ClsUnlearnConfig", "ClsBenchConfig",
           "DEFAULT_CACHE_DIR", "SCHEDULES"]

DEFAULT_CACHE_DIR = "~/.cache/salun-erasure/cls"
SCHEDULES = ("constant", "cosine", "multistep")


def _check_optim(name: str, epochs: int | None, lr: float | None, batch_size: int | None, momentum: float | None,
                 weight_decay: float | None, schedule: str | None, optimizer: str | None = "sgd") -> None:
    if epochs is not None and (not isinstance(epochs, int) or epochs < 0):
        raise ValueError(f"{name}: epochs must be an integer >= 0, got {epochs!r}")
    if lr is not None and (not math.isfinite(float(lr)) or lr <= 0):
        raise ValueError(f"{name}: lr must be > 0, got {lr!r}")
    if batch_size is not None and (not isinstance(batch_size, int) or batch_size < 1):
        raise ValueError(f"{name}: batch_size must be an integer >= 1, got {batch_size!r}")
    if momentum is not None and not 0.0 <= momentum < 1.0:
        raise ValueError(f"{name}: momentum must be in [0, 1), got {momentum!r}")
    if weight_decay is not None and weight_decay < 0:
        raise ValueError(f"{name}: weight_decay must be >= 0, got {weight_decay!r}")
    if schedule is not None and schedule not in SCHEDULES:
        raise ValueError(f"{name}: schedule must be one of {SCHEDULES}, got {schedule!r}")
    if optimizer is not None and optimizer not in ("sgd", "adam", "adamw"):
        raise ValueError(f"{name}: optimizer must be sgd, adam or adamw, got {optimizer!r}")


@dataclass
class TrainRecipe(JsonConfig):
    """Recipe of the original model (and of Retrain unless overridden).

    Args:
        epochs (`int`), lr (`float`), batch_size (`int`), momentum (`float`), weight_decay (`float`):
            SGD settings.
        schedule (`str`, defaults to `"cosine"`): ``constant``, ``cosine`` (per step) or ``multistep``
            (x0.1 at 50% and 75% of the epochs, the reference's 91/136 of 182).
        augment (`bool`): random crop + flip on training batches (the CIFAR recipe).
    """

    epochs: int = field(182, help="training epochs")
    lr: float = field(0.1, help="learning rate")
    batch_size: int = field(256, help="batch size")
    momentum: float = field(0.9, help="SGD momentum")
    weight_decay: float = field(5e-4, help="weight decay")
    schedule: str = field("multistep", help="learning-rate schedule", choices=list(SCHEDULES))
    augment: bool = field(False, help="random crop + horizontal flip")

    def __post_init__(self) -> None:
        _check_optim("TrainRecipe", self.epochs, self.lr, self.batch_size, self.momentum, self.weight_decay,
                     self.schedule)
        if self.epochs < 1:
            raise ValueError("TrainRecipe: epochs must be >= 1")


@dataclass
class OptimConfig(JsonConfig):
    """Generic training knobs shared by the iterative unlearning methods (method knobs live in subclasses).

    Args:
        epochs (`int`, defaults to `10`): unlearning epochs.
        lr (`float`, defaults to `0.01`): learning rate.
        batch_size (`int`, defaults to `256`): batch size (the reference's).
        momentum (`float`, defaults to `0.9`), weight_decay (`float`, defaults to `5e-4`): SGD settings.
        optimizer (`str`, defaults to `"sgd"`): ``sgd``, ``adam`` or ``adamw``.
        schedule (`str`, defaults to `"constant"`): the reference never reaches its lr milestones in 10 epochs.
    """

    epochs: int = field(10, help="unlearning epochs")
    lr: float = field(0.01, help="learning rate")
    batch_size: int = field(256, help="batch size")
    momentum: float = field(0.9, help="SGD momentum")
    weight_decay: float = field(5e-4, help="weight decay (applied only where the update is allowed)")
    optimizer: str = field("sgd", help="optimizer", choices=["sgd", "adam", "adamw"])
    schedule: str = field("constant", help="learning-rate schedule", choices=list(SCHEDULES))

    def __post_init__(self) -> None:
        _check_optim(type(self).__name__, self.epochs, self.lr, self.batch_size, self.momentum, self.weight_decay,
                     self.schedule, self.optimizer)


@dataclass
class SetupConfig(JsonConfig):
    """Data set, model, forgetting scenario and original-model settings shared by every entry point."""

    dataset: str = field("digits", help="digits (offline, bundled), cifar10, cifar100 or svhn")
    data_root: str | None = field(None, help="folder holding the torchvision data set")
    download: bool = field(False, help="download a missing torchvision data set into --data-root")
    image_size: int | None = field(None, help="resize images to this side (e.g. 32 for upsampled digits)")
    train_split: Literal["official", "full"] = field(
        "official", help="CIFAR-10/100, SVHN: official (hold out the SalUn code's 10 percent per class, CIFAR-10 45,000 train) "
        "or full (all 50,000)")
    model: str = field("small_cnn", help="small_cnn or resnet18 (CIFAR stem)")
    scenario: Literal["random", "class"] = field("random", help="random-data or class-wise forgetting")
    forget_fraction: float = field(0.1, help="share of the training set forgotten (random scenario), in (0, 1)")
    forget_class: list[int] = field(default_factory=list, help="class(es) forgotten (class scenario)")
    train_epochs: int | None = field(None, help="original-model epochs (default: the data set's recipe)")
    train_lr: float | None = field(None, help="original-model learning rate (default: the data set's recipe)")
    train_batch_size: int | None = field(None, help="original-model batch size (default: the data set's recipe)")
    train_weight_decay: float | None = field(None, help="original-model weight decay (default: recipe)")
    original: str | None = field(None, help="original checkpoint (.safetensors) to load instead of training one")
    cache_dir: str = field(DEFAULT_CACHE_DIR, help="cache for original models and splits")
    presets: bool = field(True, help="apply the data set's method presets (off: the paper's CIFAR-10 defaults)")
    mia_feature: str = field("confidence", help="feature of the SVC membership attack",
                             choices=["confidence", "entropy", "m_entropy", "prob"])
    eval_batch_size: int = field(1024, help="batch size for evaluation")
    device: str = field("cpu", help="torch device")
    threads: int | None = field(None, help="torch CPU threads (default: torch's choice)")

    def __post_init__(self) -> None:
        from erasure.classification.data import DATASETS
        from erasure.classification.models import MODELS

        if self.dataset not in DATASETS:
            raise ValueError(f"unknown dataset {self.dataset!r}; known: {sorted(DATASETS)}")
        if self.model not in MODELS:
            raise ValueError(f"unknown model {self.model!r}; known: {sorted(MODELS)}")
        if self.train_split not in ("official", "full"):
            raise ValueError(f"train_split must be 'official' or 'full', got {self.train_split!r}")
        if self.scenario not in ("random", "class"):
            raise ValueError(f"scenario must be 'random' or 'class', got {self.scenario!r}")
        if isinstance(self.forget_class, int):
            raise ValueError("forget_class must be a list of integers")
        self.forget_class = [int(c) for c in self.forget_class]
        if self.scenario == "random":
            f = float(self.forget_fraction)
            if not (0.0 < f < 1.0) or math.isnan(f):
                raise ValueError(f"forget fraction must be in (0, 1), got {self.forget_fraction}")
            if self.forget_class:
                raise ValueError("--forget-class is for --scenario class")
        else:
            if not self.forget_class:
                raise ValueError("class-wise forgetting needs --forget-class K")
            n = DATASETS[self.dataset].num_classes
            bad = [c for c in self.forget_class if not 0 <= c < n]
            if bad:
                raise ValueError(f"unknown class(es) {bad}: {self.dataset} has classes 0..{n - 1}")
            if len(set(self.forget_class)) >= n:
                raise ValueError("cannot forget every class")
        _check_optim("setup", self.train_epochs, self.train_lr, self.train_batch_size, None,
                     self.train_weight_decay, None)
        if self.train_epochs is not None and self.train_epochs < 1:
            raise ValueError("train_epochs must be >= 1")
        if self.image_size is not None and self.image_size < 4:
            raise ValueError(f"image_size must be >= 4, got {self.image_size}")
        if self.eval_batch_size < 1:
            raise ValueError("eval_batch_size must be >= 1")
        if self.threads is not None and self.threads < 1:
            raise ValueError("threads must be >= 1")

    def setup_dict(self) -> dict[str, Any]:
        """Only the :class:`SetupConfig` fields (what identifies the data, model and scenario)."""
        names = {f.name for f in fields(SetupConfig)}
        return {k: v for k, v in self.to_dict().items() if k in names}


@dataclass
class ClsTrainConfig(SetupConfig):
    """``erasure-cls train``: train (or fetch from the cache) the original model for one seed."""

    seed: int = field(0, help="seed of the model initialisation and data order")
    out: str | None = field(None, help="also copy the checkpoint here (.safetensors)")


@dataclass
class ClsUnlearnConfig(SetupConfig):
    """``erasure-cls unlearn``: run one method on one seed and write a run directory."""

    method: str = field("salun", help="method id (see --list-methods)")
    seed: int = field(0, help="seed of the split, the original model and the method")
    method_args: dict[str, Any] = field(default_factory=dict, help="method config overrides (JSON object)",
                                        cli=False)
    out: str = field("runs/cls", help="run directory")

    def __post_init__(self) -> None:
        super().__post_init__()
        from erasure.classification.methods import METHODS

        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; known: {sorted(METHODS)}")
        if not isinstance(self.method_args, dict):
            raise ValueError("method_args must be a JSON object")


@dataclass
class ClsBenchConfig(SetupConfig):
    """``erasure-cls bench``: every method x seed, resumable, then the paper's table."""

    methods: list[str] = field(default_factory=lambda: ["all"], help="method ids, comma separated, or 'all'")
    seeds: int = field(5, help="number of seeds")
    first_seed: int = field(0, help="first seed (seeds are first_seed .. first_seed + seeds - 1)")
    overrides: dict[str, dict[str, Any]] = field(default_factory=dict, cli=False,
                                                 help="per-method config overrides {method: {key: value}}")
    out: str = field("bench/out/cls", help="output folder (results.json, table.csv/.md/.txt, plot)")
    plot: bool = field(True, help="write table.png")

    def __post_init__(self) -> None:
        super().__post_init__()
        from erasure.classification.methods import METHODS

        names: list[str] = []
        for item in self.methods:
            names.extend(s.strip() for s in str(item).split(",") if s.strip())
        if not names:
            raise ValueError("no methods given")
        if "all" in names:
            if len(names) > 1:
                raise ValueError("'all' cannot be combined with other method ids")
        else:
            bad = [m for m in names if m not in METHODS]
            if bad:
                raise ValueError(f"unknown method(s) {bad}; known: {sorted(METHODS)}")
        self.methods = names
        if self.seeds < 1:
            raise ValueError(f"seeds must be >= 1, got {self.seeds}")
        for m, ov in self.overrides.items():
            if m not in METHODS:
                raise ValueError(f"override for unknown method {m!r}")
            if not isinstance(ov, dict):
                raise ValueError(f"override for {m} must be an object")

    def method_ids(self) -> list[str]:
        from erasure.classification.methods import METHODS
        from erasure.classification.registry import ordered

        if self.methods == ["all"]:
            return ordered(METHODS)
        return ordered(self.methods)
