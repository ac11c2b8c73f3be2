"""Orchestration: data, cached original model, saved split, one method run -> one JSON record."""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from erasure.classification.config import SetupConfig, TrainRecipe
from erasure.classification.data import DatasetBundle, Split, load_dataset, make_split
from erasure.classification.engine import Progress, accuracy, seed_generator, shuffled_batches, train_loop
from erasure.classification.methods import METHODS, UnlearnContext, get_method
from erasure.classification.metrics import evaluate_unlearning
from erasure.classification.models import Classifier, build_model, load_checkpoint, save_checkpoint
from erasure.classification.presets import METHOD_PRESETS, train_recipe_for
from erasure.io import atomic_write_json, environment_info, read_json

logger = logging.getLogger(__name__)

__all__ = ["Workspace", "resolve_method_config", "short_hash", "run_method"]


def short_hash(data: Any) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:10]


def resolve_method_config(name: str, dataset: str, scenario: str, presets: bool = True,
                          overrides: dict[str, Any] | None = None):
    """The method's config: paper defaults, then the data set's preset (if ``presets``), then ``overrides``."""
    spec = get_method(name)
    data: dict[str, Any] = {}
    if presets:
        data.update(METHOD_PRESETS.get(dataset, {}).get(scenario, {}).get(name, {}))
    data.update(overrides or {})
    return spec.config_cls.from_dict(data)


@dataclass
class Workspace:
    """Loaded data plus the cache of original models and splits for one :class:`SetupConfig`.

    Args:
        setup (`SetupConfig`): data set, model and scenario.
        bundle (`DatasetBundle`, *optional*): pre-loaded data (tests pass tiny data sets here).
        recipe (`TrainRecipe`, *optional*): the original recipe (default: the data set's, with the setup's overrides).
    """

    setup: SetupConfig
    bundle: DatasetBundle
    recipe: TrainRecipe
    cache_dir: Path

    @classmethod
    def create(cls, setup: SetupConfig, bundle: DatasetBundle | None = None,
               recipe: TrainRecipe | None = None) -> Workspace:
        if bundle is None:
            bundle = load_dataset(setup.dataset, setup.data_root, setup.download, setup.image_size, setup.train_split)
        if recipe is None:
            recipe = train_recipe_for(setup.dataset, {
                "epochs": setup.train_epochs, "lr": setup.train_lr, "batch_size": setup.train_batch_size,
                "weight_decay": setup.train_weight_decay})
        return cls(setup=setup, bundle=bundle, recipe=recipe, cache_dir=Path(setup.cache_dir).expanduser())

    # ------------------------------------------------------------------ model
    def make_model(self, seed: int) -> Classifier:
        b = self.bundle
        return build_model(self.setup.model, b.num_classes, b.in_channels, b.mean, b.std, seed=seed)

    def original_key(self, seed: int) -> dict[str, Any]:
        b = self.bundle
        return {"dataset": b.name, "image_size": b.image_size, "n_train": len(b.train), "model": self.setup.model,
                "recipe": self.recipe.to_dict(), "seed": int(seed)}

    def original_path(self, seed: int) -> Path:
        b = self.bundle
        key = self.original_key(seed)
        return self.cache_dir / "originals" / f"{b.name}-{b.image_size}px" / (
            f"{self.setup.model}-{short_hash(key)}-seed{seed}.safetensors")

    def original(self, seed: int, progress: Progress | None = None) -> tuple[Classifier, dict[str, Any]]:
        """The original model for ``seed``: ``--original`` if given, else cached, else trained and cached."""
        model = self.make_model(seed)
        if self.setup.original:
            extra = load_checkpoint(model, self.setup.original)
            return model, {"path": str(self.setup.original), "cached": True, **extra}
        path = self.original_path(seed)
        if path.is_file():
            extra = load_checkpoint(model, path)
            logger.info("original model (seed %d) from cache %s", seed, path)
            return model, {"path": str(path), "cached": True, **extra}
        logger.info("training the original model (seed %d, %d epochs)", seed, self.recipe.epochs)
        t0 = time.perf_counter()
        self.train_model(model, self.bundle.train, seed, self.recipe, progress)
        dt = time.perf_counter() - t0
        info = {"key": self.original_key(seed), "train_time_s": dt,
                "train_acc": accuracy(model, self.bundle.train), "test_acc": accuracy(model, self.bundle.test)}
        save_checkpoint(model, path, extra=info)
        atomic_write_json(path.with_suffix(".json"), {**info, **environment_info()})
        logger.info("original model: train %.2f%%, test %.2f%% (%.1f s)", info["train_acc"], info["test_acc"], dt)
        return model, {"path": str(path), "cached": False, **info}

    def train_model(self, model: torch.nn.Module, data, seed: int, recipe: TrainRecipe,
                    progress: Progress | None = None) -> None:
        train_loop(model, shuffled_batches(data, recipe.batch_size, seed_generator(seed, 1)),
                   lambda m, x, y: F.cross_entropy(m(x), y), epochs=recipe.epochs, lr=recipe.lr,
                   momentum=recipe.momentum, weight_decay=recipe.weight_decay, schedule=recipe.schedule,
                   augment=seed_generator(seed, 2) if recipe.augment else None, progress=progress)

    # ------------------------------------------------------------------ split
    def split(self, seed: int, save_to: Path | None = None) -> Split:
        """The forget/retain split for ``seed`` (saved under the cache, and to ``save_to`` when given)."""
        s, b = self.setup, self.bundle
        split = make_split(b.name, b.train.y, b.num_classes, s.scenario, seed,
                           s.forget_fraction if s.scenario == "random" else None,
                           s.forget_class if s.scenario == "class" else ())
        tag = (f"random{s.forget_fraction:g}" if s.scenario == "random"
               else "class" + "-".join(map(str, split.forget_classes)))
        path = self.cache_dir / "splits" / f"{b.name}-{len(b.train)}-{tag}-seed{seed}.json"
        if path.is_file():
            cached = Split.load(path)
            if cached.to_dict() != split.to_dict():
                raise ValueError(f"cached split {path} differs from the one rebuilt from seed {seed}; delete it")
        else:
            split.save(path)
        if save_to is not None:
            split.save(save_to)
        return split

    # ------------------------------------------------------------------ run
    def context(self, split: Split, seed: int, progress: Progress | None = None,
                artifacts_dir: Path | None = None) -> UnlearnContext:
        b = self.bundle
        return UnlearnContext(forget=b.train.subset(split.forget), retain=b.train.subset(split.retain),
                              num_classes=b.num_classes, seed=seed, make_model=lambda: self.make_model(seed),
                              train_recipe=self.recipe, augment=self.recipe.augment, progress=progress,
                              artifacts_dir=artifacts_dir)

    def evaluate(self, model: torch.nn.Module, split: Split, seed: int) -> dict[str, float]:
        return evaluate_unlearning(model, self.bundle.train, self.bundle.test, split, seed=seed,
                                   mia_feature=self.setup.mia_feature, batch_size=self.setup.eval_batch_size)


