"""Form fields read from config dataclasses (no gradio here): what control a field gets, its label, limits and
help (all from the field's metadata), and the conversion of form values back into config values.

The erase form shows a few generic :class:`~erasure.EraseConfig` fields (:data:`FORM_FIELDS`) and, for every
registered method, the fields of its config class (:func:`method_groups`); a method added to
:data:`erasure.methods.METHODS` gets its controls without app changes.
"""

from __future__ import annotations

import dataclasses
import json
import re
import types
import typing
from dataclasses import dataclass, field
from typing import Any

from erasure.jsonconfig import field_bounds, field_label, flag_dest

__all__ = ["FORM_FIELDS", "RESERVED_API_NAMES", "FormField", "MethodGroup", "form_fields", "erase_form_fields",
           "method_groups", "ordered_methods", "from_form", "to_form", "method_args_from_form", "parse_method_args"]

FORM_FIELDS = ("mask_ratio", "steps", "lr", "forget_images_per_prompt", "retain_images_per_prompt", "data_steps",
               "batch_size", "seed")
"""The :class:`~erasure.EraseConfig` fields the erase form shows (labels, limits and help come from the fields)."""

RESERVED_API_NAMES = frozenset(FORM_FIELDS) | {
    "preset", "concept", "forget", "anchor", "retain", "method", "run_name", "method_args", "request", "progress",
    "api_name", "fn_index", "result_callbacks",
}
"""Parameter names of the ``/erase`` endpoint that a method field can not take (it gets a prefixed name)."""


@dataclass(frozen=True)
class FormField:
    """One config field as a form control.

    ``kind`` is ``int``, ``float``, ``bool``, ``choice`` (a ``Literal``), ``text``, ``list`` (one item per line)
    or ``json`` (anything else, as a JSON text). ``api_name`` is the control's parameter name in the ``/erase``
    endpoint.
    """

    name: str
    api_name: str
    label: str
    help: str
    kind: str
    default: Any = None
    choices: tuple = ()
    minimum: float | None = None
    maximum: float | None = None
    min_exclusive: bool = False
    optional: bool = False
    item: type = str


@dataclass
class MethodGroup:
    """The controls of one method config class, shown while one of ``methods`` (which share the class) is selected."""

    config_cls: type
    methods: list[str]
    fields: list[FormField] = field(default_factory=list)


def _form_field(f: dataclasses.Field, hint: Any, api_name: str) -> FormField:
    optional = False
    tp = hint
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        optional = len(args) < len(typing.get_args(tp))
        tp = args[0] if len(args) == 1 else Any
    choices: tuple = ()
    item: type = str
    origin = typing.get_origin(tp)
    if origin is typing.Literal:
        kind, choices = "choice", typing.get_args(tp)
    elif tp is bool:
        kind = "bool"
    elif tp is int:
        kind = "int"
    elif tp is float:
        kind = "float"
    elif tp is str:
        kind = "text"
    elif origin in (list, tuple) and (typing.get_args(tp) or (str,))[0] in (str, int, float):
        kind, item = "list", (typing.get_args(tp) or (str,))[0]
    else:
        kind = "json"
    if f.default is not dataclasses.MISSING:
        default = f.default
    elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        default = f.default_factory()  # type: ignore[misc]
    else:
        default = None
    lo, hi = field_bounds(f) if kind in ("int", "float") else (None, None)
    label = field_label(f)
    return FormField(name=f.name, api_name=api_name, label=label[:1].upper() + label[1:], help=f.metadata.get("help", ""),
                     kind=kind, default=default, choices=choices, minimum=lo, maximum=hi,
                     min_exclusive=bool(f.metadata.get("min_exclusive")), optional=optional, item=item)


def form_fields(cls: type, names: tuple[str, ...] | None = None, prefix: str = "") -> list[FormField]:
    """The fields of config class ``cls`` that the form shows (all but ``ui=False`` ones, or ``names`` in that order).

    A field's ``api_name`` is its CLI dest (``prefix`` + name: ``esd_negative_guidance``).
    """
    hints = typing.get_type_hints(cls)
    by_name = {f.name: f for f in dataclasses.fields(cls) if f.init}
    if names is None:
        chosen = [f for f in by_name.values() if f.metadata.get("ui") is not False]
    else:
        chosen = [by_name[n] for n in names]
    return [_form_field(f, hints[f.name], flag_dest(f.name, prefix)) for f in chosen]


