"""Base class for the config dataclasses: JSON round-trip and argparse flags generated from fields.

Each entry point has one ``@dataclass`` subclass of :class:`JsonConfig`. Fields carry
``metadata={"help": ...}``; ``__post_init__`` validates and raises ``ValueError`` with a short message.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T", bound="JsonConfig")

__all__ = ["JsonConfig", "add_config_arguments", "config_from_args", "field"]


def field(default: Any = dataclasses.MISSING, *, help: str, default_factory: Any = dataclasses.MISSING, **meta: Any):
    """A dataclass field with a help text (used in ``--help`` and in the docs)."""
    kwargs: dict[str, Any] = {"metadata": {"help": help, **meta}}
    if default_factory is not dataclasses.MISSING:
        kwargs["default_factory"] = default_factory
    else:
        kwargs["default"] = default
    return dataclasses.field(**kwargs)


class JsonConfig:
    """Mixin for dataclass configs: ``to_dict``, ``from_dict``, ``to_json``, ``from_json``, ``save``, ``load``."""

    def to_dict(self) -> dict[str, Any]:
        out = {}
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            v = getattr(self, f.name)
            if isinstance(v, JsonConfig):
                v = v.to_dict()
            elif isinstance(v, (list, tuple)):
                v = [x.to_dict() if isinstance(x, JsonConfig) else x for x in v]
            out[f.name] = v
        return out

    @classmethod
    def from_dict(cls: type[T], data: dict[str, Any]) -> T:
        if not isinstance(data, dict):
            raise ValueError(f"{cls.__name__}: expected a JSON object, got {type(data).__name__}")
        names = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        unknown = sorted(set(data) - set(names))
        if unknown:
            raise ValueError(f"{cls.__name__}: unknown field(s) {unknown}; known: {sorted(names)}")
        hints = typing.get_type_hints(cls)
        kwargs = {}
        for k, v in data.items():
            sub = _config_class(hints.get(k))
            if sub is not None and isinstance(v, dict):
                v = sub.from_dict(v)
            elif sub is not None and isinstance(v, list):
                v = [sub.from_dict(x) if isinstance(x, dict) else x for x in v]
            kwargs[k] = v
        return cls(**kwargs)

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, sort_keys=False)

    @classmethod
    def from_json(cls: type[T], text: str) -> T:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"{cls.__name__}: invalid JSON ({err})") from err
        return cls.from_dict(data)

    def save(self, path: str | os.PathLike) -> None:
        from erasure.io import atomic_write_text

        atomic_write_text(path, self.to_json())

    @classmethod
    def load(cls: type[T], path: str | os.PathLike) -> T:
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"config file not found: {p}")
        return cls.from_json(p.read_text(encoding="utf-8"))


def _config_class(tp: Any) -> type[JsonConfig] | None:
    if tp is None:
        return None
    if isinstance(tp, type) and issubclass(tp, JsonConfig):
        return tp
    for arg in typing.get_args(tp):
        c = _config_class(arg)
        if c is not None:
            return c
    return None


def _base_type(tp: Any) -> tuple[Any, bool]:
    """Return (scalar type, is_list) for a field annotation."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return _base_type(args[0])
    if origin in (list, tuple):
        args = typing.get_args(tp)
        return (args[0] if args else str), True
    if origin is typing.Literal:
        return str, False
    return tp, False


def _json_object(text: str) -> dict[str, Any]:
    """argparse type of dict fields: a JSON object such as '{"square": 2}'."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not valid JSON ({e.msg}): {text!r}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object like '{{\"key\": 1}}', got {text!r}")
    return value


def add_config_arguments(parser: argparse.ArgumentParser, cls: type, skip: tuple[str, ...] = ()) -> None:
    """Add one ``--flag`` per dataclass field of ``cls`` (``snake_case`` -> ``--snake-case``)."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip or f.metadata.get("cli") is False:
            continue
        tp, is_list = _base_type(hints[f.name])
        if _config_class(tp) is not None:
            continue
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else None
        if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            default = f.default_factory()  # type: ignore[misc]
        help_text = f.metadata.get("help", "")
        if default not in (None, [], ()):
            help_text += f" (default: {default})"
        choices = f.metadata.get("choices")
        lit = typing.get_args(hints[f.name]) if typing.get_origin(hints[f.name]) is typing.Literal else None
        if lit:
            choices = list(lit)
        if typing.get_origin(tp) is dict:
            parser.add_argument(flag, type=_json_object, default=argparse.SUPPRESS, help=help_text + " (JSON object)")
        elif tp is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=help_text)
        elif is_list:
            parser.add_argument(
                flag, type=tp, action="append", default=argparse.SUPPRESS, help=help_text + " (repeatable)"
            )
        else:
            parser.add_argument(
                flag, type=tp if tp in (int, float, str) else str, choices=choices, default=argparse.SUPPRESS,
                help=help_text,
            )


def config_from_args(cls: type[T], args: argparse.Namespace, base: dict[str, Any] | None = None) -> T:
    """Build ``cls`` from parsed flags; flags not given fall back to ``base`` and then to field defaults."""
    data = dict(base or {})
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        if hasattr(args, f.name):
            data[f.name] = getattr(args, f.name)
    return cls.from_dict(data)
