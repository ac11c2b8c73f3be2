"""Attack tab ("Attack this run"): one prompt, a registered adversarial-prompt attack against a saved run, then the
adversarial prompt and the original vs. erased images side by side with the judge's verdict (``/attack``)."""

from __future__ import annotations

import html

import gradio as gr

from erasure_app.attack_service import ATTACK_CHOICES, run_attack_job
from erasure_app.service import AppService
from erasure_app.tabs.common import UIContext, ui_errors

CSS = """
#attack-verdict .ok { color: #15803d; font-weight: 600; } #attack-verdict .bad { color: #b91c1c; font-weight: 600; }
#attack-images .atk-grid { display: grid; grid-template-columns: repeat(auto-fit, minmax(200px, 1fr)); gap: 12px; }
#attack-images figure { margin: 0; }
#attack-images img { width: 256px; max-width: 100%; height: auto; image-rendering: pixelated; display: block; }
#attack-images figcaption { font-size: 0.9em; padding: 3px 0; overflow-wrap: anywhere; }
"""

ATTACK_LABELS = [("UnlearnDiffAtk (white-box prefix)", "unlearndiffatk"), ("Ring-A-Bell (black-box)", "ringabell"),
                 ("Random prefix (baseline)", "random")]


def verdict_html(res: dict) -> str:
    def word(ok: bool) -> str:
        return '<span class="bad">concept seen</span>' if ok else '<span class="ok">not seen</span>'

    it = f", at iteration {res['iteration']}" if res.get("iteration") else ""
    return (f"<p><b>Adversarial prompt:</b> <code>{html.escape(res['adv_prompt'])}</code></p>"
            f"<p>Erased model, plain prompt: {word(res['success_pre'])} · after the attack: "
            f"{word(res['success_post'])} ({res['generations']} generations checked{it}) · concept: "
            f"{html.escape(res.get('concept') or '?')}</p>")


def images_html(res: dict) -> str:
    """Original model, erased model with the plain prompt, erased model with the adversarial prompt, as inline
    PNGs with the judge's verdict under each."""
    import base64
    from pathlib import Path

    titles = {"original": "Original model, plain prompt", "pre": "Erased model, plain prompt",
              "post": "Erased model, adversarial prompt"}
    figs = []
    for k, title in titles.items():
        data = base64.b64encode(Path(res["images"][k]).read_bytes()).decode()
        figs.append(f'<figure><img alt="{html.escape(title)}" src="data:image/png;base64,{data}"><figcaption>'
                    f"<b>{html.escape(title)}</b><br>judge: {html.escape(res['captions'][k])}</figcaption></figure>")
    return '<div class="atk-grid">' + "".join(figs) + "</div>"


def build(service: AppService, ctx: UIContext) -> None:
    runs = service.run_ids()
    gr.Markdown("Search for a prompt that brings the erased concept back. The judge decides whether the concept is in "
                "the erased model's image (same seed as the plain prompt). UnlearnDiffAtk optimises a short token "
                "prefix against the run's own denoising loss; Ring-A-Bell searches a prompt along the concept's "
                "direction in text-embedding space; the random prefix is the baseline.")
    with gr.Row():
        run = ctx.add_run_dropdown(gr.Dropdown(runs, value=runs[0] if runs else None, label="Run",
                                               allow_custom_value=True, elem_id="attack-run"))
        prompt = gr.Textbox("a photo of a red circle" if service.judge_kind == "shapes" else "", label="Prompt",
                            elem_id="attack-prompt", scale=2, min_width=240)
        seed = gr.Number(0, precision=0, label="Seed", elem_id="attack-seed")
    with gr.Row():
        attack = gr.Dropdown(ATTACK_LABELS, value=ATTACK_CHOICES[0], label="Attack", elem_id="attack-kind", min_width=260)
        timesteps = gr.Number(10, precision=0, label="Checks (generations)", elem_id="attack-timesteps",
                              info="UnlearnDiffAtk/random: images judged at most (paper: 50).")
        iterations = gr.Number(10, precision=0, label="Steps between checks", elem_id="attack-iterations",
                               info="UnlearnDiffAtk optimisation steps per check (paper: 40).")
        prefix = gr.Number(3, precision=0, label="Prefix tokens", elem_id="attack-prefix",
                           info="Paper: 3 for objects, 5 for nudity.")
    with gr.Row():
        go = gr.Button("Attack", variant="primary", elem_id="attack-button")
        stop = gr.Button("Cancel", variant="stop", elem_id="attack-cancel")
    verdict = gr.HTML("", elem_id="attack-verdict")
    # the three images side by side (one under the other on a phone), each with the judge's verdict
    images = gr.HTML("", elem_id="attack-images", padding=False)

    @ui_errors
    def do_attack(run_id, prompt, seed, attack, timesteps, iterations, prefix, progress=gr.Progress()):
        progress(0, desc="starting")
        knobs = {"timesteps": timesteps, "iterations": iterations, "prefix_length": prefix}

        def on_event(ev):
            progress((ev.done, ev.total) if ev.total else 0, desc="attacking")

        res = run_attack_job(service, run_id, prompt, seed, attack, knobs, progress=on_event)
        return verdict_html(res), images_html(res)

    go.click(do_attack, [run, prompt, seed, attack, timesteps, iterations, prefix], [verdict, images],
             api_name="attack", concurrency_id="generate", concurrency_limit=ctx.gen_concurrency)
    stop.click(lambda run_id: service.cancel(run=run_id), [run], None, api_name="cancel_attack", queue=False)
