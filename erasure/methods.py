"""Registry of diffusion erasure methods. A method is one module: its config class and one :func:`register_method`.

Two shapes of method:

* **loss**: ``loss(ctx, batch) -> dict[str, Tensor]`` with a ``"loss"`` entry. The engine owns the loop: it
  generates Df/Dr, computes the saliency mask if the method needs one, and runs masked optimizer steps
  (SalUn, RL, ESD).
* **run**: ``run(ctx) -> dict[str, Tensor]``: the method edits ``ctx.unet`` itself, in closed form or in its own
  loop, and returns the new values of the parameters it changed by ``unet.state_dict()`` name (UCE, RECE), or
  by ``text_encoder.`` + the text encoder's name (salun-adv).

A method's own knobs are the fields of its :class:`MethodConfig` subclass; they sit under
``EraseConfig.method_args`` and become CLI flags and app form controls (labels, limits and help from the
fields' metadata). Adding a method touches its module and the method test table, nothing else. Methods
outside this package load as plugins (:func:`load_plugins`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

from erasure.jsonconfig import JsonConfig
from erasure.registry import Registry

__all__ = ["MethodConfig", "MethodSpec", "METHODS", "register_method", "get_method", "LEGACY_KEYS", "load_plugins"]


@dataclass
class MethodConfig(JsonConfig):
    """Base class of a method's own knobs; subclasses are dataclasses with ``field(help=...)`` fields.

    ``cli_prefix`` puts the method's flags under a prefix (ESD: ``--esd-negative-guidance``); fields that
    several methods share keep one flag (``--alpha`` for SalUn and RL).
    """

    cli_prefix: ClassVar[str] = ""

    def __post_init__(self) -> None:
        self.check_fields()

    def uses_retain(self) -> bool:
        """Whether the method trains on Dr (so Dr is generated and retain prompts are required)."""
        return False

    def uses_retain_prompts(self) -> bool:
        """Whether the method reads the concepts' retain prompts (so the automatic retain and neighbour sets are
        built for it): every method that trains on Dr, and closed-form edits that preserve prompts (UCE)."""
        return self.uses_retain()

    def tune_grid(self, cfg) -> list[dict] | None:
        """The ordered candidate settings ``--tune`` tries for this method (the first is the config's own, ``{}``):
        keys are this config's fields, ``EraseConfig`` fields or ``neighbour_weight``. ``None``: the trainer's grid
        over learning rate, retain weight and mask ratio (:func:`erasure.auto.tune.candidates`)."""
        return None

    def needs_frozen_unet(self) -> bool:
        """Whether the method needs a frozen copy of the original UNet (teacher)."""
        return False


@dataclass(frozen=True)
class MethodSpec:
    """How the engine runs one erasure method.

    Args:
        name (`str`): the method id (``salun``, ``esd-x``).
        config_cls (`type[MethodConfig]`): the method's own config dataclass.
        description (`str`): one line for ``erasure methods`` and the app.
        label (`str`): the app's label (defaults to ``name``).
        paper (`str`): the paper link.
        loss / run: exactly one; see the module docstring.
        needs_mask (`bool`): train only inside a SalUn saliency mask (a ``run`` method computes it, writes
            ``mask.safetensors`` into ``ctx.run.partial`` and sets ``ctx.mask``).
        needs_images (`bool`): generate and encode Df (and Dr when the config uses retain data).
        trainable (`str`, *optional*): forced parameter filter (full/xattn/noxattn); None = the config's choice.
        families (`tuple[str]`): the model families (:mod:`erasure.backbones`) the method applies to.
    """

    name: str
    config_cls: type[MethodConfig]
    description: str
    label: str = ""
    paper: str = ""
    loss: Callable[[Any, Any], dict[str, Any]] | None = None
    run: Callable[[Any], dict[str, Any]] | None = None
    needs_mask: bool = False
    needs_images: bool = True
    trainable: str | None = None
    families: tuple[str, ...] = ("sd", "sdxl", "sd3", "flux")

    def __post_init__(self) -> None:
        if (self.loss is None) == (self.run is None):
            raise ValueError(f"method {self.name!r}: give exactly one of loss= (per step) or run= (whole edit)")
        if not (isinstance(self.config_cls, type) and issubclass(self.config_cls, MethodConfig)):
            raise ValueError(f"method {self.name!r}: config_cls must subclass MethodConfig")
        if not self.label:
            object.__setattr__(self, "label", self.name)

    @property
    def shape(self) -> str:
        return "loss" if self.loss is not None else "run"

    @property
    def closed_form(self) -> bool:
        """An edit computed in one go from prompts (UCE, RECE): no images, no optimizer, no steps or learning rate."""
        return self.run is not None and not self.needs_images

    def default_args(self) -> MethodConfig:
        return self.config_cls()


METHODS: Registry[MethodSpec] = Registry("method")

LEGACY_KEYS: dict[str, str] = {
    "alpha": "alpha",
    "retain_loss": "retain_loss",
    "esd_negative_guidance": "negative_guidance",
    "esd_sample_steps": "sample_steps",
}
"""Top-level ``EraseConfig`` keys of run.json files and presets written before ``method_args`` existed, and
the method field each became (a key the chosen method does not have is dropped)."""


def register_method(spec: MethodSpec) -> MethodSpec:
    """Add a method to :data:`METHODS` (lowercase unique names; see :class:`erasure.registry.Registry`)."""
    names = {f.name for f in dataclasses.fields(spec.config_cls)}
    reserved = names & _generic_fields()
    if reserved:
        raise ValueError(f"method {spec.name!r}: field(s) {sorted(reserved)} clash with EraseConfig fields")
    return METHODS.register(spec.name, spec)


def get_method(name: str) -> MethodSpec:
    return METHODS.lookup(name)


def _generic_fields() -> set[str]:
    from erasure.config import EraseConfig

    return {f.name for f in dataclasses.fields(EraseConfig)}


def load_plugins(environ: dict[str, str] | None = None) -> list[str]:
    """Import third-party methods: modules named in ``SALUN_ERASURE_PLUGINS`` (comma-separated) and the
    ``salun_erasure.methods`` entry points of installed packages. Each module registers its methods on import."""
    import importlib
    import os
    from importlib.metadata import entry_points

    env = os.environ if environ is None else environ
    names = [m.strip() for m in env.get("SALUN_ERASURE_PLUGINS", "").split(",") if m.strip()]
    for name in names:
        importlib.import_module(name)
    for ep in entry_points(group="salun_erasure.methods"):
        ep.load()
        names.append(ep.value)
    return names


# built-in methods register themselves on import, then plugins
from erasure.diffusion import methods as _builtin  # noqa: E402,F401

load_plugins()
