"""Erase tab: a preset or typed prompts, method and knobs -> a saved run, with progress, a status line and Cancel."""

from __future__ import annotations

import gradio as gr
import pandas as pd
from erasure_app.service import METHOD_LABELS, RETAIN_LOSSES, AppService, retain_label
from erasure_app.tabs.common import UIContext, erase_progress, session_id, ui_errors, wire_cancel

CUSTOM = "custom"
RETAIN_LABELS = {"denoise": "denoise (paper)", "distill": "distill (keep the original)"}
RETAIN_INFO = ("**denoise**: the SalUn paper's denoising loss on the retain images (Dr).\n\n"
               "**distill**: match the frozen original model's predictions on Dr; keeps more of the model intact "
               "(holds a second UNet in memory).")


def _loss_frame(rows: list[dict]) -> pd.DataFrame:
    """Loss rows as a frame with numeric step/value columns even when empty (the plot reads the dtypes)."""
    frame = pd.DataFrame(rows, columns=["step", "series", "value"])
    return frame.astype({"step": "int64", "series": "str", "value": "float64"})


def build(service: AppService, ctx: UIContext) -> None:
    presets = service.presets()
    first = presets[0][1] if presets else CUSTOM
    form = service.preset_form(first) if presets else {}
    from erasure import METHODS

    order = [m for m in METHOD_LABELS if m in METHODS] + [m for m in METHODS if m not in METHOD_LABELS]
    methods = [(METHOD_LABELS.get(m, m), m) for m in order]

    gr.Markdown(f"Base model: `{service.describe_model()}`")
    with gr.Row():
        preset = gr.Dropdown(presets + [("custom (type your prompts)", CUSTOM)], value=first, label="Preset",
                             scale=1, elem_id="erase-preset")
        description = gr.Markdown(form.get("description", ""))
    with gr.Row():
        with gr.Column(scale=3):
            concept = gr.Textbox(form.get("name", ""), label="Concept name", elem_id="erase-concept")
            forget = gr.Textbox(form.get("forget", ""), lines=3, label="Forget prompts (one per line)",
                                elem_id="erase-forget")
            anchor = gr.Textbox(form.get("anchor", ""), lines=2,
                                label="Anchor prompts (one for all, or one per forget prompt)", elem_id="erase-anchor")
            retain = gr.Textbox(form.get("retain", ""), lines=3, label="Retain prompts (one per line)",
                                elem_id="erase-retain")
        with gr.Column(scale=2):
            method = gr.Radio(methods, value=form.get("method", "salun"), label="Method", elem_id="erase-method")
            mask_ratio = gr.Slider(0.01, 1.0, value=form.get("mask_ratio", 0.5), step=0.01,
                                   label="Mask ratio (fraction of weights trained)")
            steps = gr.Number(form.get("steps", 100), label="Steps", precision=0, minimum=1, elem_id="erase-steps")
            lr = gr.Number(form.get("lr", 1e-5), label="Learning rate", minimum=0)
            alpha = gr.Number(form.get("alpha", 0.5), label="Alpha (retain loss weight)", minimum=0)
            retain_loss = gr.Radio([(RETAIN_LABELS.get(r, r), r) for r in RETAIN_LOSSES],
                                   value=form.get("retain_loss", "denoise"), label="Retain loss", info=RETAIN_INFO,
                                   elem_id="erase-retain-loss")
            with gr.Accordion("Advanced", open=False):
                fipp = gr.Number(form.get("forget_images_per_prompt", 8), label="Forget images per prompt",
                                 precision=0, elem_id="erase-fipp")
                ripp = gr.Number(form.get("retain_images_per_prompt", 4), label="Retain images per prompt",
                                 precision=0, elem_id="erase-ripp")
                data_steps = gr.Number(form.get("data_steps", 25), label="Sampling steps for Df/Dr", precision=0,
                                       elem_id="erase-data-steps")
                batch_size = gr.Number(form.get("batch_size", 4), label="Batch size", precision=0)
                seed = gr.Number(form.get("seed", 0), label="Seed", precision=0)
            run_name = gr.Textbox("", label="Run name (optional; letters, digits, _ - .)", elem_id="erase-run-name")
    with gr.Row():
        erase_btn = gr.Button("Erase", variant="primary", elem_id="erase-button")
        cancel_btn = gr.Button("Cancel", variant="stop", elem_id="cancel-button")
    status = gr.Markdown(service.status_text(), elem_id="erase-status")
    with gr.Row():
        run_id = gr.Textbox(label="Saved run", interactive=False, elem_id="erase-run-id")
        summary = gr.Markdown("", elem_id="erase-summary")
    loss_plot = gr.LinePlot(_loss_frame([]), x="step", y="value", color="series", title="Training loss",
                            label="Training loss", height=260)

    # retain_loss comes last, after run_name: API callers that predate it (by position or keyword) still work, and
    # gradio_client fills it with the form's initial value (the first preset's retain loss) when it is left out
    inputs = [preset, concept, forget, anchor, retain, method, mask_ratio, steps, lr, alpha, fipp, ripp, data_steps,
              batch_size, seed, run_name, retain_loss]

    @ui_errors
    def fill_preset(name: str):
        if not name or name == CUSTOM:
            return ["Type your own forget, anchor and retain prompts."] + [gr.update()] * 14
        f = service.preset_form(name)
        return [f["description"], f["name"], f["forget"], f["anchor"], f["retain"], f["method"], f["mask_ratio"],
                f["steps"], f["lr"], f["alpha"], f["retain_loss"], f["forget_images_per_prompt"],
                f["retain_images_per_prompt"], f["data_steps"], f["batch_size"]]

    preset.change(fill_preset, preset, [description, concept, forget, anchor, retain, method, mask_ratio, steps, lr,
                                        alpha, retain_loss, fipp, ripp, data_steps, batch_size],
                  api_visibility="private", queue=False)

    def _config(preset, concept, forget, anchor, retain, method, mask_ratio, steps, lr, alpha, fipp, ripp, data_steps,
                batch_size, seed, retain_loss=None):
        return service.make_config(
            concept, forget, anchor, retain, method=method, mask_ratio=mask_ratio, steps=steps, lr=lr, alpha=alpha,
            preset=None if preset in (None, "", CUSTOM) else preset, forget_images_per_prompt=fipp,
            retain_images_per_prompt=ripp, data_steps=data_steps, batch_size=batch_size, seed=seed,
            retain_loss=retain_loss,
        )

    @ui_errors
    def precheck(*values):
        *cfg_values, name, retain_loss = values
        cfg = _config(*cfg_values, retain_loss=retain_loss)
        service.check_new_run(name, cfg)
        st = service.erase_status()
        if st["running"]:
            gr.Warning("Another erasure is training; yours waits in the queue and starts when it finishes "
                       "(one erasure trains at a time).")
        return service.status_text()

    @ui_errors
    def run_erase(preset, concept, forget, anchor, retain, method, mask_ratio, steps, lr, alpha,
                  forget_images_per_prompt, retain_images_per_prompt, data_steps, batch_size, seed, run_name,
                  retain_loss, request: gr.Request, progress=gr.Progress()):
        """Erase a concept into a new saved run; returns (run id, summary, loss curve).

        ``retain_loss`` is "denoise" or "distill"; left out, the client sends the form's initial value.
        """
        cfg = _config(preset, concept, forget, anchor, retain, method, mask_ratio, steps, lr, alpha,
                      forget_images_per_prompt, retain_images_per_prompt, data_steps, batch_size, seed, retain_loss)
        progress(0, desc="starting")
        rid = service.erase(cfg, run_name or None, progress=erase_progress(progress), owner=session_id(request))
        info = service.read_run(rid)
        t = info.get("timing_s", {})
        mask = info.get("mask") or {}
        data = info.get("data") or {}
        retain_kind = retain_label(info.get("config") or {})
        retain_note = f" ({retain_kind} retain loss)" if retain_kind != "none" else ""
        md = (f"**{rid}**: erased *{', '.join(info.get('concepts', []))}* with {info.get('method')}{retain_note} in "
              f"{t.get('total', 0):.0f} s; final loss {(info.get('final') or {}).get('loss')}"
              + (f"; mask keeps {mask['ratio']:.1%} of weights" if "ratio" in mask else "")
              + f"; trained on {data.get('forget_images', '?')} forget and {data.get('retain_images', '?')} retain images")
        return rid, md, _loss_frame(service.loss_curve(rid))


    # the precheck is queued (so its warning reaches the page) but never waits: no concurrency limit
    ev = erase_btn.click(precheck, inputs, status, api_visibility="private", concurrency_limit=None,
                         show_progress="hidden")
    erase_ev = ev.success(run_erase, inputs, [run_id, summary, loss_plot], api_name="erase",
                          concurrency_limit=1, concurrency_id="erase")
    ctx.new_run.append((erase_ev, run_id))
    wire_cancel(service, ctx, cancel_btn, status, erase_ev)

    timer = gr.Timer(2.0)
    timer.tick(service.status_text, None, status, api_visibility="private", queue=False, show_progress="hidden")
