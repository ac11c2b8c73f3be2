"""The class-forgetting app (``erasure-app --model <class-conditional DDPM>``): its service and its UI, on the tiny
random DDPM of :mod:`erasure.ddpm.tiny` (2-step erasures)."""

from __future__ import annotations

import threading

import pytest

from erasure.ddpm.tiny import tiny_class_ddpm
from erasure_app.class_service import DISPLAY_SIZE, ClassAppService, ClassEraseStopped, parse_seeds

TINY = dict(steps=2, n_forget=8, n_retain=4, batch_size=4, mask_batches=2, bf16=False)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_class_ddpm(tmp_path_factory.mktemp("ddpm") / "model")


@pytest.fixture
def service(tiny, tmp_path):
    return ClassAppService(tiny, tmp_path / "runs")


def _erase(service, **kw):
    base = dict(forget_class="circle", method="salun", run_name=None, **TINY)
    base.update(kw)
    steps = base.pop("steps")
    return service.erase(steps=steps, **base)


def test_erase_writes_a_run_and_compare_judges_both_sides(service):
    events = []
    rid = _erase(service, run_name="forget-circle", progress=events.append)
    assert rid == "forget-circle" and (service.runs_dir / rid / "run.json").is_file()
    assert [e.done for e in events if e.stage == "erase"] == [1, 2]
    runs = service.list_runs()
    assert [r["id"] for r in runs] == ["forget-circle"]
    s = service.summary(runs[0])
    assert s["forget_class"] == "circle" and s["method"] == "salun" and s["steps"] == 2
    assert 0 < s["mask_kept"] < s["changed_params"] and 0 < s["mask_ratio_kept"] < 1  # salun: part of each tensor

    res = service.compare(rid, "square", "0, 1 2")
    assert res["seeds"] == [0, 1, 2] and res["n"] == 3 and res["forget_class"] == "circle"
    from erasure.shapes.render import SHAPES

    for side in ("original", "erased"):
        assert len(res[side]) == 3
        for im, label in res[side]:
            assert im.size == (DISPLAY_SIZE, DISPLAY_SIZE) and label in SHAPES
    assert res["forget_seen"] == sum(lab == "circle" for _, lab in res["erased"])
    # same seeds, different weights: the erased side differs from the original somewhere
    import numpy as np

    diffs = [np.abs(np.asarray(a, float) - np.asarray(b, float)).max() for (a, _), (b, _) in
             zip(res["original"], res["erased"])]
    assert max(diffs) > 0
    # a made-up run id, unique and free
    rid2 = service.default_run_id("circle", "rl")
    assert rid2.startswith("circle-rl-") and not (service.runs_dir / rid2).exists()


@pytest.mark.parametrize("kw, message", [
    (dict(forget_class="dragon"), "unknown forget class 'dragon'; choose one of circle"),
    (dict(anchor_class="dragon"), "unknown anchor class 'dragon'"),
    (dict(anchor_class="circle"), "anchor class must differ from the forget class 'circle'; choose another class or 'random'"),
    (dict(method="nope"), "unknown method 'nope'; choose one of salun"),
    (dict(steps=0), "steps must be >= 1 and <= 100000, got 0"),
    (dict(steps=2.5), "steps must be a whole number"),
    (dict(lr=0.0), "learning rate must be > 0"),
    (dict(mask_ratio=1.5), "mask ratio must be > 0.0 and <= 1.0"),
    (dict(run_name="a b"), "may hold only letters, digits"),
])
def test_bad_input_one_line_messages(service, kw, message):
    with pytest.raises(ValueError) as info:
        _erase(service, **kw)
    msg = str(info.value)
    assert message in msg and "\n" not in msg
    assert not service.runs_dir.exists() or not any(service.runs_dir.iterdir())  # nothing written


