"""Runs tab: list saved runs, rename, delete, download the run folder or an exported pipeline; resume or delete
interrupted runs."""

from __future__ import annotations

import gradio as gr
import pandas as pd

from erasure_app.service import AppService
from erasure_app.tabs.common import UIContext, session_id, ui_errors

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
    with gr.Row(equal_height=True):
        new_name = gr.Textbox(label="New name", elem_id="runs-new-name", scale=2)
        rename = gr.Button("Rename", scale=1, elem_id="runs-rename")
        rename_msg = gr.Markdown("", elem_id="runs-rename-message")
    with gr.Row(equal_height=True):
        confirm = gr.Checkbox(False, label="Yes, delete this run", scale=2)
        delete = gr.Button("Delete", variant="stop", scale=1, elem_id="runs-delete")
        msg = gr.Markdown("", elem_id="runs-message")
    with gr.Row():
        dl_run = gr.Button("Download run (weights, mask, log)")
        dl_export = gr.Button("Export full pipeline (diffusers folder, zip)")
    file = gr.File(label="Download", interactive=False, height=120)

    damaged = service.list_damaged()
    with gr.Group(visible=bool(damaged), elem_id="damaged-runs") as damaged_box:
        gr.Markdown("### Damaged runs\nRun folders whose run.json cannot be read. They cannot be used; delete them "
                    "(or repair run.json by hand and press Refresh).")
        dtable = gr.Dataframe(pd.DataFrame(damaged, columns=["run", "problem"]), interactive=False,
                              elem_id="damaged-table")
        with gr.Row(equal_height=True):
            dnames = [r["run"] for r in damaged]
            drun = gr.Dropdown(dnames, value=dnames[0] if dnames else None, label="Damaged run",
                               elem_id="damaged-run")
            dconfirm = gr.Checkbox(False, label="Yes, delete this damaged run")
            ddelete = gr.Button("Delete damaged run", variant="stop", elem_id="damaged-delete")
        dmsg = gr.Markdown("", elem_id="damaged-message")

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
    ctx.job_buttons.append(resume)
    with gr.Row():
        iconfirm = gr.Checkbox(False, label="Yes, delete this interrupted run")
        idelete = gr.Button("Delete interrupted run", variant="stop")
    imsg = gr.Markdown("", elem_id="interrupted-message")

    def list_table():
        return pd.DataFrame(service.list_runs(), columns=COLUMNS)

    @ui_errors
    def do_rename(run_id, new):
        """Rename a saved run; returns a message (the Run choice follows the run to its new name)."""
        rid = service.rename_run(run_id, new)
        return f"renamed {run_id!r} to {rid!r}", gr.Dropdown(choices=service.run_ids(), value=rid)

    @ui_errors
    def do_delete_damaged(run_id, ok):
        if not ok:
            raise gr.Error("tick 'Yes, delete this damaged run' first")
        if run_id not in {r["run"] for r in service.list_damaged()}:
            raise gr.Error(f"{run_id!r} is not a damaged run")
        return service.delete_run(run_id), False

    def refresh_damaged(current):
        rows = service.list_damaged()
        names = [r["run"] for r in rows]
        keep = current if current in names else (names[0] if names else None)
        return [gr.Group(visible=bool(rows)), pd.DataFrame(rows, columns=["run", "problem"]),
                gr.Dropdown(choices=names, value=keep)]

    @ui_errors
    def do_delete(run_id, ok):
        if not ok:
            raise gr.Error("tick 'Yes, delete this run' first")
        return service.delete_run(run_id), False

    @ui_errors
    def do_zip(run_id):
        return str(service.run_zip(run_id))

    @ui_errors
    def do_export(run_id, progress=gr.Progress()):
        progress(0, desc="loading the base model and writing the pipeline")
        return str(service.export_pipeline(run_id))

    ctx.runs_changed.append(rename.click(do_rename, [run, new_name], [rename_msg, run], api_name="rename_run",
                                         concurrency_limit=1))
    ctx.runs_changed.append(ddelete.click(do_delete_damaged, [drun, dconfirm], [dmsg, dconfirm],
                                          api_name="delete_damaged", concurrency_limit=1))
    ctx.add_refresher(refresh_damaged, [drun], [damaged_box, dtable, drun])
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
    def do_resume(run_id, confirmed: bool = True, request: gr.Request = None):
        """Resume an interrupted run from its last checkpoint; returns a message (progress: /job_status)."""
        if not confirmed:
            return "Not resumed."
        rid = service.resume_run(run_id, owner=session_id(request))
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
    confirmed = gr.Checkbox(True, visible=False)
    # the page asks first: resuming starts a long job at once
    resume_ev = resume.click(do_resume, [irun, confirmed], imsg, api_name="resume_run", concurrency_limit=None,
                             show_progress="hidden",
                             js="(run, ok) => [run, confirm(`Resume the interrupted run '${run}' from its last "
                                "checkpoint? It trains until it finishes or is cancelled.`)]")
    ctx.new_run.append((resume_ev, irun))
    ctx.runs_changed.append(idelete.click(do_delete_interrupted, [irun, iconfirm], [imsg, iconfirm],
                                          api_name="delete_interrupted", concurrency_limit=1))
