"""Runs tab: list saved runs, rename, delete, download the run folder or an exported pipeline; resume or delete
interrupted runs."""

from __future__ import annotations

import tempfile

import gradio as gr
import pandas as pd

from erasure_app.service import AppService
from erasure_app.tabs.common import UIContext, erase_progress, session_id, ui_errors, wire_cancel

COLUMNS = ["run", "concepts", "method", "method settings", "steps", "mask kept", "final loss", "created", "base model"]
INTERRUPTED_COLUMNS = ["run", "concepts", "method", "step", "steps", "modified", "resumable", "note"]


def _interrupted_frame(rows: list[dict]) -> pd.DataFrame:
    """Interrupted runs as a table; object dtype keeps whole step counts and an unknown total (None) as they are."""
    return pd.DataFrame(rows, columns=INTERRUPTED_COLUMNS, dtype=object)


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

    interrupted = service.list_interrupted()
    gr.Markdown("### Interrupted runs\nErasures that were cancelled or stopped before they finished. Resume one to "
                "continue from its last checkpoint (step), or delete it.")
    itable = gr.Dataframe(_interrupted_frame(interrupted), label="Interrupted runs",
                          interactive=False, elem_id="interrupted-table")
    with gr.Row():
        names = [r["run"] for r in interrupted]
        irun = gr.Dropdown(names, value=names[0] if names else None, label="Interrupted run",
                           allow_custom_value=True, elem_id="interrupted-run")
        resume = gr.Button("Resume", variant="primary", elem_id="resume-button")
        icancel = gr.Button("Cancel", variant="stop", elem_id="resume-cancel-button")
    with gr.Row():
        iconfirm = gr.Checkbox(False, label="Yes, delete this interrupted run")
        idelete = gr.Button("Delete interrupted run", variant="stop")
    imsg = gr.Markdown("", elem_id="interrupted-message")

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
    dl_run.click(do_zip, run, file, api_name="download_run", concurrency_limit=2)
    dl_export.click(do_export, run, file, api_name="export_run", concurrency_limit=1)
    ctx.runs_table = table
    ctx.list_table = list_table

    def interrupted_table():
        return _interrupted_frame(service.list_interrupted())

    def refresh_interrupted(current):
        frame = interrupted_table()
        names = list(frame["run"])
        keep = current if current in names else (names[0] if names else None)
        return [frame, gr.Dropdown(choices=names, value=keep)]

    def pick(evt: gr.SelectData):
        row = evt.row_value or []
        return row[0] if row else gr.update()

    @ui_errors
    def do_resume(run_id, request: gr.Request, progress=gr.Progress()):
        """Resume an interrupted run from its last checkpoint; returns a message."""
        progress(0, desc="starting")
        rid = service.resume_run(run_id, progress=erase_progress(progress), owner=session_id(request))
        info = service.read_run(rid)
        return (f"resumed **{rid}** from step {info.get('resumed_from_step') or 0} and saved it "
                f"(final loss {(info.get('final') or {}).get('loss')}); it is now under Saved runs")

    @ui_errors
    def do_delete_interrupted(run_id, ok):
        if not ok:
            raise gr.Error("tick 'Yes, delete this interrupted run' first")
        return service.delete_run(run_id, interrupted=True), False

    ctx.add_refresher(refresh_interrupted, [irun], [itable, irun])
    # the Refresh button refreshes everything (through runs_changed); its own output is the API's answer
    ctx.runs_changed.append(refresh.click(interrupted_table, None, itable, api_name="list_interrupted",
                                          concurrency_limit=None, show_progress="hidden"))
    itable.select(pick, None, irun, api_visibility="private", queue=False)
    resume_ev = resume.click(do_resume, irun, imsg, api_name="resume_run", concurrency_limit=1,
                             concurrency_id="erase")
    ctx.new_run.append((resume_ev, irun))
    wire_cancel(service, ctx, icancel, imsg, resume_ev)
    ctx.runs_changed.append(idelete.click(do_delete_interrupted, [irun, iconfirm], [imsg, iconfirm],
                                          api_name="delete_interrupted", concurrency_limit=1))