def test_run_name_taken_and_bad_compare_input(service):
    (service.runs_dir / "taken").mkdir(parents=True)
    with pytest.raises(ValueError, match="a run named 'taken' exists; choose another run name"):
        _erase(service, run_name="taken")
    with pytest.raises(ValueError, match="no run 'ghost'"):
        service.compare("ghost", "circle", "0")
    with pytest.raises(ValueError, match="unknown class 'dragon'"):
        service.compare("ghost", "dragon", "0")
    for text, message in [("0, x", "seed 'x' is not a whole number"), ("", "no seeds given"),
                          ("0-40", "at most 16 seeds"), ("5-2", "runs backwards")]:
        with pytest.raises(ValueError, match=message):
            parse_seeds(text)
    assert parse_seeds("3-5, 9") == [3, 4, 5, 9]


def test_cancel_stops_and_leaves_no_run_directory(service):
    def progress(ev):
        if ev.stage == "erase" and ev.done == 1:
            assert service.busy
            assert service.cancel()

    with pytest.raises(ClassEraseStopped, match="cancelled at step 1; nothing was saved"):
        _erase(service, run_name="cut", steps=4, progress=progress)
    assert not service.busy and not service.cancel()
    assert service.list_runs() == []
    assert not any(service.runs_dir.iterdir()), list(service.runs_dir.iterdir())  # no run, no .partial
    # the service is free again: the same name can be used
    assert _erase(service, run_name="cut") == "cut"


def test_one_erasure_at_a_time(service):
    started, release = threading.Event(), threading.Event()

    def progress(ev):
        if ev.stage == "erase" and ev.done == 1:
            started.set()
            release.wait(30)

    t = threading.Thread(target=lambda: _erase(service, run_name="first", progress=progress))
    t.start()
    try:
        assert started.wait(60)
        with pytest.raises(RuntimeError, match="already running"):
            _erase(service, run_name="second")
    finally:
        release.set()
        t.join(60)
    assert service.run_ids() == ["first"]


def test_create_class_demo_named_endpoints_without_loading_a_model(service, monkeypatch):
    import erasure.ddpm.model as model_mod
    from erasure_app.tabs.class_app import create_class_demo

    def no_load(*a, **k):
        raise AssertionError("building the UI loaded a model")

    monkeypatch.setattr(model_mod, "load_class_ddpm", no_load)
    demo = create_class_demo(service)
    names = {d.get("api_name") for d in demo.config["dependencies"]}
    assert {"erase_class", "compare_class"} <= names
    assert "erase" not in names and "compare" not in names  # not the text-to-image app
    labels = {c.get("props", {}).get("label") for c in demo.config["components"]}
    assert {"Forget class", "Anchor class", "Method", "Steps", "Learning rate", "Mask ratio"} <= labels
    assert service._original is None and not service._runs


def test_main_chooses_the_class_app_for_a_ddpm_folder(tiny, tmp_path):
    from erasure_app.class_service import ClassAppService as Cls
    from erasure_app.main import create_app, parse_args

    service, demo = create_app(parse_args(["--model", str(tiny), "--runs-dir", str(tmp_path / "r"), "--device", "cpu"]))
    assert isinstance(service, Cls) and service.model_dir == tiny.resolve()
    assert "erase_class" in {d.get("api_name") for d in demo.config["dependencies"]}


def test_ui_functions_show_errors_and_results(service):
    import gradio as gr

    from erasure_app.tabs.class_app import create_class_demo

    demo = create_class_demo(service)
    fns = {f.api_name: f.fn for f in demo.fns.values() if f.api_name in ("erase_class", "compare_class")}
    with pytest.raises(gr.Error, match="anchor class must differ"):
        fns["erase_class"]("circle", "circle", "salun", 2, 2e-4, 0.5, 0, "", progress=lambda *a, **k: None)
    with pytest.raises(gr.Error, match="no run chosen"):
        fns["compare_class"](None, "circle", "0")


def test_help_text_ends_its_sentence_before_the_range():
    from erasure.ddpm.erase import ClassEraseConfig
    from erasure_app.forms import form_fields
    from erasure_app.tabs.fields import control

    lr = next(ff for ff in form_fields(ClassEraseConfig) if ff.name == "lr")
    assert control(lr, 1e-4).info == "Adam learning rate. Range: > 0 and <= 1."