def run_method(
    ws: Workspace,
    method: str,
    cfg: Any,
    seed: int,
    original: Classifier,
    split: Split,
    progress: Progress | None = None,
    artifacts_dir: Path | None = None,
) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Run one method on a copy of ``original`` and evaluate it.

    Returns:
        `(model, record)`: the unlearned model and its JSON record (UA, RA, TA, MIA_efficacy, MIA_auc, RTE_s, ...).
    """
    spec = METHODS[method]
    model = copy.deepcopy(original)
    ctx = ws.context(split, seed, progress, artifacts_dir)
    torch.manual_seed(seed)  # methods use explicit generators; this pins any library default-RNG use
    t0, c0 = time.perf_counter(), time.process_time()
    model = spec.fn(model, ctx, cfg)
    rte, rte_cpu = time.perf_counter() - t0, time.process_time() - c0
    metrics = ws.evaluate(model, split, seed)
    s = ws.setup
    record = {
        "method": method, "seed": int(seed), "scenario": s.scenario, "dataset": s.dataset, "model": s.model,
        "forget_fraction": split.forget_fraction, "forget_classes": split.forget_classes,
        "n_forget": len(split.forget), "n_retain": len(split.retain),
        **{k: float(v) for k, v in metrics.items()}, "RTE_s": rte, "RTE_cpu_s": rte_cpu,
        "threads": torch.get_num_threads(),
        "config": cfg.to_dict(), "train_recipe": ws.recipe.to_dict(), "mia_feature": s.mia_feature,
    }
    return model, record


def load_records(path: Path) -> list[dict[str, Any]]:
    return read_json(path) if path.is_file() else []
