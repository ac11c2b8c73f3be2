"""Erase tab: a preset or typed prompts, method and knobs -> a saved run, with progress, a status line and Cancel."""

from __future__ import annotations

import inspect

import gradio as gr
import pandas as pd

from erasure_app.forms import (
    FORM_FIELDS,
    erase_form_fields,
    method_args_from_form,
    method_groups,
    ordered_methods,
    parse_method_args,
    to_form,
)
from erasure_app.service import LIMITS, LIMITS_TEXT, AppService, method_settings, trained_mask
from erasure_app.tabs.common import UIContext, session_id, ui_errors
from erasure_app.tabs.fields import control

CUSTOM = "custom"
MAIN_FIELDS = ("mask_ratio", "steps", "lr")
"""Generic settings shown beside the method; the other :data:`~erasure_app.forms.FORM_FIELDS` sit under Advanced."""


def _count(text: str | None) -> int:
    return len([ln for ln in (text or "").splitlines() if ln.strip()])


def _mask_words(mask: dict) -> str:
    """"; mask keeps 50.0% of the text encoder's weights (the denoiser untouched)" from run.json's mask entry."""
    ratio, trained, idle = trained_mask(mask)
    if ratio is None:
        return ""
    if len(trained) == 1 and idle:
        owner = {"text_encoder": "the text encoder", "denoiser": "the denoiser"}
        return f"; mask keeps {ratio:.1%} of {owner[trained[0]]}'s weights ({' and '.join(owner[m] for m in idle)} untouched)"
    return f"; mask keeps {ratio:.1%} of weights"


def _main_field_applies(name: str, method: str) -> bool:
    """Mask ratio for masked methods only; steps and learning rate for every method but closed-form edits."""
    from erasure.methods import METHODS

    spec = METHODS[method] if method in METHODS else None
    if spec is None:
        return True
    return spec.needs_mask if name == "mask_ratio" else not spec.closed_form


def prompts_label(form: dict) -> str:
    """The collapsed prompt lists' title: their counts."""
    f, a, r = (_count(form.get(k)) for k in ("forget", "anchor", "retain"))
    return f"Prompts: {f} forget · {a} anchor · {r} retain (open to edit)"


def _elem_id(name: str, prefix: str = "erase-") -> str:
    return prefix + name.replace("_", "-")


def _loss_frame(rows: list[dict]) -> pd.DataFrame | None:
    """Loss rows as a frame with numeric step/value columns; None when there are none (an empty frame would leave
    gradio's plot without colours: it then draws no lines and an empty legend, even after data arrives)."""
    if not rows:
        return None
    frame = pd.DataFrame(rows, columns=["step", "series", "value"])
    return frame.astype({"step": "int64", "series": "str", "value": "float64"})


TUNE_BUDGET = 4
"""Candidates the app's "Tune first" checkbox tries (``erasure erase --tune 4``)."""


