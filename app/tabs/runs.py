"""Runs tab: list saved runs, rename, delete, download the run folder or an exported pipeline."""

from __future__ import annotations

import tempfile

import gradio as gr
import pandas as pd

from app.service import AppService
from app.tabs.common import UIContext, ui_errors

COLUMNS = ["run", "concepts", "method", "steps", "mask kept", "final loss", "created", "base model"]


def build(service: AppService, ctx: UIContext) -> None:
    runs = service.run_ids()
    table = gr.Dataframe(pd.DataFrame(service.list_runs(), columns=COLUMNS), label="Saved runs", interactive=False,
                         elem_id="runs-table")
    with gr.Row():
        run = ctx.add_run_dropdown(gr.Dropdown(runs, value=runs[0] if runs else None, label="Run",
                                               allow_custom_value=True, elem_id="runs-run"))
        refresh = gr.Button("Refresh", scale=0)
    with gr.Row():
        new_name = gr.Textbox(label="New name", elem_id="runs-new-name")
        rename = gr.Button("Rename")
    with gr.Row():
        confirm = gr.Checkbox(False, label="Yes, delete this run")
        delete = gr.Button("Delete", variant="stop")
    with gr.Row():
        dl_run = gr.Button("Download run (weights, mask, log)")
        dl_export = gr.Button("Export full pipeline (diffusers folder, zip)")
    file = gr.File(label="Download", interactive=False, height=120)
    msg = gr.Markdown("")

    def list_table():
        return pd.DataFrame(service.list_runs(), columns=COLUMNS)

    @ui_errors
    def do_rename(run_id, new):
        rid = service.rename_run(run_id, new)
        return f"renamed {run_id!r} to {rid!r}"

    @ui_errors
    def do_delete(run_id, ok):
        if not ok:
            raise gr.Error("tick 'Yes, delete this run' first")
        return service.delete_run(run_id), False

    @ui_errors
    def do_zip(run_id):
        return str(service.run_zip(run_id, tempfile.mkdtemp(prefix="salun-app-")))

    @ui_errors
    def do_export(run_id, progress=gr.Progress()):
        progress(0, desc="loading the base model and writing the pipeline")
        return str(service.export_pipeline(run_id))

    ctx.runs_changed.append(rename.click(do_rename, [run, new_name], msg, api_name="rename_run", concurrency_limit=1))
    ctx.runs_changed.append(delete.click(do_delete, [run, confirm], [msg, confirm], api_name="delete_run",
                                         concurrency_limit=1))
    ctx.runs_changed.append(refresh.click(lambda: None, None, None, api_visibility="private", queue=False))
    dl_run.click(do_zip, run, file, api_name="download_run", concurrency_limit=2)
    dl_export.click(do_export, run, file, api_name="export_run", concurrency_limit=1)
    ctx.runs_table = table
    ctx.list_table = list_table
