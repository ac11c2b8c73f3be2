"""Gradio controls for config fields (see :mod:`erasure_app.forms`): label, limits and help from the field."""

from __future__ import annotations

from typing import Any

import gradio as gr

from erasure_app.forms import FormField, to_form

SLIDER_STEP = 0.01
"""Step of a slider over a fraction (the mask ratio)."""


def control(ff: FormField, value: Any, elem_id: str | None = None, slider: bool = False,
            **kwargs: Any) -> gr.components.Component:
    """The control of one field with ``value`` (a config value): a number box with the field's bounds (a slider
    with ``slider`` when both bounds are set), radio buttons or a dropdown for ``Literal`` choices, a checkbox for a
    bool, else a text box."""
    v = to_form(ff, value)
    common = dict(label=ff.label, info=ff.help or None, elem_id=elem_id, **kwargs)
    if ff.kind == "choice":
        choices = [(str(c), c) for c in ff.choices]
        if len(choices) <= 4:
            return gr.Radio(choices, value=v, **common)
        return gr.Dropdown(choices, value=v, **common)
    if ff.kind == "bool":
        return gr.Checkbox(value=bool(v), **common)
    if ff.kind in ("int", "float"):
        lo, hi = ff.minimum, ff.maximum
        if slider and lo is not None and hi is not None:
            return gr.Slider(lo + SLIDER_STEP if ff.min_exclusive else lo, hi, value=v, step=SLIDER_STEP, **common)
        return gr.Number(v, precision=0 if ff.kind == "int" else None, minimum=lo, maximum=hi, **common)
    if ff.kind == "list":
        return gr.Textbox(v, lines=3, **dict(common, label=f"{ff.label} (one per line)"))
    if ff.kind == "json":
        return gr.Textbox(v, lines=2, **dict(common, label=f"{ff.label} (JSON)"))
    return gr.Textbox(v, **common)
