"""The job banner above the tabs: the service's running job (whoever started it), its progress, ETA and loss,
the queue, and a Cancel button; a timer polls the service, so a reloaded page or a second window sees the job.

Named API endpoints: ``/job_status`` (the service's :meth:`~erasure_app.service.AppService.job_status`) and
``/cancel`` (no argument: the running job; a run name: that run's job, running or waiting).
"""

from __future__ import annotations

import html
from collections import OrderedDict
from typing import Any

import gradio as gr

from erasure_app.service import AppService
from erasure_app.tabs.common import UIContext, session_id

POLL_S = 1.0

CSS = """
#job-banner { position: fixed; left: 0; right: 0; bottom: 0; z-index: 50; margin: 0; padding: 4px 12px;
  background: var(--background-fill-primary); border-top: 1px solid var(--border-color-primary);
  box-shadow: 0 -2px 8px rgba(0, 0, 0, 0.12); flex-wrap: wrap; gap: 6px; }
#job-banner-text { min-width: 240px; flex: 100 1 240px; }
#job-cancel { flex: 0 0 auto; align-self: center; max-width: 140px; }
body, .gradio-container { padding-bottom: 96px !important; }
#job-banner .job { font-size: 0.95em; line-height: 1.35; }
#job-banner .bar { height: 6px; background: var(--border-color-primary); border-radius: 3px; margin-top: 3px; }
#job-banner .bar > div { height: 6px; background: var(--color-accent); border-radius: 3px; }
.small-note { font-size: 0.85em; color: var(--body-text-color); }
"""


