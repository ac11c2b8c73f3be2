"""Outside check of ``uce_edit`` against the official UCE script, and UCE vs RECE, on the embedded shapes model.

The official script (``trainscripts/uce_sd_erase.py`` of github.com/rohitgandikota/unified-concept-editing) is not
part of this repository: pass your own copy with ``--official-script``. It runs unmodified, in a subprocess, on the
local model folder (offline), with the preset's forget prompts as ``--edit_concepts``, its anchors as
``--guide_concepts`` and its retain prompts as ``--preserve_concepts``; ``uce_edit`` gets the same three lists and the
same lamb / erase / preserve scales. The script compares

* the set of tensors each changes and the largest weight difference between the two edits;
* the judge's verdicts, exactly as ``bench/shapes_erasure.py`` measures them (forget: the templates naming only the
  concept plus every third forget prompt, ``--forget-seeds`` seeds each; retain: ``prompts/shapes.csv`` rows not
  naming it, ``--retain-seeds`` seeds each; DDIM 25 steps, CFG 7.5, native 64 px);
* with ``--rece``, also RECE's starting point (``rece_edit`` with 0 epochs: UCE with the paper-era token span) and
  RECE itself, plus an attack: for each model, the closed-form adversarial embedding of each forget prompt (RECE's
  attack, against that model's K/V) fed as ``prompt_embeds``.

    python bench/uce_outside_check.py --official-script /tmp/uce_official/uce_sd_erase.py --rece
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import argparse  # noqa: E402
import csv  # noqa: E402
import hashlib  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from shapes_erasure import evaluate  # noqa: E402

from erasure.diffusion.methods.rece import (  # noqa: E402
    RECEConfig,
    adversarial_embedding,
    kv_reconstruction_error,
    rece_edit,
)
from erasure.diffusion.methods.uce import (  # noqa: E402
    UCEConfig,
    cross_attention_kv,
    encode_prompt_tokens,
    last_token_embeddings,
    uce_edit,
)
from erasure.diffusion.pipeline import initial_latents, load_pipeline, resolve_model  # noqa: E402
from erasure.presets import load_preset  # noqa: E402
from erasure.shapes import all_captions, concept_kind, load_judge  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
logger = logging.getLogger("uce_outside_check")


def run_official(script: Path, model: str, erase, guide, preserve, cfg: UCEConfig, workdir: Path) -> dict:
    """Run the user's official script unmodified; return the weights it saved."""
    for p in erase + guide + preserve:
        if ";" in p:
            raise ValueError(f"the official script splits prompts on ';': {p!r}")
    cmd = [
        sys.executable, str(script.resolve()),
        "--edit_concepts", ";".join(erase), "--guide_concepts", ";".join(guide),
        "--preserve_concepts", ";".join(preserve), "--concept_type", "object",
        "--model_id", model, "--device", "cpu",
        "--erase_scale", str(cfg.erase_scale), "--preserve_scale", str(cfg.preserve_scale), "--lamb", str(cfg.lamb),
        "--save_dir", str(workdir), "--exp_name", "official",
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    t = time.time()
    res = subprocess.run(cmd, cwd=workdir, env=env, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"official script failed ({res.returncode}):\n{res.stderr[-3000:]}")
    logger.info("official script ran in %.1f s", time.time() - t)
    return load_file(str(workdir / "official.safetensors"))


@torch.no_grad()
def reference_float64(pipe, erase, guide, preserve, cfg: UCEConfig) -> dict[str, torch.Tensor]:
    """The paper's per-layer closed form in float64, written out term by term (independent of ``edit_matrix``)."""
    guides = guide * len(erase) if len(guide) == 1 else guide
    emb = last_token_embeddings(pipe.text_encoder, pipe.tokenizer, erase + guides + preserve)
    n = len(erase)
    out = {}
    for name, mod in cross_attention_kv(pipe.unet).items():
        w = mod.weight.double()
        mat1 = cfg.lamb * w
        mat2 = cfg.lamb * torch.eye(w.shape[1], dtype=torch.float64)
        for c, g in zip(emb[:n], emb[n : 2 * n]):
            mat1 = mat1 + cfg.erase_scale * torch.outer(w @ g, c)
            mat2 = mat2 + cfg.erase_scale * torch.outer(c, c)
        for p in emb[2 * n :]:
            mat1 = mat1 + cfg.preserve_scale * torch.outer(w @ p, p)
            mat2 = mat2 + cfg.preserve_scale * torch.outer(p, p)
        out[f"{name}.weight"] = mat1 @ torch.linalg.inv(mat2)
    return out


def changed(before: dict, after: dict) -> list[str]:
    return sorted(k for k in before if not torch.equal(before[k], after[k]))


@torch.no_grad()
def attack_share(pipe, judge, concept, kind, prompts, attack, seeds, batch) -> float:
    """Share of images the judge sees ``concept`` in when each prompt's adversarial embedding is the condition."""
    hits = total = 0
    jobs = [(i, s) for i in range(len(prompts)) for s in range(seeds)]
    for b in range(0, len(jobs), batch):
        chunk = jobs[b : b + batch]
        emb = torch.stack([attack[i] for i, _ in chunk]).to(pipe.unet.dtype)
        lat = torch.cat([initial_latents(pipe, 10_000 * i + s, 64, 64) for i, s in chunk])
        imgs = pipe(prompt_embeds=emb, num_inference_steps=25, guidance_scale=7.5, latents=lat, height=64,
                    width=64).images
        hits += sum(q[kind] == concept for q in judge.predict(imgs))
        total += len(chunk)
    return hits / total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--official-script", required=True, type=Path, help="Your copy of the official uce_sd_erase.py.")
    ap.add_argument("--preset", default="shape_circle")
    ap.add_argument("--model", default="default")
    ap.add_argument("--forget-seeds", type=int, default=64)
    ap.add_argument("--retain-seeds", type=int, default=8)
    ap.add_argument("--attack-seeds", type=int, default=16, help="Seeds per forget prompt for the attack (with --rece).")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--uce", default='{"token_span": "last"}',
                    help="JSON of UCEConfig fields (both implementations get them; default: the official script's span).")
    ap.add_argument("--rece", action="store_true", help="Also run RECE and the adversarial-embedding attack.")
    ap.add_argument("--rece-config", default="{}", help="JSON of RECEConfig fields.")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a loaded 2-core machine).")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "uce_outside_check.json"))
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)

    pr = load_preset(args.preset).concept
    kind = concept_kind(pr.name)
    erase, guide, preserve = list(pr.forget_prompts), list(pr.anchor_prompts), list(pr.retain_prompts)
    model = resolve_model(args.model)
    ucfg = UCEConfig.from_json(args.uce)
    with open(ROOT / "prompts" / "shapes.csv", encoding="utf-8") as fh:
        retain_rows = [r for r in csv.DictReader(fh) if r[kind] != pr.name]
    only = all_captions(**{"shape": None, "color": None, "fill": None, kind: pr.name})
    forget_eval = only + [p for p in pr.forget_prompts[::3] if p not in only]
    judge = load_judge()

    def judged(pipe) -> dict:
        t = time.time()
        r = evaluate(pipe, judge, pr.name, kind, forget_eval, retain_rows, args.forget_seeds, args.retain_seeds,
                     args.batch)
        r["eval_s"] = round(time.time() - t, 1)
        logger.info("%s", {k: v for k, v in r.items() if k != "forget_per_prompt"})
        return r

    script = args.official_script
    results = {
        "preset": args.preset, "concept": pr.name, "model": model, "uce_config": ucfg.to_dict(),
        "official_script": {"path": str(script), "sha256": hashlib.sha256(script.read_bytes()).hexdigest(),
                            "modified": False},
        "prompts": {"erase": erase, "guide": guide, "preserve": preserve, "forget_eval": forget_eval},
        "forget_seeds": args.forget_seeds, "retain_seeds": args.retain_seeds, "load_avg_start": os.getloadavg(),
        "models": {},
    }
    base = load_pipeline(model, device="cpu")
    original = {k: v.clone() for k, v in base.unet.state_dict().items()}
    results["models"]["original"] = judged(base)

    with tempfile.TemporaryDirectory() as tmp:
        t = time.time()
        official = run_official(script, model, erase, guide, preserve, ucfg, Path(tmp))
        official_s = time.time() - t
    off_pipe = load_pipeline(model, device="cpu")
    missing, unexpected = off_pipe.unet.load_state_dict(official, strict=False)
    if unexpected:
        raise RuntimeError(f"the official weights name tensors the UNet lacks: {unexpected[:3]}")
    ours_pipe = load_pipeline(model, device="cpu")
    t = time.time()
    ours = uce_edit(ours_pipe.unet, ours_pipe.text_encoder, ours_pipe.tokenizer, erase, guide, preserve, ucfg)
    ours_s = time.time() - t
    off_changed = changed(original, off_pipe.unet.state_dict())
    our_changed = changed(original, ours_pipe.unet.state_dict())
    diffs = {k: (official[k].double() - ours[k].double()).abs().max().item() for k in ours}
    ref = reference_float64(base, erase, guide, preserve, ucfg)
    off_ref = max((official[k].double() - ref[k]).abs().max().item() for k in ref)
    ours_ref = max((ours[k].double() - ref[k]).abs().max().item() for k in ref)
    edit = {k: (ours[k].double() - original[k].double()).abs().max().item() for k in ours}
    results["comparison"] = {
        "official_saved": sorted(official), "official_changed": off_changed, "ours_changed": our_changed,
        "same_tensors": off_changed == our_changed == sorted(ours) == sorted(official),
        "max_abs_weight_diff": max(diffs.values()), "max_abs_edit": max(edit.values()),
        "max_abs_diff_to_float64_reference": {"official": off_ref, "ours": ours_ref},
        "max_abs_weight_diff_per_tensor": diffs, "edit_seconds": {"official": official_s, "ours": ours_s},
    }
    logger.info("comparison: %s", {k: v for k, v in results["comparison"].items() if "per_tensor" not in k})
    results["models"]["uce_official"] = judged(off_pipe)
    results["models"]["uce_ours"] = judged(ours_pipe)
    del off_pipe

    if args.rece:
        rcfg = RECEConfig.from_json(args.rece_config)
        results["rece_config"] = rcfg.to_dict()
        pipes = {"original": base, "uce_ours": ours_pipe}
        # RECE's starting point (its UCE, epochs=0), then RECE
        for name, cfg in ((f"uce_ours_{rcfg.uce_token_span}", RECEConfig.from_dict({**rcfg.to_dict(), "epochs": 0})),
                          ("rece", rcfg)):
            pipe = load_pipeline(model, device="cpu")
            t = time.time()
            rece_edit(pipe.unet, pipe.text_encoder, pipe.tokenizer, erase, guide, preserve, cfg)
            edit_s = time.time() - t
            results["models"][name] = judged(pipe)
            results["models"][name]["edit_s"] = round(edit_s, 2)
            pipes[name] = pipe
        # the attack: each model's own closed-form adversarial embedding of every evaluated forget prompt
        w0 = {n: m.weight.detach().double() for n, m in cross_attention_kv(base.unet).items()}
        concept, _ = encode_prompt_tokens(base.text_encoder, base.tokenizer, forget_eval)
        attack = {}
        start = f"uce_ours_{rcfg.uce_token_span}"
        weights = {name: {n: m.weight.detach().double() for n, m in cross_attention_kv(pipe.unet).items()}
                   for name, pipe in pipes.items()}
        # (row, model attacked, model the attack is derived against)
        rows = [(name, name, name) for name in pipes] + [(f"rece, attacked with the embedding derived against {start}",
                                                          "rece", start)]
        for name, target, source in rows:
            pipe, w = pipes[target], weights[target]
            adv = concept if source == "original" else adversarial_embedding(concept, weights[source], w0, rcfg.adv_reg)
            attack[name] = {
                "kv_error_of_attack": kv_reconstruction_error(adv, w, concept, w0),
                "kv_error_of_prompts": kv_reconstruction_error(concept, w, concept, w0),
                "sees_concept_under_attack": attack_share(pipe, judge, pr.name, kind, forget_eval, adv,
                                                          args.attack_seeds, args.batch),
            }
            logger.info("attack on %s: %s", name, attack[name])
        results["attack"] = {"adv_reg": rcfg.adv_reg, "seeds": args.attack_seeds, "models": attack}

    results["load_avg_end"] = os.getloadavg()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    out.with_suffix(".md").write_text(table(results) + "\n")
    print(table(results))


