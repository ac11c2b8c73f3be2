"""The app for a class-conditional DDPM (``erasure-app --model models/shapes-ddpm``): class choices instead of
prompt boxes. Tabs: Erase (forget a class), Compare (original vs a run, per class, judged) and Runs.

Named API endpoints: ``/erase_class`` and ``/compare_class``. The form's controls come from the
:class:`~erasure.ddpm.erase.ClassEraseConfig` fields (label, help, range), see :mod:`erasure_app.forms`.
"""

from __future__ import annotations

from typing import Any

import gradio as gr

from erasure.ddpm.erase import ClassEraseConfig
from erasure_app.class_service import CLASS_FORM_FIELDS, ClassAppService, ClassEraseStopped
from erasure_app.forms import form_fields
from erasure_app.tabs.common import ui_errors
from erasure_app.tabs.fields import control

__all__ = ["create_class_demo", "CSS", "RUN_COLUMNS"]

CSS = """
/* the galleries as tall as their images, as many columns as fit (a phone shows every image, none cut off) */
#class-gallery-a .grid-wrap, #class-gallery-b .grid-wrap { min-height: 0 !important; height: auto !important;
  max-height: none !important; }
#class-gallery-a .grid-container, #class-gallery-b .grid-container {
  grid-template-columns: repeat(auto-fill, minmax(96px, 1fr)) !important; padding-top: 30px !important; }
#class-gallery-a .thumbnail-item, #class-gallery-b .thumbnail-item { height: auto !important; aspect-ratio: 1; }
#class-gallery-a img, #class-gallery-b img { image-rendering: pixelated; }
#class-gallery-a .caption-label, #class-gallery-b .caption-label { font-size: 0.9em; max-width: calc(100% - 8px);
  white-space: nowrap; }
#class-verdict { font-weight: 600; }
"""

RUN_COLUMNS = ["id", "forget class", "anchor", "method", "steps", "time (s)", "weights changed", "created"]


_errors = ui_errors(also=(RuntimeError,), passthrough=(ClassEraseStopped,))
"""Bad input, a missing file or a busy service as a one-line ``gr.Error``; a cancel propagates."""


def _summary_md(s: dict[str, Any]) -> str:
    anchor = s.get("anchor_class") or "random"
    parts = [f"**{s['id']}**: forgot *{s['forget_class']}* (anchor {anchor}) with {s['method']}",
             f"{s['steps']} steps" if s.get("steps") else None,
             f"in {s['time_s']:.0f} s" if s.get("time_s") is not None else None]
    md = ", ".join(p for p in parts if p)
    if s.get("mask_kept") is not None:
        md += f"; the mask let {s['mask_kept']:,} weights change ({s['mask_ratio_kept']:.0%} of the UNet)"
    elif s.get("changed_params") is not None:
        md += f"; {s['changed_params']:,} weights trained"
    return md + "."


def _runs_rows(service: ClassAppService) -> list[list[Any]]:
    rows = []
    for info in service.list_runs():
        s = service.summary(info)
        rows.append([s["id"], s["forget_class"], s.get("anchor_class") or "random", s["method"], s["steps"],
                     s["time_s"], s["mask_kept"] if s.get("mask_kept") is not None else s["changed_params"],
                     s["created"]])
    return rows