def fmt_seconds(s: float | None) -> str:
    if s is None:
        return "estimating"
    s = int(round(s))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {s % 3600 // 60:02d} min"


KIND_WORDS = {"erase": "Erasure", "resume": "Resumed erasure", "evaluate": "Evaluation"}


ELSEWHERE = "started in another window"

CONFIRM_JS = f"""(ok) => {{
  const t = document.querySelector('#job-banner-text');
  if (t && t.innerText.includes('{ELSEWHERE}')) {{
    return confirm('This job was {ELSEWHERE}. Cancel it?');
  }}
  return true;
}}"""


def banner_html(st: dict[str, Any], elsewhere: bool = False) -> str:
    """The banner's HTML for a :meth:`~erasure_app.service.AppService.job_status` answer."""
    esc = html.escape
    if not st.get("running"):
        last = st.get("last") or ""
        return ('<div class="job idle"><b>No job is running.</b>' + (f" Last: {esc(last)}" if last else "")
                + "</div>")
    parts = [f"<b>{KIND_WORDS.get(st['kind'], st['kind'])} of run '{esc(str(st['run']))}'</b>"
             + (f" ({ELSEWHERE})" if elsewhere else "")]
    if st.get("cancelling"):
        parts.append("<b>cancelling…</b> (stops after its current step)")
    stage = esc(str(st.get("stage") or ""))
    if st.get("total"):
        stage += f" {st['step']}/{st['total']}"
    parts.append(stage)
    if st.get("percent") is not None:
        parts.append(f"{st['percent']:.0f}% overall")
    parts.append(f"ETA {fmt_seconds(st.get('eta_s'))}")
    if isinstance(st.get("loss"), (int, float)):
        parts.append(f"loss {st['loss']:.4g}")
    text = " · ".join(parts)
    queue = st.get("queue") or []
    if queue:
        text += f"<br>Waiting ({len(queue)}): " + ", ".join(esc(q["run"]) for q in queue)
    for o in st.get("others") or []:
        text += f"<br>Also running: {KIND_WORDS.get(o['kind'], o['kind']).lower()} of run '{esc(str(o['run']))}'"
    pct = st.get("percent") or 0.0
    bar = f'<div class="bar"><div style="width:{pct:.1f}%"></div></div>'
    return f'<div class="job running">{text}{bar}</div>'


def build(service: AppService, ctx: UIContext) -> tuple[Any, Any, Any]:
    """The banner (HTML), its Cancel button and the poll timer; call before the tabs."""
    with gr.Row(elem_id="job-banner"):
        banner = gr.HTML(banner_html(service.job_status()), elem_id="job-banner-text", padding=False)
        cancel = gr.Button("Cancel job", variant="stop", elem_id="job-cancel", scale=0, min_width=110, size="sm",
                           interactive=service.job_status()["running"])
    timer = gr.Timer(POLL_S)
    ctx.banner = banner
    return banner, cancel, timer


CLIENT_JS = """() => {
  let id = sessionStorage.getItem('salun-job-client');
  if (!id) { id = Math.random().toString(36).slice(2) + Date.now().toString(36);
             sessionStorage.setItem('salun-job-client', id); }
  return id;
}"""
"""A per-window id that survives a reload (sessionStorage): a reloaded window is not "another window"."""

MAX_CLIENTS = 1000


def wire(service: AppService, ctx: UIContext, banner: Any, cancel: Any, timer: Any, demo: Any = None) -> Any:
    """Poll the service into the banner, the job buttons and the live loss chart; wire Cancel and the API.

    Returns the poll event (its ``changed`` state output is True when a job started or ended since the last poll).
    """
    from erasure_app.tabs.erase import _loss_frame

    seen = gr.State(None)
    changed = gr.State(False)
    client = gr.Textbox("", visible=False, elem_id="job-client")
    if demo is not None:
        demo.load(None, None, client, js=CLIENT_JS)
    windows: OrderedDict[str, str] = OrderedDict()  # browser session -> window id (bounded)

    def poll(last, client_id, request: gr.Request):
        st = service.job_status()
        me = session_id(request)
        if me and client_id:
            windows[me] = client_id
            windows.move_to_end(me)
            while len(windows) > MAX_CLIENTS:
                windows.popitem(last=False)
        owner = service.job_owner()
        mine = owner == me or (bool(client_id) and windows.get(owner or "") == client_id)
        elsewhere = bool(st["running"] and owner and not mine)
        key = (st["kind"], st["run"]) if st["running"] else None
        training = st["running"] and st["kind"] in ("erase", "resume")
        out = [banner_html(st, elsewhere), gr.Button(interactive=bool(st["running"])), key, key != last]
        out += [gr.Button(interactive=not training) for _ in ctx.job_buttons]
        if ctx.live_loss is not None:
            losses = service.job_losses() if training else []
            out.append(_loss_frame(losses) if losses else gr.skip())
        return out

    outputs = [banner, cancel, seen, changed] + list(ctx.job_buttons)
    if ctx.live_loss is not None:
        outputs.append(ctx.live_loss)
    tick = timer.tick(poll, [seen, client], outputs, api_visibility="private", queue=False, show_progress="hidden")

    def job_status() -> dict:
        """The running job and the queue: ``running``, ``kind``, ``run``, ``stage``, ``step``, ``total``,
        ``percent``, ``eta_s``, ``loss``, ``cancelling``, ``queue`` (waiting jobs), ``last``."""
        return service.job_status()

    def cancel_job(run: str | None = None) -> str:
        """Cancel the running job (no argument) or the job of run ``run`` (running or waiting)."""
        return service.cancel(run=run or None)

    gr.api(job_status, api_name="job_status", queue=False)
    gr.api(cancel_job, api_name="cancel", queue=False)

    def do_cancel(ok):
        st = service.job_status()
        if not ok:  # the confirmation (a job started in another window) was declined
            return gr.skip(), None
        msg = service.cancel()
        gr.Info(msg)
        st = service.job_status()
        return banner_html(st), st["run"]

    def wait_stopped(run):
        if run:
            service.wait_stopped(run=run, timeout=300)

    stopping = gr.State(None)
    confirmed = gr.Checkbox(True, visible=False)
    # a job started in another window (or over the API) is cancelled only after a confirmation in the browser
    ev = cancel.click(do_cancel, confirmed, [banner, stopping], js=CONFIRM_JS, api_visibility="private",
                      queue=False, show_progress="hidden")
    ctx.runs_changed.append(ev.then(wait_stopped, stopping, None, api_visibility="private", concurrency_limit=None,
                                    show_progress="hidden"))
    return tick, changed