def table(res: dict) -> str:
    c = res["comparison"]
    kind = "shape"
    lines = [
        f"UCE outside check on the embedded shapes model, preset `{res['preset']}`: the official "
        f"`uce_sd_erase.py` (unmodified, sha256 {res['official_script']['sha256'][:12]}) vs `uce_edit`, both with "
        f"{len(res['prompts']['erase'])} erase prompts -> their anchors, {len(res['prompts']['preserve'])} preserve "
        f"prompts, {res['uce_config']}.",
        "",
        f"* tensors changed: official {len(c['official_changed'])}, ours {len(c['ours_changed'])}, "
        f"same set: {c['same_tensors']} (every `attn2.to_k` / `attn2.to_v` weight)",
        f"* max |official - ours| over all edited weights: {c['max_abs_weight_diff']:.2e} "
        f"(largest edit |new - old|: {c['max_abs_edit']:.3f}); max difference to a float64 term-by-term reference: "
        f"official {c['max_abs_diff_to_float64_reference']['official']:.2e}, ours "
        f"{c['max_abs_diff_to_float64_reference']['ours']:.2e}",
        "",
        f"Judge verdicts ({res['forget_seeds']} seeds x {len(res['prompts']['forget_eval'])} forget prompts; "
        f"retain: prompts/shapes.csv rows without {res['concept']} x {res['retain_seeds']} seeds; DDIM 25, CFG 7.5, "
        "64 px):",
        "",
        f"| model | sees {res['concept']} on forget prompts | worst forget prompt | retain shape acc | retain color acc "
        f"| retain fill acc | retain images showing {res['concept']} |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, r in res["models"].items():
        a = r["retain_acc"]
        lines.append(
            f"| {name} | {r['forget_share']:.1%} | {r['forget_worst_prompt']:.1%} | {a[kind]:.1%} | {a['color']:.1%} "
            f"| {a['fill']:.1%} | {r['retain_sees_concept']:.1%} |"
        )
    if "attack" in res:
        at = res["attack"]
        lines += [
            "",
            f"RECE config: {res['rece_config']}.",
            "",
            f"Attack: each model's closed-form adversarial embedding of each forget prompt (adv_reg {at['adv_reg']}; "
            "the original model gets the plain prompts) as `prompt_embeds`; the last row feeds RECE the embedding "
            f"derived against its UCE start (the attack its epoch was built to defeat). {at['seeds']} seeds x each "
            "forget prompt. K/V error: sum ||W' e - W c||^2 / sum ||W c||^2 over all edited projections and tokens.",
            "",
            "| model | K/V error of the prompts (vs original K/V) | K/V error of the attack | sees "
            f"{res['concept']} under attack |",
            "|---|---|---|---|",
        ]
        for name, r in at["models"].items():
            lines.append(
                f"| {name} | {r['kv_error_of_prompts']:.3f} | {r['kv_error_of_attack']:.3f} | "
                f"{r['sees_concept_under_attack']:.1%} |"
            )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
