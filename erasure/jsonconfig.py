"""Base class for the config dataclasses: JSON round-trip and argparse flags generated from fields.

Each entry point has one ``@dataclass`` subclass of :class:`JsonConfig`. Fields carry
``metadata={"help": ...}``; ``__post_init__`` validates and raises ``ValueError`` with a short message.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T", bound="JsonConfig")

__all__ = ["JsonConfig", "FieldValueError", "add_config_arguments", "config_from_args", "field", "field_label", "field_bounds", "given_fields"]


def field(default: Any = dataclasses.MISSING, *, help: str, default_factory: Any = dataclasses.MISSING, **meta: Any):
    """A dataclass field with a help text (used in ``--help``, the docs and the app's forms).

    Optional metadata read by :meth:`JsonConfig.check_fields`, the CLI and the app: ``label`` (a short UI
    label), ``min`` / ``max`` (inclusive bounds of a number), ``min_exclusive`` (a number must be above ``min``),
    ``cli`` (False: no flag), ``ui`` (False: no form control).
    """
    kwargs: dict[str, Any] = {"metadata": {"help": help, **meta}}
    if default_factory is not dataclasses.MISSING:
        kwargs["default_factory"] = default_factory
    else:
        kwargs["default"] = default
    return dataclasses.field(**kwargs)


class FieldValueError(ValueError):
    """A config field's value is refused; ``flag`` is its command-line flag (``--seed``), for the CLI's message."""

    def __init__(self, message: str, flag: str) -> None:
        super().__init__(message)
        self.flag = flag


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

    def check_fields(self) -> None:
        """Generic validation from the annotations and metadata: types, ``Literal`` choices, ``min``/``max``.

        Raises ``ValueError`` naming the field and what it accepts. Call it first in ``__post_init__``.
        """
        hints = typing.get_type_hints(type(self))
        prefix = getattr(type(self), "cli_prefix", "") or ""
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            try:
                _check_value(f, hints[f.name], getattr(self, f.name))
            except ValueError as err:
                flag = "--" + flag_dest(f.name, prefix).replace("_", "-")
                raise FieldValueError(str(err), flag) from None

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


def field_label(f: dataclasses.Field) -> str:
    """The field's UI label (``label`` metadata, else its name in words)."""
    return f.metadata.get("label") or f.name.replace("_", " ")


def field_bounds(f: dataclasses.Field) -> tuple[float | None, float | None]:
    return f.metadata.get("min"), f.metadata.get("max")


def _check_value(f: dataclasses.Field, tp: Any, v: Any) -> None:
    name = field_label(f)
    if len(name) > 1 and not name[1].isupper():
        name = name[0].lower() + name[1:]
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if v is None and len(args) < len(typing.get_args(tp)):
            return
        if len(args) == 1:
            return _check_value(f, args[0], v)
        return
    if origin is typing.Literal:
        choices = typing.get_args(tp)
        if v not in choices:
            raise ValueError(f"{name} must be one of {', '.join(map(str, choices))}; got {v!r}")
        return
    if tp is bool:
        if not isinstance(v, bool):
            raise ValueError(f"{name} must be true or false, got {v!r}")
        return
    if tp in (int, float):
        ok = isinstance(v, int) if tp is int else isinstance(v, (int, float))
        if isinstance(v, bool) or not ok or (tp is float and not math.isfinite(v)):
            kind = "an integer" if tp is int else "a finite number"
            raise ValueError(f"{name} must be {kind}, got {v!r}")
        lo, hi = field_bounds(f)
        low_ok = lo is None or (v > lo if f.metadata.get("min_exclusive") else v >= lo)
        if not low_ok or (hi is not None and v > hi):
            lo_txt = "" if lo is None else (f"> {lo}" if f.metadata.get("min_exclusive") else f">= {lo}")
            hi_txt = "" if hi is None else f"<= {hi}"
            raise ValueError(f"{name} must be {' and '.join(t for t in (lo_txt, hi_txt) if t)}, got {v!r}")
        return
    if tp is str and not isinstance(v, str):
        raise ValueError(f"{name} must be a string, got {v!r}")


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


def flag_dest(name: str, prefix: str = "") -> str:
    """The argparse ``dest`` of field ``name`` under a flag ``prefix`` (``esd`` + ``sample_steps`` -> ``esd_sample_steps``)."""
    return f"{prefix}_{name}" if prefix else name


def add_config_arguments(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup, cls: type, skip: tuple[str, ...] = (), prefix: str = "",
    seen: dict[str, type] | None = None,
) -> None:
    """Add one ``--flag`` per dataclass field of ``cls`` (``snake_case`` -> ``--snake-case``, after ``prefix``).

    ``seen`` maps flags already added (by other config classes) to their class: a flag that two classes
    share is added once, and only if both declare the same annotation.
    """
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip or f.metadata.get("cli") is False:
            continue
        tp, is_list = _base_type(hints[f.name])
        if _config_class(tp) is not None:
            continue
        dest = flag_dest(f.name, prefix)
        flag = "--" + dest.replace("_", "-")
        if seen is not None:
            if flag in seen:
                if typing.get_type_hints(seen[flag]).get(f.name) != hints[f.name]:
                    raise ValueError(f"{flag} is declared by {seen[flag].__name__} and {cls.__name__} with other types")
                continue
            seen[flag] = cls
        default = f.default if f.default is not dataclasses.MISSING else None
        if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            default = f.default_factory()  # type: ignore[misc]
        help_text = f.metadata.get("help", "").replace("%", "%%")  # argparse %-formats help strings
        if default not in (None, [], ()):
            help_text += f" (default: {default})".replace("%", "%%")
        choices = f.metadata.get("choices")
        lit = typing.get_args(hints[f.name]) if typing.get_origin(hints[f.name]) is typing.Literal else None
        if lit:
            choices = list(lit)
        if typing.get_origin(tp) is dict:
            parser.add_argument(flag, dest=dest, type=_json_object, default=argparse.SUPPRESS, help=help_text + " (JSON object)")
        elif tp is bool:
            parser.add_argument(flag, dest=dest, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=help_text)
        elif is_list:
            parser.add_argument(
                flag, dest=dest, type=tp, action="append", default=argparse.SUPPRESS, help=help_text + " (repeatable)"
            )
        else:
            parser.add_argument(
                flag, dest=dest, type=tp if tp in (int, float, str) else str, choices=choices, default=argparse.SUPPRESS,
                help=help_text,
            )


def config_from_args(cls: type[T], args: argparse.Namespace, base: dict[str, Any] | None = None, prefix: str = "") -> T:
    """Build ``cls`` from parsed flags; flags not given fall back to ``base`` and then to field defaults."""
    return cls.from_dict({**(base or {}), **given_fields(cls, args, prefix)})


def given_fields(cls: type, args: argparse.Namespace, prefix: str = "") -> dict[str, Any]:
    """The fields of ``cls`` whose flags were given on the command line (flags default to ``SUPPRESS``)."""
    return {f.name: getattr(args, flag_dest(f.name, prefix)) for f in dataclasses.fields(cls)
            if hasattr(args, flag_dest(f.name, prefix))}
