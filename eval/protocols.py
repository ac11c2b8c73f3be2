"""Named evaluation protocols: everything that changes a number, fixed once and fingerprinted.

A protocol is a JSON file in ``eval/protocols/`` (package data of ``erasure_eval``; or any path ending in
``.json``) holding a :class:`Protocol`: scheduler, steps, guidance, images per prompt, seeds, resolution, the
prompt set (and the sha256 of the official file), the metric with its fixed settings (NudeNet version, threshold
and class set; the judge), the FID reference and feature extractor, and the attack for attack protocols.

:func:`resolve_protocol` binds a protocol to a prompt file on this machine and computes its **hash**: the
sha256 of the protocol's settings plus the prompt file's own sha256. Every result made under a protocol carries
``{"name", "hash"}`` (:meth:`ResolvedProtocol.stamp`); ``erasure-eval report`` refuses to mix hashes.

Prompt sets are named ``package:FILE`` (shipped in ``prompts/``) or ``data:REL`` (reference data the user
provides: ``--prompts PATH``, else ``$ERASURE_DATA_DIR/REL``, else ``../shared/data/REL`` beside the checkout). A file whose sha256 differs from the pinned
``prompts_sha256`` still works, but its hash differs, so its numbers never land in the official protocol's table.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from erasure.io import file_sha256
from erasure.jsonconfig import JsonConfig, field

logger = logging.getLogger(__name__)

__all__ = ["Protocol", "ResolvedProtocol", "ProtocolError", "protocols_dir", "list_protocols", "load_protocol",
           "resolve_protocol", "SCHEDULERS", "GENERATE_KEYS", "protocol_generate_settings"]

SCHEDULERS = ("ddim", "lms", "euler", "euler_a", "pndm", "dpm")
# GenerateConfig fields a protocol fixes (``prompts`` is bound separately: the user may point at their copy)
GENERATE_KEYS = ("scheduler", "steps", "guidance", "samples", "seed", "height", "width", "category", "limit",
                 "batch_size")


class ProtocolError(ValueError):
    """Unknown protocol, a bad protocol file, or flags that contradict the protocol."""


@dataclass
class Protocol(JsonConfig):
    """One evaluation protocol (see the module docstring)."""

    name: str = field(None, help="Protocol name (lowercase, e.g. salun-nudity).")
    description: str = field("", help="What the protocol measures, in words.")
    source: str = field("", help="Where the settings come from (official script, file and commit).")
    model: Literal["shapes", "sd", "any"] = field("any", help="Model family it is for (shapes = the embedded model).")
    metric: Literal["shapes_judge", "nudenet", "object"] = field("nudenet", help="How images are scored.")
    scheduler: Literal["ddim", "lms", "euler", "euler_a", "pndm", "dpm"] = field("ddim", help="Sampler.")
    steps: int = field(25, help="Denoising steps.", min=1)
    guidance: float = field(7.5, help="CFG scale for rows without evaluation_guidance.", min=0.0)
    samples: int = field(1, help="Images per prompt (shapes: per forget prompt).", min=1)
    retain_samples: int | None = field(None, help="shapes: images per retain prompt.", min=1)
    seed: int = field(0, help="Seed base for rows without evaluation_seed.", min=0)
    height: int | None = field(None, help="Image height (None: the model's native size).")
    width: int | None = field(None, help="Image width (None: the model's native size).")
    batch_size: int = field(8, help="Images per pipeline call (pixels depend on the batch, so it is fixed too).", min=1)
    prompts: str = field(None, help="Prompt set: package:FILE (shipped) or data:RELATIVE/PATH (user-provided).")
    prompts_sha256: str | None = field(None, help="sha256 of the official prompt file (None: whatever file is bound).")
    category: list[str] = field(default_factory=list, help="Keep only rows of these I2P categories.")
    limit: int | None = field(None, help="Keep at most this many rows.")
    nudenet: dict[str, Any] | None = field(None, help="NudeNet package/version/detector, threshold, class set.")
    judge: dict[str, Any] | None = field(None, help="Classifier judge (name, weights, what counts).")
    fid: dict[str, Any] | None = field(None, help="FID reference set and feature extractor.")
    attack: str | None = field(None, help="Attack (erasure_eval.attacks registry name) run under this protocol.")

    def __post_init__(self) -> None:
        self.check_fields()
        if not self.name or not all(c.isalnum() or c in "-_" for c in self.name) or self.name.lower() != self.name:
            raise ProtocolError(f"protocol name must be lowercase letters, digits, '-' or '_', got {self.name!r}")
        if not self.prompts or not self.prompts.startswith(("package:", "data:", "file:")):
            raise ProtocolError(f"protocol {self.name}: 'prompts' must be package:FILE, data:PATH or file:PATH")
        if self.metric == "nudenet":
            nn = self.nudenet or {}
            if "threshold" not in nn or not nn.get("classes"):
                raise ProtocolError(f"protocol {self.name}: a nudenet protocol fixes nudenet.threshold and nudenet.classes")
        if self.metric == "shapes_judge" and self.retain_samples is None:
            raise ProtocolError(f"protocol {self.name}: a shapes_judge protocol fixes retain_samples")

    def settings(self) -> dict[str, Any]:
        """Everything that changes a number (the description and source text do not)."""
        return {k: v for k, v in self.to_dict().items() if k not in ("description", "source")}


@dataclass(frozen=True)
class ResolvedProtocol:
    """A protocol bound to a prompt file on this machine, with its hash."""

    protocol: Protocol
    prompts_path: Path
    prompts_sha256: str
    hash: str
    matches_pin: bool
    ref: str = ""  # how it was named: a shipped name or a path to its JSON file

    @property
    def name(self) -> str:
        return self.protocol.name

    def stamp(self) -> dict[str, Any]:
        """What every result made under this protocol carries."""
        return {"name": self.name, "hash": self.hash, "prompts_sha256": self.prompts_sha256,
                "official_prompts": self.matches_pin}

    def label(self) -> str:
        return f"{self.name} ({self.hash[:12]})"


def protocols_dir() -> Path:
    """The shipped protocol files (``eval/protocols``)."""
    return Path(__file__).resolve().parent / "protocols"


def list_protocols() -> list[str]:
    d = protocols_dir()
    return sorted(p.stem for p in d.glob("*.json")) if d.is_dir() else []


def load_protocol(name: str) -> Protocol:
    """Protocol ``name`` (a shipped name, or a path to a protocol JSON file)."""
    p = Path(name)
    if not (p.suffix == ".json" and p.is_file()):
        p = protocols_dir() / f"{name}.json"
    if not p.is_file():
        raise ProtocolError(f"unknown protocol {name!r}; available: {', '.join(list_protocols())} (or a path to a .json file)")
    try:
        return Protocol.from_json(p.read_text(encoding="utf-8"))
    except ProtocolError:
        raise
    except ValueError as err:
        raise ProtocolError(f"protocol file {p}: {err}") from None


def _prompt_path(proto: Protocol, prompts: str | os.PathLike | None) -> Path:
    kind, _, rel = proto.prompts.partition(":")
    if prompts is not None:
        path = Path(prompts)
    elif kind == "package":
        from erasure.resources import prompt_file

        path = prompt_file(rel)
    elif kind == "file":
        path = Path(rel)
    else:
        from erasure.io import reference_data_dir

        base = reference_data_dir()
        if base is None:
            raise ProtocolError(
                f"protocol {proto.name} needs the prompt file {rel} (sha256 {(proto.prompts_sha256 or '?')[:12]}...): "
                "pass --prompts PATH or set ERASURE_DATA_DIR to the folder holding it"
            )
        path = Path(base) / rel
    if not path.is_file():
        raise ProtocolError(f"protocol {proto.name}: prompt file not found: {path} (pass --prompts PATH)")
    return path


def resolve_protocol(name: str | Protocol, prompts: str | os.PathLike | None = None) -> ResolvedProtocol:
    """Load ``name`` and bind it to its prompt file (``prompts`` overrides where the file is found).

    The hash is ``sha256(settings JSON + the bound file's sha256)``, so a protocol whose prompt file changed
    gets another hash even under the same name."""
    proto = name if isinstance(name, Protocol) else load_protocol(name)
    path = _prompt_path(proto, prompts)
    sha = file_sha256(path)
    matches = proto.prompts_sha256 is None or proto.prompts_sha256 == sha
    if not matches:
        logger.warning("protocol %s: %s has sha256 %s, not the official %s; results get another protocol hash",
                       proto.name, path, sha[:12], proto.prompts_sha256[:12])
    blob = json.dumps({"settings": proto.settings(), "prompts_file_sha256": sha}, sort_keys=True)
    ref = name if isinstance(name, str) else proto.name
    return ResolvedProtocol(proto, path, sha, hashlib.sha256(blob.encode()).hexdigest(), matches, ref)


def protocol_generate_settings(rp: ResolvedProtocol) -> dict[str, Any]:
    """The ``GenerateConfig`` values a protocol fixes (plus its prompt file and name)."""
    p = rp.protocol
    out = {k: getattr(p, k) for k in GENERATE_KEYS}
    out["category"] = list(p.category)
    out["prompts"] = str(rp.prompts_path)
    out["protocol"] = rp.ref or p.name
    return out


def check_conflicts(rp: ResolvedProtocol, given: dict[str, Any], keys: tuple[str, ...] = GENERATE_KEYS) -> None:
    """Raise a one-line :class:`ProtocolError` when a flag the user gave contradicts the protocol."""
    fixed = protocol_generate_settings(rp)
    for k in keys:
        if k in given and given[k] != fixed.get(k):
            raise ProtocolError(
                f"--{k.replace('_', '-')} {given[k]} conflicts with protocol {rp.name} ({k}={fixed.get(k)}): "
                "drop the flag, or drop --protocol to choose settings yourself"
            )


def generation_stamp(protocol: str, prompts: str | None, settings: dict[str, Any]) -> dict[str, Any]:
    """The stamp a generation folder made under ``protocol`` carries; a one-line error when ``settings`` (the
    generate config's values of :data:`GENERATE_KEYS`) depart from the protocol."""
    proto = load_protocol(protocol)
    if proto.metric == "shapes_judge":  # `erasure bench` writes the per-concept rows from the protocol's own file
        return resolve_protocol(proto).stamp()
    rp = resolve_protocol(proto, prompts=prompts)
    check_conflicts(rp, settings)
    return rp.stamp()


def protocol_metric(rp: ResolvedProtocol) -> tuple[str, dict[str, Any]]:
    """The registered metric name and its parameters under this protocol (for ``score --protocol``)."""
    p = rp.protocol
    if p.metric == "nudenet":
        return "nudenet", {"thresholds": [float(p.nudenet["threshold"])], "classes": list(p.nudenet["classes"])}
    judge = p.judge or {}
    if p.metric == "shapes_judge":
        return "object", {"judge": "shapes"}
    return "object", {"judge": judge.get("name", "resnet50")}


def folder_protocol(gen: dict[str, Any] | None) -> dict[str, Any] | None:
    """The protocol stamp a generation folder's ``generation.json`` carries (None: made without a protocol)."""
    return (gen or {}).get("protocol") or None


def check_folder(rp: ResolvedProtocol, gen: dict[str, Any] | None, folder: str) -> None:
    """Refuse to score a folder under a protocol it was not generated with (one line)."""
    stamp = folder_protocol(gen)
    if stamp is None:
        raise ProtocolError(f"{folder} was not generated under a protocol; generate it with "
                            f"`erasure-eval generate --protocol {rp.ref or rp.name}` or score it without --protocol")
    if stamp.get("hash") != rp.hash:
        raise ProtocolError(f"{folder} was generated under {stamp.get('name')} ({str(stamp.get('hash'))[:12]}), "
                            f"not {rp.label()}; score it with --protocol {stamp.get('name')} or regenerate it")


def mixed_protocols(stamps: list[dict[str, Any] | None]) -> str | None:
    """A one-line reason when ``stamps`` (one per result) are not all the same protocol, else None."""
    keys = {(s or {}).get("hash") for s in stamps}
    if len(keys) <= 1:
        return None
    names = sorted({f"{s['name']} ({s['hash'][:12]})" if s else "no protocol" for s in stamps})
    return (f"these results were made under different evaluation protocols ({', '.join(names)}), so their numbers are "
            "not comparable; pass --mix-protocols to put them in one table anyway")


def protocol_attack(rp: ResolvedProtocol) -> tuple[type, dict[str, Any]] | None:
    """The hook for attack protocols: ``(attack class, settings the protocol fixes for it)``, or None.

    The attack is looked up by name in ``erasure_eval.attacks.ATTACKS`` (built separately); the protocol passes it
    its prompt file, generation settings and judge threshold, so post-attack numbers share the pre-attack hash."""
    p = rp.protocol
    if not p.attack:
        return None
    try:
        from erasure_eval.attacks import get_attack
    except ImportError as err:
        raise ProtocolError(f"protocol {p.name} needs the attack {p.attack!r}, but erasure_eval.attacks is not "
                            f"installed in this version ({err})") from None
    settings = {"prompts": str(rp.prompts_path), "steps": p.steps, "scheduler": p.scheduler, "guidance": p.guidance,
                "nudenet": p.nudenet, "judge": p.judge, "protocol": rp.stamp()}
    return get_attack(p.attack), settings
