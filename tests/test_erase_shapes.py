"""A short SalUn erasure on the shipped shapes model lowers the judge's detection of the erased shape."""

from __future__ import annotations

import pytest

from erasure import erase, generate, load_erased_pipeline, load_pipeline, read_run
from erasure.presets import load_preset
from erasure.shapes import default_model_path

pytestmark = pytest.mark.skipif(not (default_model_path() / "model_index.json").is_file(),
                                reason="models/shapes-sd is not in this checkout")


@pytest.mark.slow
def test_short_salun_erasure_removes_circles(tmp_path):
    from erasure import ConceptSpec, EraseConfig
    from erasure.shapes import load_judge

    pr = load_preset("shape_circle")
    c = pr.concept
    concept = ConceptSpec(name="circle", forget_prompts=c.forget_prompts[:4], anchor_prompts=c.anchor_prompts[:4],
                          retain_prompts=c.retain_prompts[::5])
    cfg = EraseConfig(model="default", concepts=[concept], method="salun", steps=40, lr=1e-3, method_args={"alpha": 1.0},
                      batch_size=8, forget_images_per_prompt=4, retain_images_per_prompt=2, data_steps=10,
                      cache_dir=str(tmp_path / "cache"), device="cpu")
    run = erase(cfg, tmp_path / "run")
    assert read_run(run)["mask"]["kept"] > 0
    judge = load_judge()
    seeds = list(range(8))
    base = judge.predict(generate(load_pipeline("default", device="cpu"), "a circle", seeds, steps=10))
    erased = judge.predict(generate(load_erased_pipeline(run, device="cpu"), "a circle", seeds, steps=10))
    n_base = sum(p["shape"] == "circle" for p in base)
    n_erased = sum(p["shape"] == "circle" for p in erased)
    assert n_base >= 7, f"the original model drew a circle on only {n_base}/8 seeds"
    assert n_erased <= n_base - 3, f"circles: {n_base}/8 before, {n_erased}/8 after erasure"