def create_class_demo(service: ClassAppService) -> gr.Blocks:
    """Build the class-forgetting UI around ``service`` (loads no model: classes come from ``model_index.json``)."""
    classes = service.classes
    methods = service.methods()
    descriptions = dict(methods)
    fields = {ff.name: ff for ff in form_fields(ClassEraseConfig, CLASS_FORM_FIELDS)}

    with gr.Blocks(title="SalUn class forgetting", analytics_enabled=False) as demo:
        gr.Markdown("## SalUn class forgetting\nForget one class of a class-conditional diffusion model, then compare "
                    "the original and the unlearned model class by class.")
        gr.Markdown(f"Base model: `{service.describe_model()}`", elem_id="class-model")
        with gr.Tabs():
            # ------------------------------------------------------------------------------------ Erase
            with gr.Tab("Erase", id="erase"):
                with gr.Row():
                    with gr.Column(scale=3, min_width=280):
                        ff = fields["forget_class"]
                        forget = gr.Dropdown(classes, value=classes[0], label=ff.label, info=ff.help,
                                             elem_id="class-forget")
                        ff = fields["anchor_class"]
                        anchor = gr.Dropdown(service.anchor_choices(), value=ff.default, label=ff.label, info=ff.help,
                                             elem_id="class-anchor")
                        ff = fields["method"]
                        method = gr.Radio([n for n, _ in methods], value=ff.default, label=ff.label,
                                          elem_id="class-method")
                        method_md = gr.Markdown(descriptions.get(ff.default, ""), elem_id="class-method-description")
                        run_name = gr.Textbox("", label="Run name (optional; letters, digits, _ - .)",
                                              elem_id="class-run-name", max_length=80)
                    with gr.Column(scale=2, min_width=240):
                        knobs = {n: control(fields[n], fields[n].default, elem_id=f"class-{n.replace('_', '-')}")
                                 for n in ("steps", "lr", "mask_ratio", "seed")}
                with gr.Row():
                    erase_btn = gr.Button("Erase", variant="primary", elem_id="class-erase-button")
                    cancel_btn = gr.Button("Cancel", variant="stop", elem_id="class-cancel-button")
                run_id = gr.Textbox(label="Saved run", interactive=False, elem_id="class-run-id")
                summary = gr.Markdown("", elem_id="class-summary")

            # ------------------------------------------------------------------------------------ Compare
            with gr.Tab("Compare", id="compare"):
                runs0 = service.run_ids()
                with gr.Row():
                    run_dd = gr.Dropdown(runs0, value=runs0[0] if runs0 else None, label="Erased model (run)",
                                         elem_id="class-compare-run", min_width=200)
                    cls_dd = gr.Dropdown(classes, value=classes[0], label="Class", elem_id="class-compare-class",
                                         min_width=140)
                    seeds = gr.Textbox("0, 1, 2, 3", label="Seeds", info="commas or spaces; ranges like 0-7; "
                                       "at most 16", elem_id="class-compare-seeds", min_width=140)
                compare_btn = gr.Button("Compare", variant="primary", elem_id="class-compare-button")
                verdict = gr.Markdown("", elem_id="class-verdict")
                with gr.Row():
                    gal_a = gr.Gallery(label="Original", columns=4, height="auto", object_fit="contain",
                                       allow_preview=False, elem_id="class-gallery-a", min_width=160)
                    gal_b = gr.Gallery(label="Erased", columns=4, height="auto", object_fit="contain",
                                       allow_preview=False, elem_id="class-gallery-b", min_width=160)

            # ------------------------------------------------------------------------------------ Runs
            with gr.Tab("Runs", id="runs") as runs_tab:
                runs_table = gr.Dataframe(value=_runs_rows(service), headers=RUN_COLUMNS, interactive=False,
                                          elem_id="class-runs-table")  # no wrap: headers broke per letter at 390 px
                refresh_btn = gr.Button("Refresh", size="sm", elem_id="class-runs-refresh")

        # ---------------------------------------------------------------------------------------- events

        method.change(lambda m: descriptions.get(m, ""), method, method_md, api_visibility="private", queue=False)

        @_errors
        def erase_class(forget_class: str, anchor_class: str, method: str, steps: float, lr: float, mask_ratio: float,
                        seed: float, run_name: str = "", progress=gr.Progress()) -> tuple[str, str]:
            """Forget ``forget_class`` (anchor: a class or 'random'; method: salun, rl, esd-class, ft, retrain);
            returns (run id, summary). A cancelled erasure returns an empty run id and saves nothing."""

            def report(ev):
                progress(ev.fraction, desc=f"{ev.stage} {ev.done}/{ev.total}")

            progress(0, desc="loading the model and drawing images")
            try:
                rid = service.erase(forget_class, anchor_class, method, steps, lr, mask_ratio, seed, run_name,
                                    progress=report)
            except ClassEraseStopped as err:
                gr.Warning(str(err))
                return "", f"Cancelled: {err}."
            return rid, _summary_md(service.summary(service.run_info(rid)))

        def cancel():
            if service.cancel():
                gr.Info("Cancelling: the erasure stops after its current step.")
            else:
                gr.Info("No erasure is running.")

        erase_ev = erase_btn.click(erase_class, [forget, anchor, method, knobs["steps"], knobs["lr"],
                                                 knobs["mask_ratio"], knobs["seed"], run_name], [run_id, summary],
                                   api_name="erase_class", concurrency_limit=1, concurrency_id="class-erase")
        cancel_btn.click(cancel, None, None, api_visibility="private", queue=False)

        def refresh(current: str | None, new_run: str | None = None):
            runs = service.run_ids()
            value = new_run if new_run in runs else (current if current in runs else (runs[0] if runs else None))
            return gr.Dropdown(choices=runs, value=value), _runs_rows(service)

        def after_erase(rid: str, current: str | None):
            dd, rows = refresh(current, rid or None)
            return dd, rows, (service.run_info(rid)["forget_class"] if rid else gr.skip())

        erase_ev.then(after_erase, [run_id, run_dd], [run_dd, runs_table, cls_dd], api_visibility="private",
                      queue=False)
        refresh_btn.click(refresh, run_dd, [run_dd, runs_table], api_visibility="private", queue=False)
        runs_tab.select(refresh, run_dd, [run_dd, runs_table], api_visibility="private", queue=False)
        demo.load(refresh, run_dd, [run_dd, runs_table], api_visibility="private", queue=False)

        def pick_run(rid: str | None):
            if not rid:
                return gr.skip()
            try:
                return service.run_info(rid)["forget_class"]
            except ValueError:
                return gr.skip()

        run_dd.input(pick_run, run_dd, cls_dd, api_visibility="private", queue=False)

        @_errors
        def compare_class(run: str, class_name: str, seeds: str = "0, 1, 2, 3"):
            """Images of ``class_name`` from the original model and from ``run`` on the same seeds, each captioned
            with the shapes judge's label; returns (original gallery, erased gallery, verdict line)."""
            res = service.compare(run, class_name, seeds)
            # captions: the judge's label only (a phone thumbnail is ~100 px wide); the seeds are in the line above
            a, b = list(res["original"]), list(res["erased"])
            seen_a = sum(lab == res["forget_class"] for _, lab in a)
            seeds_txt = ", ".join(map(str, res["seeds"]))
            line = (f"judge: forget class *{res['forget_class']}* seen in {res['forget_seen']} of {res['n']} erased "
                    f"images (original: {seen_a} of {res['n']}). Class *{res['class']}*, seeds {seeds_txt} "
                    "(left to right); captions are the judge's labels.")
            return gr.Gallery(a, label="Original"), gr.Gallery(b, label=f"Erased ({res['run']})"), line

        compare_btn.click(compare_class, [run_dd, cls_dd, seeds], [gal_a, gal_b, verdict], api_name="compare_class",
                          concurrency_limit=1, concurrency_id="class-compare")
    return demo
