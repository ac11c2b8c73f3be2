"""The web app: ``create_demo(service)`` builds the UI; ``main()`` turns command-line flags into launch kwargs.

    python -m erasure_app                      # embedded shapes model on http://127.0.0.1:7860
    python -m erasure_app --model ./sd-v1-4 --port 7861 --auth alice:secret
    python -m erasure_app --model models/shapes-ddpm  # a class-conditional DDPM: the class app (tabs/class_app.py)

Named API endpoints (for ``gradio_client``): ``/erase``, ``/compare``, ``/inspect``, ``/evaluate``,
``/attack`` (an adversarial-prompt attack on a run), ``/rename_run``, ``/delete_run``, ``/download_run``, ``/export_run``, ``/list_interrupted``, ``/resume_run``,
``/delete_interrupted``, ``/delete_damaged``, ``/job_status`` (the running job and the queue) and ``/cancel`` (the running job, or a
run's job by name). The class app has ``/erase_class`` and ``/compare_class``.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Any

# no request leaves the machine: gradio analytics and hub telemetry off before gradio is imported
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import gradio as gr  # noqa: E402

from erasure.threads import help_text as threads_help  # noqa: E402
from erasure_app.service import ORIGINAL, AppError, AppService  # noqa: E402
from erasure_app.tabs import attack as attack_tab  # noqa: E402
from erasure_app.tabs import banner as banner_tab  # noqa: E402
from erasure_app.tabs import class_app as class_tab  # noqa: E402
from erasure_app.tabs import compare as compare_tab  # noqa: E402
from erasure_app.tabs import erase as erase_tab  # noqa: E402
from erasure_app.tabs import evaluate as evaluate_tab  # noqa: E402
from erasure_app.tabs import inspect as inspect_tab  # noqa: E402
from erasure_app.tabs import runs as runs_tab  # noqa: E402
from erasure_app.tabs.common import UIContext  # noqa: E402

logger = logging.getLogger(__name__)

__all__ = ["create_demo", "create_app", "parse_args", "launch_kwargs", "main"]

CSS = """
#compare-gallery-a, #compare-gallery-b { min-height: 200px; }
/* help text readable (the theme's default is about 1.9:1 on white) */
.gradio-container { --block-info-text-color: #4b5563; }
.dark .gradio-container, .gradio-container.dark { --block-info-text-color: #c4c9d1; }
""" + banner_tab.CSS + compare_tab.CSS + evaluate_tab.CSS + attack_tab.CSS + class_tab.CSS

FAVICON = ("<link rel=\"icon\" type=\"image/svg+xml\" href=\"data:image/svg+xml,"
           "%3Csvg xmlns='http://www.w3.org/2000/svg' viewBox='0 0 32 32'%3E%3Crect width='32' height='32' rx='6' "
           "fill='%23ea580c'/%3E%3Ccircle cx='16' cy='16' r='9' fill='none' stroke='white' stroke-width='3'/%3E"
           "%3Cpath d='M8 24 24 8' stroke='white' stroke-width='3'/%3E%3C/svg%3E\">")
"""The app's own favicon (an erased circle), inline: no file to ship, no request leaves the page."""


def default_gen_concurrency(service: AppService) -> int:
    """Generation requests served at once: 1 on CPU (two would only share the cores), 2 on a GPU."""
    import torch

    return 2 if str(service.device) != "cpu" and torch.cuda.is_available() else 1


def create_demo(service: AppService, gen_concurrency: int | None = None) -> gr.Blocks:
    """Build the app's UI around ``service``; returns the (unlaunched) ``gr.Blocks``."""
    ctx = UIContext(gen_concurrency=gen_concurrency or default_gen_concurrency(service))
    with gr.Blocks(title="SalUn concept erasure", analytics_enabled=False) as demo:
        gr.Markdown("## SalUn concept erasure\nErase a concept from a diffusion model, then compare the original "
                    "and the unlearned model side by side.")
        banner, banner_cancel, timer = banner_tab.build(service, ctx)
        with gr.Tabs(overflow_behavior="wrap"):  # every tab name visible on a phone, not behind "..."
            with gr.Tab("Erase", id="erase"):
                erase_tab.build(service, ctx)
            with gr.Tab("Compare", id="compare"):
                compare_tab.build(service, ctx)
            with gr.Tab("Inspect", id="inspect"):
                inspect_tab.build(service, ctx)
            with gr.Tab("Evaluate", id="evaluate"):
                evaluate_tab.build(service, ctx)
            with gr.Tab("Attack", id="attack"):
                attack_tab.build(service, ctx)
            with gr.Tab("Runs", id="runs") as runs_page:
                runs_tab.build(service, ctx)
        tick, job_changed = banner_tab.wire(service, ctx, banner, banner_cancel, timer, demo)
        # opening the Runs tab shows runs that finished or were interrupted meanwhile
        ctx.runs_changed.append(runs_page.select(lambda: None, None, None, api_visibility="private", queue=False))

        dropdowns = [dd for dd, _, _ in ctx.run_dropdowns]
        extra_inputs = [c for ins, _, _ in ctx.refreshers for c in ins]
        inputs = dropdowns + extra_inputs
        outputs = (dropdowns + ([ctx.runs_table] if ctx.runs_table is not None else [])
                   + [c for _, outs, _ in ctx.refreshers for c in outs])

        def refresh(*current, new_run: str | None = None):
            runs = service.run_ids()
            ups: list[Any] = []
            rest = list(current[len(dropdowns):])
            for (_, with_original, follow), value in zip(ctx.run_dropdowns, current):
                choices = ([ORIGINAL] if with_original else []) + runs
                if follow and new_run in runs:
                    ups.append(gr.Dropdown(choices=choices, value=new_run))
                elif value in choices:
                    # choices only: a refresh that read the value before another event set it (a poll racing the
                    # erasure's own refresh) must not put the old value back
                    ups.append(gr.Dropdown(choices=choices))
                else:
                    ups.append(gr.Dropdown(choices=choices, value=runs[0] if runs else (ORIGINAL if with_original
                                                                                          else None)))
            if ctx.runs_table is not None:
                ups.append(ctx.list_table())
            for ins, _, fn in ctx.refreshers:
                ups.extend(fn(*rest[:len(ins)]))
                rest = rest[len(ins):]
            return ups

        def refresh_new(new_run, *current):
            return refresh(*current, new_run=new_run)

        def refresh_if(changed, *current):
            return refresh(*current) if changed else [gr.skip()] * len(outputs)

        # a job started or ended (in any window): refresh the runs views
        tick.then(refresh_if, [job_changed] + inputs, outputs, api_visibility="private", queue=False,
                  show_progress="hidden")
        for ev in ctx.runs_changed:
            ev.then(refresh, inputs, outputs, api_visibility="private", queue=False)
        for ev, comp in ctx.new_run:
            ev.then(refresh_new, [comp] + inputs, outputs, api_visibility="private", queue=False)
        demo.load(refresh, inputs, outputs, api_visibility="private", queue=False)
    return demo


def _auth(values: list[str] | None) -> list[tuple[str, str]] | None:
    if not values:
        return None
    out = []
    for v in values:
        if ":" not in v:
            raise SystemExit(f"--auth takes USER:PASSWORD, got {v!r}")
        user, pw = v.split(":", 1)
        if not user or not pw:
            raise SystemExit("--auth needs a non-empty user and password")
        out.append((user, pw))
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="erasure-app", description="Web app: erase a concept and compare generations.",
                                epilog=threads_help())
    p.add_argument("--model", default="default",
                   help="Base model: a local diffusers folder (SD v1/v2, SDXL, SD3 or FLUX), a hub id, or 'default' "
                   "(the embedded shapes model).")
    p.add_argument("--runs-dir", default="runs", help="Where runs are saved (default ./runs).")
    p.add_argument("--host", default="127.0.0.1", help="Interface to listen on (0.0.0.0 to serve the network).")
    p.add_argument("--port", type=int, default=7860, help="Port (default 7860).")
    p.add_argument("--auth", action="append", metavar="USER:PASSWORD",
                   help="Require a login; repeat for several users.")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N.")
    p.add_argument("--cache-size", type=int, default=2, help="Loaded models kept in memory (default 2).")
    p.add_argument("--data-cache-dir", default=None, help="Cache of generated Df/Dr images (default ~/.cache/salun-erasure).")
    p.add_argument("--judge", default="auto", choices=["auto", "shapes", "nudenet", "none"],
                   help="What scores generated images: auto = shapes judge for the embedded model, NudeNet otherwise "
                        "(shapes also selects the shapes presets, for a shapes model in another folder).")
    p.add_argument("--gen-concurrency", type=int, default=None,
                   help="Generation requests served at once (default 1 on CPU, 2 on GPU); the rest queue.")
    p.add_argument("--max-queue", type=int, default=64, help="Most requests waiting in the queue.")
    p.add_argument("--log-level", default="INFO")
    return p.parse_args(argv)


def launch_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The ``gr.Blocks.launch`` keyword arguments for these flags (never a share link)."""
    return dict(server_name=args.host, server_port=args.port, auth=_auth(args.auth), share=False, show_error=True,
                ssr_mode=False, css=CSS, head=FAVICON, footer_links=["api", "settings"], allowed_paths=None)


def create_app(args: argparse.Namespace) -> tuple[Any, gr.Blocks]:
    """The service and the (unlaunched) demo for these flags: a class-conditional DDPM folder gets the class app
    (:mod:`erasure_app.tabs.class_app`), anything else the text-to-image app."""
    from erasure.ddpm.model import is_class_ddpm_folder

    if args.model not in ("", "default") and is_class_ddpm_folder(args.model):
        from erasure.diffusion.pipeline import resolve_device
        from erasure_app.class_service import ClassAppService
        from erasure_app.tabs.class_app import create_class_demo

        service = ClassAppService(args.model, args.runs_dir, device=str(resolve_device(args.device)))
        return service, create_class_demo(service)
    service = AppService(model=args.model, runs_dir=args.runs_dir, device=args.device, cache_size=args.cache_size,
                         data_cache_dir=args.data_cache_dir, judge=args.judge)
    Path(service.runs_dir).mkdir(parents=True, exist_ok=True)
    demo = create_demo(service, gen_concurrency=args.gen_concurrency)
    return service, demo


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    kwargs = launch_kwargs(args)
    try:
        service, demo = create_app(args)
    except (AppError, ValueError) as err:
        print(f"erasure-app: {err}", file=sys.stderr)
        return 2
    demo.queue(default_concurrency_limit=1, max_size=args.max_queue)
    logger.info("serving %s on http://%s:%d", service.describe_model(), args.host, args.port)
    demo.launch(**kwargs)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