def build(service: AppService, ctx: UIContext) -> None:
    from erasure.methods import METHODS

    presets = service.presets()
    first = presets[0][1] if presets else CUSTOM
    form = service.preset_form(first) if presets else {}
    generic = erase_form_fields()
    groups = [g for g in method_groups() if g.fields]
    order = ordered_methods()
    selected = form.get("method") or order[0]
    args = form.get("method_args") or {}

    gr.Markdown(f"Base model: `{service.describe_model()}`", elem_id="erase-model")
    with gr.Row():
        preset = gr.Dropdown(presets + [("custom (type your prompts)", CUSTOM)], value=first, label="Preset",
                             scale=1, elem_id="erase-preset")
        description = gr.Markdown(form.get("description", ""), elem_id="erase-description")
    named: dict[str, gr.components.Component] = {}  # the form's inputs by /erase parameter name
    knobs: dict[str, gr.components.Component] = {}  # method controls by API name
    boxes: list[tuple[type, gr.Group]] = []
    with gr.Row():
        with gr.Column(scale=3):
            with gr.Row():
                named["concept"] = gr.Textbox(form.get("name", ""), label="Concept name", elem_id="erase-concept",
                                              max_length=LIMITS["concept_chars"])
                named["run_name"] = gr.Textbox("", label="Run name (optional; letters, digits, _ - .)",
                                               elem_id="erase-run-name", max_length=100)
            # the prompt lists, collapsed to their counts; open to edit
            with gr.Accordion(prompts_label(form), open=False, elem_id="erase-prompts") as prompts_box:
                named["forget"] = gr.Textbox(form.get("forget", ""), lines=3, max_lines=12,
                                             label="Forget prompts (one per line)", elem_id="erase-forget")
                named["anchor"] = gr.Textbox(form.get("anchor", ""), lines=1, max_lines=6,
                                             label="Anchor prompts (one for all, or one per forget prompt; empty: the nearest concept)",
                                             elem_id="erase-anchor")
                named["retain"] = gr.Textbox(form.get("retain", ""), lines=3, max_lines=12,
                                             label="Retain prompts (one per line)", elem_id="erase-retain")
            erase_btn = gr.Button("Erase", variant="primary", elem_id="erase-button")
            gr.Markdown(LIMITS_TEXT, elem_id="erase-limits", elem_classes=["small-note"])
            status = gr.Markdown("", elem_id="erase-status")
            # what the erasure adds by itself (neighbour concepts, automatic retain set), shown before training
            preview_btn = gr.Button("Show anchor, neighbours and automatic retain set", size="sm", elem_id="erase-preview")
            auto_md = gr.Markdown("", elem_id="erase-auto")
        with gr.Column(scale=2):
            method = named["method"] = gr.Radio([(METHODS[m].label, m) for m in order], value=selected, label="Method",
                                                elem_id="erase-method")
            with gr.Row():
                for name in MAIN_FIELDS:
                    named[name] = control(generic[name], form.get(name, generic[name].default),
                                          elem_id=_elem_id(name), min_width=120,
                                          visible=_main_field_applies(name, selected))
            # one group of controls per method config class, visible while a method using it is selected
            for g in groups:
                shown = METHODS[selected].config_cls is g.config_cls
                with gr.Group(visible=shown, elem_id=_elem_id(g.methods[0], "erase-args-")) as box:
                    for ff in g.fields:
                        value = (args if shown else form.get("model_method_args", {})).get(ff.name, ff.default)
                        knobs[ff.api_name] = control(ff, value, elem_id=_elem_id(ff.api_name, "erase-arg-"))
                boxes.append((g.config_cls, box))
            with gr.Accordion("Advanced", open=False):
                tune_box = gr.Checkbox(False, label=f"Tune first (up to {TUNE_BUDGET} short trial runs on held-out "
                                       "prompts; slower)", elem_id="erase-tune")
                for name in FORM_FIELDS:
                    if name not in MAIN_FIELDS:
                        named[name] = control(generic[name], form.get(name, generic[name].default),
                                              elem_id=_elem_id(name))
            # for API callers: any method's settings as a JSON object, over the controls' values
            named["method_args"] = gr.Textbox("", label="Method settings (JSON object, optional)", visible=False,
                                              elem_id="erase-method-args")
    named["preset"] = preset
    ctx.job_buttons.append(erase_btn)
    with gr.Row():
        run_id = gr.Textbox(label="Saved run", interactive=False, elem_id="erase-run-id")
        summary = gr.Markdown("", elem_id="erase-summary")
    loss_plot = gr.LinePlot(None, x="step", y="value", color="series", color_title="loss term",
                            title="Training loss", label="Training loss", height=330, y_lim=[0, None],
                            y_title="loss", elem_id="erase-loss")
    ctx.live_loss = loss_plot

    def count_label(forget, anchor, retain):
        return gr.Accordion(label=prompts_label({"forget": forget, "anchor": anchor, "retain": retain}))

    for box in (named["forget"], named["anchor"], named["retain"]):
        # typing only: a preset fills the three boxes at once and sets the label itself (change events raced there)
        box.input(count_label, [named["forget"], named["anchor"], named["retain"]], prompts_box,
                  api_visibility="private", queue=False, show_progress="hidden")

    def show_method(name: str):
        cls = METHODS[name].config_cls if name in METHODS else None
        return ([gr.Group(visible=c is cls) for c, _ in boxes]
                + [gr.update(visible=_main_field_applies(n, name)) for n in MAIN_FIELDS])

    method.change(show_method, method, [b for _, b in boxes] + [named[n] for n in MAIN_FIELDS],
                  api_visibility="private", queue=False, show_progress="hidden")

    filled = [description, named["concept"], named["forget"], named["anchor"], named["retain"], method]
    filled += [named[n] for n in FORM_FIELDS] + list(knobs.values()) + [prompts_box]

    @ui_errors
    def fill_preset(name: str):
        custom = not name or name == CUSTOM
        f = service.custom_form() if custom else service.preset_form(name)
        cls = METHODS[f["method"]].config_cls
        out = [f["description"], f["name"], f["forget"], f["anchor"], f["retain"], f["method"]]
        out += [to_form(generic[n], f[n]) for n in FORM_FIELDS]
        for g in groups:
            for ff in g.fields:
                # every method's controls start from the preset's (its method), else the model's defaults for that
                # method, else the built-in ones; never from the last preset's
                own = f["method_args"] if g.config_cls is cls else f.get("model_method_args", {})
                out.append(to_form(ff, own.get(ff.name, ff.default)))
        return out + [gr.Accordion(label=prompts_label(f))]

    preset.change(fill_preset, preset, filled, api_visibility="private", queue=False)

    def _config(values: dict, knob_values: dict):
        """The config of the form (values by /erase parameter name, method controls by API name)."""
        method = values["method"]
        args = method_args_from_form(method, {**knob_values, **{k: v for k, v in values.items() if k in knobs}}, groups)
        args.update(parse_method_args(values["method_args"]))
        preset = values["preset"]
        return service.make_config(
            values["concept"], values["forget"], values["anchor"], values["retain"], method=method,
            preset=None if preset in (None, "", CUSTOM) else preset, method_args=args,
            **{n: values[n] for n in FORM_FIELDS},
        )

    @ui_errors
    def run_erase(preset, concept, forget, anchor, retain, method, mask_ratio, steps, lr, alpha,
                  forget_images_per_prompt, retain_images_per_prompt, data_steps, batch_size, seed, run_name,
                  retain_loss, method_args, request: gr.Request, **settings):
        """Erase a concept into a new saved run; returns (run id, summary, loss curve).

        The method's own settings: ``alpha`` and ``retain_loss`` (SalUn and RL), the other methods' by name
        (``esd_negative_guidance``, ...; see the API page), and ``method_args``, a JSON object of the chosen
        method's settings that overrides them (``{"negative_guidance": 2.0}``). Left out, a setting takes the
        form's initial value.
        """
        values = dict(zip(positional, (preset, concept, forget, anchor, retain, method, mask_ratio, steps, lr, alpha,
                                       forget_images_per_prompt, retain_images_per_prompt, data_steps, batch_size,
                                       seed, run_name, retain_loss, method_args), strict=True))
        tune = TUNE_BUDGET if settings.pop("tune", False) else 0
        cfg = _config(values, settings)
        rid = service.erase(cfg, run_name or None, owner=session_id(request), tune=tune)
        info = service.read_run(rid)
        t = info.get("timing_s", {})
        mask = info.get("mask") or {}
        data = info.get("data") or {}
        knobs_md = method_settings(info.get("config") or {})
        md = (f"**{rid}**: erased *{', '.join(info.get('concepts', []))}* with {info.get('method')}"
              + (f" ({knobs_md})" if knobs_md else "") + f" in {t.get('total', 0):.0f} s; final loss "
              f"{(info.get('final') or {}).get('loss')}"
              + _mask_words(mask)
              + (f"; trained on {data.get('forget_images', '?')} forget and {data.get('retain_images', '?')} retain "
                 "images" if data else ""))
        return rid, md, _loss_frame(service.loss_curve(rid))

    # /erase's positional parameters (the older ones keep their places: alpha and retain_loss are the SalUn/RL
    # controls); every other method control is a keyword parameter named by its API name
    positional = [p.name for p in inspect.signature(run_erase).parameters.values()
                  if p.kind is p.POSITIONAL_OR_KEYWORD and p.name not in ("request", "progress")]
    inputs = [named[n] if n in named else knobs[n] for n in positional]
    keyword_inputs = {k: c for k, c in knobs.items() if k not in positional}
    keyword_inputs["tune"] = tune_box

    @ui_errors
    def preview(concept, forget, anchor, retain):
        return service.auto_preview(concept, forget, anchor, retain)

    preview_btn.click(preview, [named["concept"], named["forget"], named["anchor"], named["retain"]], auto_md,
                      api_visibility="private")

    @ui_errors
    def precheck(*values, **settings):
        settings.pop("tune", None)
        cfg = _config(dict(zip(positional, values, strict=True)), settings)
        service.check_new_run(values[positional.index("run_name")], cfg)
        if not str(values[positional.index("concept")] or "").strip():
            gr.Info(f"No concept name given: the run uses the first forget prompt, '{cfg.concepts[0].name}'.")
        st = service.erase_status()
        if st["running"]:
            gr.Warning("Another erasure is training; yours waits in the queue (shown in the banner) and starts when "
                       "it finishes (one erasure trains at a time).")
        return ""

    # the precheck is queued (so its warning reaches the page) but never waits: no concurrency limit
    ev = erase_btn.click(precheck, inputs, status, inputs_kwargs=keyword_inputs, api_visibility="private",
                         concurrency_limit=None, show_progress="hidden")
    # no gradio concurrency limit: the service queues erasures itself (one trains; the queue is in the banner)
    erase_ev = ev.success(run_erase, inputs, [run_id, summary, loss_plot], inputs_kwargs=keyword_inputs,
                          api_name="erase", concurrency_limit=None, show_progress="hidden")
    ctx.new_run.append((erase_ev, run_id))