def erase_form_fields() -> dict[str, FormField]:
    """The generic :class:`~erasure.EraseConfig` fields of the form (:data:`FORM_FIELDS`) by name."""
    from erasure.config import EraseConfig

    return {ff.name: ff for ff in form_fields(EraseConfig, FORM_FIELDS)}


def ordered_methods() -> list[str]:
    """Registered method names, the config's default method first, then in registration order."""
    from erasure.config import EraseConfig
    from erasure.methods import METHODS

    default = EraseConfig.__dataclass_fields__["method"].default
    return sorted(METHODS, key=lambda m: m != default)


def method_groups() -> list[MethodGroup]:
    """One group per method config class (methods sharing a class share its group), in :func:`ordered_methods` order.

    API names are the fields' CLI dests (``alpha``, ``esd_sample_steps``); a name another class (or the form) has
    already taken gets the first method's name in front (``uce_lamb``).
    """
    from erasure.methods import METHODS

    groups: dict[type, MethodGroup] = {}
    taken = set(RESERVED_API_NAMES)
    for name in ordered_methods():
        cls = METHODS[name].config_cls
        if cls in groups:
            groups[cls].methods.append(name)
            continue
        fields = []
        for ff in form_fields(cls, prefix=getattr(cls, "cli_prefix", "")):
            api, n = ff.api_name, 1
            if api in taken:
                api = f"{re.sub(r'[^a-z0-9]+', '_', name)}_{ff.name}"
            while api in taken:
                n += 1
                api = f"{re.sub(r'[^a-z0-9]+', '_', name)}_{ff.name}_{n}"
            taken.add(api)
            fields.append(dataclasses.replace(ff, api_name=api))
        groups[cls] = MethodGroup(cls, [name], fields)
    return list(groups.values())


def _number(text: str) -> int | float | str:
    try:
        return int(text)
    except ValueError:
        try:
            return float(text)
        except ValueError:
            return text


def from_form(ff: FormField, value: Any) -> Any:
    """A form value as the config value of ``ff``; the config checks it (ranges, choices) and names the field.

    Raises ``ValueError`` for a missing value of a field that is not optional, and for unreadable JSON.
    """
    if isinstance(value, str) and ff.kind not in ("text", "list"):
        value = value.strip()
    if value is None or (value == "" and ff.kind != "text") or (value == "" and ff.optional):
        if ff.optional:
            return None
        if ff.kind == "list":
            return []
        raise ValueError(f"{ff.label} is missing")
    if ff.kind in ("int", "float") and isinstance(value, str):
        value = _number(value)
    if ff.kind == "int" and isinstance(value, float) and value.is_integer():
        value = int(value)
    elif ff.kind == "list" and isinstance(value, str):
        sep = r"\n" if ff.item is str else r"[,\s]+"
        value = [_number(v) if ff.item is not str else v for v in (s.strip() for s in re.split(sep, value)) if v]
    elif ff.kind == "json" and isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as err:
            raise ValueError(f"{ff.label} is not valid JSON ({err.msg})") from None
    return value


def to_form(ff: FormField, value: Any) -> Any:
    """A config value as the value of ``ff``'s control."""
    if ff.kind == "list":
        return "\n".join(map(str, value or []))
    if ff.kind == "json":
        return "" if value is None else json.dumps(value)
    if ff.kind == "text" and value is None:
        return ""
    return value


def parse_method_args(value: str | dict | None) -> dict[str, Any]:
    """The ``method_args`` input: a JSON object (text or dict) of the method's own settings; empty means none."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return {}
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as err:
            raise ValueError(f"method_args is not valid JSON ({err.msg}); give an object like {{\"alpha\": 0.5}}") from None
    if not isinstance(value, dict):
        raise ValueError(f"method_args must be a JSON object like {{\"alpha\": 0.5}}, got {value!r}")
    return dict(value)


def method_args_from_form(method: str, values: dict[str, Any], groups: list[MethodGroup] | None = None) -> dict[str, Any]:
    """The settings of ``method`` from the form's method controls (``values`` by API name); {} for an unknown method."""
    for g in groups if groups is not None else method_groups():
        if method in g.methods:
            return {ff.name: from_form(ff, values[ff.api_name]) for ff in g.fields if ff.api_name in values}
    return {}
