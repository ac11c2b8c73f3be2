"""Evaluate tab: a prompt set (the model's own, an uploaded CSV, or I2P) on the original model and a run,
judged as the evaluation harness judges it, with a summary table, a chart and the per-prompt verdicts."""

from __future__ import annotations

import gradio as gr
import pandas as pd

from app.service import AppService
from app.tabs.common import UIContext, ui_errors


def build(service: AppService, ctx: UIContext) -> None:
    runs = service.run_ids()
    judge = "shapes judge (shape/color/fill accuracy)" if service.judge_kind == "shapes" else (
        "NudeNet (fraction of images with any exposed detection)")
    gr.Markdown(f"Each prompt is generated with its own seed by the original model and by the run, then scored by "
                f"the {judge}.")
    with gr.Row():
        run = ctx.add_run_dropdown(gr.Dropdown(runs, value=runs[0] if runs else None, label="Run",
                                               allow_custom_value=True, elem_id="eval-run"))
        source = gr.Radio([("model's prompt set", "model"), ("uploaded CSV", "csv"), ("I2P", "i2p")],
                          value="model", label="Prompts")
        upload = gr.File(label="CSV with a 'prompt' column (optional 'seed')", file_types=[".csv"], type="filepath")
    with gr.Row():
        limit = gr.Number(12, label="Prompts (at most)", precision=0, minimum=1)
        steps = gr.Slider(1, 100, value=25, step=1, label="Sampling steps")
        guidance = gr.Slider(0.0, 20.0, value=7.5, step=0.5, label="Guidance")
    go = gr.Button("Evaluate", variant="primary")
    summary = gr.Dataframe(label="Summary", interactive=False)
    chart = gr.BarPlot(pd.DataFrame(columns=["model", "metric", "value"]), x="metric", y="value", color="model",
                       title="Original vs run", height=300, label="Chart")
    details = gr.Dataframe(label="Per prompt", interactive=False)

    @ui_errors
    def evaluate(run_id, source, upload, limit, steps, guidance, progress=gr.Progress()):
        rows = service.eval_prompts(source, upload, limit)
        progress(0, desc="generating")
        res = service.evaluate(run_id, rows, steps, guidance,
                               progress=lambda d, t: progress((d, t), desc="generating and judging"))
        per = pd.DataFrame([{k: v for k, v in r.items() if k != "verdict"} for r in res["per_prompt"]])
        return (pd.DataFrame(res["table"]), pd.DataFrame(res["chart"], columns=["model", "metric", "value"]), per)

    go.click(evaluate, [run, source, upload, limit, steps, guidance], [summary, chart, details], api_name="evaluate",
             concurrency_id="generate", concurrency_limit=ctx.gen_concurrency)
