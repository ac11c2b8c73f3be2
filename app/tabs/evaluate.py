"""Evaluate tab: a prompt set (the model's own, an uploaded CSV, or I2P) on the original model and a run,
judged as the evaluation harness judges it, with a summary table, a chart and the per-prompt verdicts."""

from __future__ import annotations

import base64
import html
from pathlib import Path

import gradio as gr
import pandas as pd

from erasure_app.service import LIMITS, AppService
from erasure_app.tabs.common import UIContext, ui_errors

CSS = """
#eval-chart-view img { display: block; max-width: 100%; height: auto; margin: 8px 0; image-rendering: auto; }
"""


def charts_html(paths: list[str]) -> str:
    """The report's charts and sample grid as whole images (inline PNGs, at most their own width)."""
    out = []
    for p in paths:
        try:
            data = Path(p).read_bytes()
        except OSError:
            continue
        out.append(f'<img alt="{html.escape(Path(p).stem)}" src="data:image/png;base64,{base64.b64encode(data).decode()}">')
    return "".join(out)


def build(service: AppService, ctx: UIContext) -> None:
    runs = service.run_ids()
    judge = "shapes judge (shape/color/fill accuracy)" if service.judge_kind == "shapes" else (
        "NudeNet (fraction of images with any exposed detection)")
    gr.Markdown(f"The evaluation harness (`erasure-eval`) generates each prompt with its own seed from the original "
                f"model and from the run, scores the images with the {judge} and writes its report; images and "
                f"scores are cached in the run folder.")
    with gr.Row():
        run = ctx.add_run_dropdown(gr.Dropdown(runs, value=runs[0] if runs else None, label="Run",
                                               allow_custom_value=True, elem_id="eval-run"))
        sources = service.prompt_sources()
        source = gr.Radio(sources, value=sources[0][1], label="Prompts", elem_id="eval-source")
        upload = gr.File(label="CSV with a 'prompt' column (optional 'seed'; any letter case)", file_types=[".csv"],
                         type="filepath")
    with gr.Row():
        limit = gr.Number(12, label="Prompts (at most)", precision=0, elem_id="eval-limit",
                          info=f"Drawn across the file (stratified by its shape/class column, else seeded random); "
                               f"1 to {LIMITS['eval_prompts']}.")
        steps = gr.Number(25, precision=0, label="Sampling steps", elem_id="eval-steps",
                          info=f"{LIMITS['gen_steps'][0]} to {LIMITS['gen_steps'][1]}.")
        guidance = gr.Number(7.5, label="Guidance", elem_id="eval-guidance",
                             info=f"Classifier-free guidance, {LIMITS['guidance'][0]:g} to {LIMITS['guidance'][1]:g}.")
    go = gr.Button("Evaluate", variant="primary", elem_id="eval-button")
    table = gr.Dataframe(pd.DataFrame(columns=["metric"]), label="The harness's report: one column per model",
                         interactive=False, elem_id="eval-table", wrap=True)
    # the charts and the sample grid whole, at their own size (a gallery crops them to tiles)
    chart_view = gr.HTML("", elem_id="eval-chart-view", padding=False)
    with gr.Accordion("Charts as a gallery (click to zoom)", open=False):
        charts = gr.Gallery(label="Charts and sample grid", columns=2, format="png", height="auto", preview=False,
                            object_fit="contain", elem_id="eval-charts")
    report = gr.File(label="report.html", interactive=False)

    @ui_errors
    def evaluate(run_id, source, upload, limit, steps, guidance, progress=gr.Progress()):
        progress(0, desc="starting")
        res = service.evaluate(run_id, source, upload, limit, steps, guidance,
                               progress=lambda stage, d, t: progress((d, t) if t else 0, desc=stage))
        rows = res["table"]
        frame = pd.DataFrame(rows[1:], columns=rows[0]) if rows else pd.DataFrame()
        return frame, res["charts"], res["report"], charts_html(res["charts"])

    go.click(evaluate, [run, source, upload, limit, steps, guidance], [table, charts, report, chart_view],
             api_name="evaluate", concurrency_id="generate", concurrency_limit=ctx.gen_concurrency)
