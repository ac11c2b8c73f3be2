"""Gradio controls for config fields (see :mod:`erasure_app.forms`): label, limits and help from the field."""

from __future__ import annotations

from typing import Any

import gradio as gr

from erasure_app.forms import FormField, to_form


def range_text(ff: FormField) -> str:
    """The allowed range of a number field in words: ``Range: > 0 and <= 1.``"""
    lo, hi = ff.minimum, ff.maximum
    parts = []
    if lo is not None:
        parts.append(f"{'>' if ff.min_exclusive else '>='} {lo:g}")
    if hi is not None:
        parts.append(f"<= {hi:g}")
    return "Range: " + " and ".join(parts) + "." if parts else ""


def control(ff: FormField, value: Any, elem_id: str | None = None, slider: bool = False,
            **kwargs: Any) -> gr.components.Component:
    """The control of one field with ``value`` (a config value): a number box whose help states the field's range
    (``slider`` is accepted for older callers and ignored: a slider clamps silently), radio buttons or a dropdown for ``Literal`` choices, a checkbox for a
    bool, else a text box."""
    v = to_form(ff, value)
    info = ff.help or ""
    if ff.kind in ("int", "float") and (ff.minimum is not None or ff.maximum is not None):
        if info and not info.rstrip().endswith((".", "?", "!")):
            info = info.rstrip() + "."
        info = (info + " " + range_text(ff)).strip()
    common = dict(label=ff.label, info=info or None, elem_id=elem_id, **kwargs)
    if ff.kind == "choice":
        choices = [(str(c), c) for c in ff.choices]
        if len(choices) <= 4:
            return gr.Radio(choices, value=v, **common)
        return gr.Dropdown(choices, value=v, **common)
    if ff.kind == "bool":
        return gr.Checkbox(value=bool(v), **common)
    if ff.kind in ("int", "float"):
        # no minimum/maximum on the control: gradio would clamp (a slider) or answer without naming the field;
        # the config checks the range and names the field in its message
        return gr.Number(v, precision=0 if ff.kind == "int" else None, **common)
    if ff.kind == "list":
        return gr.Textbox(v, lines=3, **dict(common, label=f"{ff.label} (one per line)"))
    if ff.kind == "json":
        return gr.Textbox(v, lines=2, **dict(common, label=f"{ff.label} (JSON)"))
    return gr.Textbox(v, **common)
