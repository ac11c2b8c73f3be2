"""Inspect tab: a run's saliency-mask sparsity per UNet block, its training loss curve and its run.json."""

from __future__ import annotations

import gradio as gr
import pandas as pd

from erasure_app.service import AppService
from erasure_app.tabs.common import UIContext, ui_errors
from erasure_app.tabs.erase import _loss_frame


def _mask_frame(rows: list[dict]) -> pd.DataFrame | None:
    if not rows:  # no data: None, not an empty frame (see erase._loss_frame)
        return None
    frame = pd.DataFrame(rows, columns=["layer", "kept", "weights"])
    return frame.astype({"layer": "str", "kept": "float64", "weights": "int64"})


def build(service: AppService, ctx: UIContext) -> None:
    runs = service.run_ids()
    with gr.Row():
        run = ctx.add_run_dropdown(gr.Dropdown(runs, value=runs[0] if runs else None, label="Run",
                                               allow_custom_value=True, elem_id="inspect-run"))
        show = gr.Button("Show", variant="primary", scale=0)
    mask_plot = gr.BarPlot(None, x="layer", y="kept",
                           title="Saliency mask: kept fraction per block", x_label_angle=-45,
                           height=360, label="Mask sparsity", sort=None, y_lim=[0, 1], y_title="kept fraction",
                           elem_id="inspect-mask")
    loss_plot = gr.LinePlot(None, x="step", y="value", color="series", color_title="loss term",
                            title="Training loss", height=330, label="Loss curve", y_lim=[0, None], y_title="loss",
                            elem_id="inspect-loss")
    info = gr.JSON(label="run.json")

    @ui_errors
    def inspect_run(run_id):
        meta = service.read_run(run_id)
        try:
            mask = _mask_frame(service.mask_sparsity(run_id))
        except ValueError as err:  # unmasked method: show the rest
            gr.Info(str(err))
            mask = _mask_frame([])
        loss = _loss_frame(service.loss_curve(run_id))
        return gr.BarPlot(mask, sort=list(mask["layer"]) if mask is not None else None), loss, meta

    show.click(inspect_run, run, [mask_plot, loss_plot, info], api_name="inspect", concurrency_limit=4)
    def on_change(run_id):
        if not run_id:  # no run yet (the dropdown is refreshed on page load): nothing to show, no error
            return _mask_frame([]), _loss_frame([]), None
        return inspect_run(run_id)

    run.change(on_change, run, [mask_plot, loss_plot, info], api_visibility="private", concurrency_limit=4)
