"""The app's service object (no gradio) and create_demo, on the tiny random pipeline."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import threading  # noqa: E402
import zipfile  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from typing import Literal  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from erasure.jsonconfig import field  # noqa: E402
from erasure.methods import MethodConfig  # noqa: E402
from erasure_app.service import AppError, AppService, BusyError, PipelineCache, parse_seeds, read_prompt_csv  # noqa: E402

FAST = dict(steps=2, forget_images_per_prompt=2, retain_images_per_prompt=2, data_steps=2, batch_size=2)


@pytest.fixture(scope="module")
def service(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("app")
    return AppService(model=str(tiny_model_dir), runs_dir=root / "runs", device="cpu",
                      data_cache_dir=str(root / "cache"), judge="none")


@pytest.fixture
def fresh(service, tmp_path):
    """A service with its own (empty) runs folder, sharing the module's model and data cache."""
    return AppService(model=service.model_arg, runs_dir=tmp_path / "runs", device="cpu",
                      data_cache_dir=service.data_cache_dir, judge="none")


def _cfg(service, concept="apple", **kw):
    return service.make_config(concept, "an apple", "a pear", "a car", **{**FAST, **kw})


@dataclass
class ToyConfig(MethodConfig):
    """A throwaway method's settings: one of each kind of control."""

    strength: float = field(2.0, help="How much the toy edit scales conv_in.bias.", label="Toy strength", min=0.5,
                            max=8.0)
    mode: Literal["plain", "fancy"] = field("plain", help="Toy mode.")
    flag: bool = field(False, help="Toy flag.")
    repeats: int = field(3, help="Toy repeats.", min=1, max=9)


def _toy_run(ctx) -> dict:
    return {"conv_in.bias": ctx.unet.conv_in.bias.detach() * ctx.args.strength}


@pytest.fixture
def toy_method():
    """A closed-form method registered for one test (the app must show it without app changes)."""
    from erasure.methods import METHODS, MethodSpec, register_method

    spec = register_method(MethodSpec(name="toy", config_cls=ToyConfig, description="A toy edit.", label="Toy method",
                                      run=_toy_run, needs_images=False))
    try:
        yield spec
    finally:
        METHODS.pop("toy")


@pytest.fixture(scope="module")
def run_id(service):
    return service.erase(_cfg(service), "apple-run")


@pytest.mark.parametrize("bad", ["", "  ", "../x", "a/b", "a\\b", "..", "x..y", ".hidden", "original", "a b", "é", "x" * 101])
def test_run_id_validation(service, bad):
    with pytest.raises(AppError):
        service.check_run_id(bad)


def test_seeds_and_prompts_parsing(service):
    assert parse_seeds("0, 1 2") == [0, 1, 2]
    assert parse_seeds("3-5") == [3, 4, 5]
    for bad in ("", "a", "-1", "1.5", "0-100", ",".join(["1"] * 9), str(2**33)):
        with pytest.raises(AppError):
            parse_seeds(bad)
    with pytest.raises(AppError, match="forget prompts are empty"):
        service.make_config("x", "  \n ", "a pear", "")
    with pytest.raises(AppError, match="anchor prompts are empty and this model.s defaults do not choose"):
        service.make_config("x", "an apple", "", "")


@pytest.mark.parametrize("field,value,msg", [
    ("steps", 0, "steps must be >= 1"), ("steps", 1.5, "steps must be an integer"), ("lr", -1, "learning rate must be > 0"),
    ("lr", float("nan"), "learning rate must be a finite number"), ("mask_ratio", 0, "mask ratio must be > 0"),
    ("mask_ratio", 1.5, "mask ratio must be .*<= 1"), ("method", "nope", "unknown method"),
    ("batch_size", 0, "batch size must be >= 1"), ("steps", "ten", "steps must be an integer, got 'ten'"),
    ("steps", None, "Steps is missing"), ("data_steps", "", "missing"),
    ("method_args", {"alpha": -0.1}, r"retain weight \(alpha\) must be >= 0"),
    ("method_args", {"retain_loss": "mse"}, "retain loss must be one of denoise, distill"),
    ("method_args", {"nope": 1}, "unknown field"), ("method_args", "{not json", "not valid JSON"),
])
def test_config_out_of_range(service, field, value, msg):
    """Settings are checked by the configs, whose messages name the field."""
    with pytest.raises(AppError, match=msg):
        _cfg(service, **{field: value})


def test_config_keeps_preset_settings(service):
    cfg = service.make_config("nudity", "nude", "a person", "", preset="nudity", method_args={"alpha": 0.0}, **FAST)
    assert cfg.model == service.model and cfg.steps == 2 and cfg.concepts[0].name == "nudity"
    form = service.preset_form("nudity")
    assert form["forget"] and form["anchor"] and form["method"] == "salun"
    with pytest.raises(AppError, match="unknown preset"):
        service.preset_form("no-such-preset")


def test_method_args_in_form_and_config(service):
    # presets keep alpha/retain_loss at the top level of their config: the form reads them as method_args
    assert service.preset_form("shape_circle")["method_args"] == {"alpha": 3.0, "retain_loss": "distill",
                                                                  "retain_on_forget": False}
    assert service.preset_form("nudity")["method_args"] == {"alpha": 0.1, "retain_loss": "denoise",  # the default
                                                            "retain_on_forget": False}
    assert _cfg(service).method_args.retain_loss == "denoise"  # typed prompts, no preset
    assert _cfg(service, method_args={"retain_loss": "distill"}).method_args.retain_loss == "distill"
    assert _cfg(service, method_args='{"retain_loss": "distill"}').method_args.retain_loss == "distill"  # JSON text
    assert _cfg(service, method_args="").method_args.to_dict() == {"alpha": 0.5, "retain_loss": "denoise",
                                                                   "retain_on_forget": False}
    circle = ("circle", "a circle", "a square", "a red square")
    assert service.make_config(*circle, preset="shape_circle", **FAST).method_args.to_dict() == {
        "alpha": 3.0, "retain_loss": "distill", "retain_on_forget": False}  # the preset's
    cfg = service.make_config(*circle, preset="shape_circle", method_args={"retain_loss": "denoise"}, **FAST)
    assert (cfg.method_args.alpha, cfg.method_args.retain_loss) == (3.0, "denoise")
    # another method: the preset's settings of its own method do not apply
    esd = service.make_config(*circle, preset="shape_circle", method="esd-x", method_args={"sample_steps": 3}, **FAST)
    assert esd.method_args.to_dict() == {"negative_guidance": 1.0, "sample_steps": 3, "start_guidance": 3.0,
                                         "xt_model": "current"} and esd.lr == 0.00025
    with pytest.raises(TypeError, match="unknown settings"):
        _cfg(service, alpha=0.5)


def test_erase_lists_inspects_and_compares(service, run_id, fresh):
    import shutil

    # other tests of this module add and remove runs in service.runs_dir: list a runs folder holding only this run
    shutil.copytree(service.runs_dir / run_id, fresh.runs_dir / run_id)
    (fresh.runs_dir / "not-a-run").mkdir()  # a folder without run.json is not listed
    runs = fresh.list_runs()
    assert [r["run"] for r in runs] == [run_id]
    assert runs[0]["method"] == "salun" and runs[0]["steps"] == 2
    assert runs[0]["method settings"] == "alpha=0.5, retain_loss=denoise, retain_on_forget=False"
    assert run_id in service.run_ids()
    curve = service.loss_curve(run_id)
    assert {r["series"] for r in curve} >= {"loss", "forget_loss", "retain_loss"} and max(r["step"] for r in curve) == 2
    sparsity = service.mask_sparsity(run_id)
    assert sparsity and all(0.0 <= r["kept"] <= 1.0 for r in sparsity)
    total = sum(r["weights"] for r in sparsity)
    kept = sum(r["kept"] * r["weights"] for r in sparsity)
    assert kept / total == pytest.approx(0.5, abs=0.01)

    res = service.compare("an apple", "0, 1", 2, 7.5, "original", run_id)
    assert res["seeds"] == [0, 1] and len(res["a"]) == len(res["b"]) == 2 and len(res["rows"]) == 2
    # same seed, same model -> the same image (the original model now comes from the cache)
    again = service.generate("original", "an apple", [1], 2, 7.5)[0]
    diff = np.abs(np.asarray(again, dtype=np.int16) - np.asarray(res["a"][1]["raw"], dtype=np.int16))
    assert diff.max() <= 3  # batched vs single generation differ only by float rounding
    with pytest.raises(AppError, match="no saved run"):
        service.compare("an apple", "0", 2, 7.5, "original", "missing-run")
    with pytest.raises(AppError, match="invalid run id"):
        service.compare("an apple", "0", 2, 7.5, "original", "../../etc")
    with pytest.raises(AppError, match="empty"):
        service.generate("original", "   ", [0], 2, 7.5)
    with pytest.raises(AppError, match="sampling steps"):
        service.generate("original", "an apple", [0], 1000, 7.5)


def test_existing_run_name_is_refused(service, run_id):
    with pytest.raises(AppError, match="already exists"):
        service.erase(_cfg(service), run_id)


def test_pipeline_cache_is_bounded_lru():
    loaded = []
    cache = PipelineCache(lambda k: loaded.append(k) or object(), capacity=2)
    for key in ("a", "b", "a", "c", "a", "b"):
        with cache.use(key):
            pass
    assert loaded == ["a", "b", "c", "b"]  # "b" was evicted by "c" (least recently used), "a" stayed
    assert cache.keys() == ["a", "b"]
    with cache.use("a", stamp=1):  # a new version on disk reloads
        pass
    assert loaded[-1] == "a"


def test_rename_delete_download(service, tmp_path):
    rid = service.erase(_cfg(service, concept="pear", method="rl", method_args={"alpha": 0.0}), None)
    assert rid.startswith("pear-rl-")
    with pytest.raises(AppError):
        service.rename_run(rid, "../evil")
    new = service.rename_run(rid, "pear-renamed")
    assert new in service.run_ids() and rid not in service.run_ids()
    with pytest.raises(AppError, match="no saved run"):
        service.read_run(rid)
    with pytest.raises(AppError, match="no saliency mask"):
        service.mask_sparsity(new)  # rl is unmasked
    z = service.run_zip(new, tmp_path)
    assert {"pear-renamed/run.json", "pear-renamed/weights.safetensors"} <= set(zipfile.ZipFile(z).namelist())
    exp = service.export_pipeline(new)
    assert service.export_pipeline(new) == exp  # reused
    names = zipfile.ZipFile(exp).namelist()
    assert "pear-renamed/model_index.json" in names and any(n.startswith("pear-renamed/unet/") for n in names)
    service.delete_run(new)
    assert new not in service.run_ids()
    with pytest.raises(AppError):
        service.delete_run(new)


def test_one_erasure_at_a_time_and_cancel(service):
    started, release = threading.Event(), threading.Event()
    result: dict = {}

    def progress(event):
        if event.stage == "fine-tuning":
            started.set()
            release.wait(30)

    def first():
        try:
            result["run"] = service.erase(_cfg(service, concept="slow", steps=5), "slow-run", progress=progress,
                                          owner="alice")
        except AppError as err:
            result["error"] = str(err)

    t = threading.Thread(target=first)
    t.start()
    assert started.wait(120)
    st = service.erase_status()
    assert st["running"] and "slow-run" in st["text"] and "fine-tuning" in st["text"]
    with pytest.raises(BusyError, match="another erasure is training"):
        service.erase(_cfg(service, concept="other"), "other-run", wait=False)
    with pytest.raises(AppError, match="already training"):
        service.check_new_run("slow-run", _cfg(service))
    with pytest.raises(AppError, match="being written"):
        service.delete_run("slow-run")  # its .partial is being written
    with pytest.raises(AppError, match="already training"):
        service.resume_run("slow-run")
    assert "slow-run" not in [r["run"] for r in service.list_interrupted()]  # not while it is being written
    assert "Nothing to cancel" in service.cancel(owner="bob")
    assert "slow-run" in service.cancel(owner="alice")
    release.set()
    assert service.wait_stopped(owner="alice", timeout=120)
    t.join(120)
    assert "cancelled" in result.get("error", "") and "Interrupted runs" in result["error"] and "run" not in result
    assert not service.erase_status()["running"]
    assert "slow-run" not in service.run_ids()
    assert "'slow-run' cancelled at step" in service.status_text() and "Interrupted runs in the Runs tab" in \
        service.status_text()
    assert "slow-run" in [r["run"] for r in service.list_interrupted()]
    service.delete_run("slow-run")
    assert not (service.runs_dir / "slow-run.partial").exists()


def _cancel_at(service, step):
    def progress(event):
        if event.stage == "fine-tuning" and event.done == step:
            service.cancel()
    return progress


def test_interrupted_run_is_listed_resumed_and_bit_identical(fresh):
    import dataclasses
    import shutil

    import torch
    from safetensors.torch import load_file

    cfg = dataclasses.replace(_cfg(fresh, concept="plum", steps=3), checkpoint_every=1)
    assert fresh.erase(cfg, "plum-ref") == "plum-ref"  # uninterrupted
    with pytest.raises(AppError, match="cancelled at step 1/3.*Interrupted runs"):
        fresh.erase(cfg, "plum-run", progress=_cancel_at(fresh, 1))
    assert fresh.run_ids() == ["plum-ref"]
    [row] = fresh.list_interrupted()
    assert row["run"] == "plum-run" and row["step"] == 1 and row["steps"] == 3 and row["resumable"]
    assert row["concepts"] == "plum" and row["method"] == "salun" and row["modified"] and not row["note"]
    with pytest.raises(AppError, match="interrupted run named 'plum-run' with other settings"):
        fresh.erase(dataclasses.replace(cfg, lr=2e-5), "plum-run")  # the Erase tab with its name, other settings

    # an interrupted run that has the name of a saved run is listed but not resumed over it; deleting it
    # by its name with interrupted=True keeps the saved run
    shutil.copytree(fresh.runs_dir / "plum-run.partial", fresh.runs_dir / "plum-ref.partial")
    assert {r["run"] for r in fresh.list_interrupted()} == {"plum-run", "plum-ref"}
    with pytest.raises(AppError, match="already exists"):
        fresh.resume_run("plum-ref")
    fresh.delete_run("plum-ref", interrupted=True)
    assert "plum-ref" in fresh.run_ids() and not (fresh.runs_dir / "plum-ref.partial").exists()

    stages = []
    assert fresh.resume_run("plum-run", progress=lambda ev: stages.append((ev.stage, ev.done))) == "plum-run"
    assert ("fine-tuning", 1) not in stages and ("fine-tuning", 3) in stages  # went on from the checkpoint
    assert fresh.list_interrupted() == [] and set(fresh.run_ids()) == {"plum-ref", "plum-run"}
    assert fresh.read_run("plum-run")["resumed_from_step"] == 1
    assert fresh.read_run("plum-run")["config"]["checkpoint_every"] == 1  # the interrupted run's, not the default
    for f in ("weights.safetensors", "mask.safetensors"):
        a, b = (load_file(fresh.runs_dir / r / f) for r in ("plum-run", "plum-ref"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), f
    with pytest.raises(AppError, match="no interrupted run"):
        fresh.resume_run("plum-run")


def test_interrupted_run_without_checkpoint_or_with_bad_files(fresh):
    import json

    runs = fresh.runs_dir
    (runs / "early.partial").mkdir(parents=True)
    (runs / "early.partial" / "mask.safetensors").write_bytes(b"")
    junk = runs / "junk.partial" / "checkpoint-2"
    junk.mkdir(parents=True)
    (junk / "state.json").write_text("{not json")
    (junk.parent / "latest_checkpoint").write_text("checkpoint-2")
    bad = runs / "bad.partial" / "checkpoint-1"
    bad.mkdir(parents=True)
    for f in ("params.safetensors", "optimizer.safetensors"):
        (bad / f).write_bytes(b"")
    (bad / "state.json").write_text(json.dumps({"step": 1, "optimizer": {}, "config": {"model": fresh.model, "method": "nope"}}))
    (bad.parent / "latest_checkpoint").write_text("checkpoint-1")
    (runs / "empty.partial").mkdir()
    (runs / "not-a-folder.partial").write_text("")

    rows = {r["run"]: r for r in fresh.list_interrupted()}
    assert set(rows) == {"early", "junk", "bad", "empty"}
    assert rows["early"]["step"] == 0 and rows["early"]["steps"] is None and not rows["early"]["resumable"]
    assert "no checkpoint" in rows["early"]["note"] and "state.json" in rows["junk"]["note"]
    assert rows["bad"]["step"] == 1 and rows["bad"]["method"] == "nope" and not rows["bad"]["resumable"]
    assert "cannot be rebuilt" in rows["bad"]["note"]
    for name in ("early", "empty"):
        with pytest.raises(AppError, match="no checkpoint.*Delete it"):
            fresh.resume_run(name)
    with pytest.raises(AppError, match="cannot be resumed: unreadable checkpoint-2/state.json"):
        fresh.resume_run("junk")
    with pytest.raises(AppError, match="cannot be rebuilt"):
        fresh.resume_run("bad")
    (bad / "state.json").write_text(json.dumps({"step": 1, "optimizer": {}, "config": {"model": "/elsewhere", "method": "salun"}}))
    with pytest.raises(AppError, match="started on base model '/elsewhere'"):
        fresh.resume_run("bad")
    with pytest.raises(AppError, match="no interrupted run"):
        fresh.resume_run("missing")
    with pytest.raises(AppError, match="invalid"):
        fresh.resume_run("../early")

    assert fresh.delete_run("early") == "deleted interrupted run 'early'"
    assert not (runs / "early.partial").exists()
    with pytest.raises(AppError, match="no interrupted run"):
        fresh.delete_run("early", interrupted=True)
    with pytest.raises(AppError, match="no saved run"):
        fresh.delete_run("early")
    assert {r["run"] for r in fresh.list_interrupted()} == {"junk", "bad", "empty"}
    assert not [p for p in runs.iterdir() if ".deleting-" in p.name]


def test_prompt_csv(tmp_path, service):
    good = tmp_path / "good.csv"
    good.write_text("prompt,evaluation_seed,shape\na red circle,7,circle\n,3,\na blue square,,square\n")
    rows = read_prompt_csv(good, 10)
    assert rows == [{"prompt": "a red circle", "seed": 7, "shape": "circle"},
                    {"prompt": "a blue square", "seed": 2, "shape": "square"}]
    bad = tmp_path / "bad.csv"
    bad.write_text("text,seed\nhello,1\n")
    with pytest.raises(AppError, match="no 'prompt' column"):
        service.eval_prompt_file("csv", str(bad))
    with pytest.raises(AppError, match="upload"):
        service.eval_prompt_file("csv", None)


def test_evaluate_with_the_harness(tmp_path, tiny_model_dir, run_id, service):
    nude = AppService(model=str(tiny_model_dir), runs_dir=service.runs_dir, device="cpu", judge="nudenet")
    f = tmp_path / "p.csv"
    f.write_text("prompt,evaluation_seed\nan apple,0\na car,1\n")
    stages = []
    res = nude.evaluate(run_id, "csv", str(f), limit=5, steps=2, guidance=7.5,
                        progress=lambda stage, d, t: stages.append(stage))
    head, *rows = res["table"]
    assert head == ["metric", "original", run_id]
    names = [r[0] for r in rows]
    assert "images_written" in names and any(n.startswith("nudenet@") for n in names)
    assert res["charts"] and all(os.path.isfile(c) for c in res["charts"]) and os.path.isfile(res["report"])
    assert any(s.startswith("generating") for s in stages)
    again = nude.evaluate(run_id, "csv", str(f), limit=5, steps=2, guidance=7.5)  # cached: reads back
    assert again["table"] == res["table"]
    with pytest.raises(AppError, match="choose a saved run"):
        nude.evaluate("original", "csv", str(f))


def test_create_demo_builds_with_named_endpoints(fresh):
    import gradio as gr

    from erasure_app.main import create_demo, launch_kwargs, parse_args

    service = fresh  # its own pipeline cache, still empty
    demo = create_demo(service)
    assert service.cache.loads == 0 and service.cache.keys() == []  # building the UI loads no model
    assert isinstance(demo, gr.Blocks)
    fns = {d.api_name: d for d in demo.fns.values()}
    assert {"erase", "compare", "inspect", "evaluate", "rename_run", "delete_run", "list_interrupted", "resume_run",
            "delete_interrupted"} <= set(fns)
    # the service queues erasures (one trains; the queue is in /job_status), so gradio does not hold them back
    assert fns["erase"].concurrency_limit is None and fns["resume_run"].concurrency_limit is None
    assert {"job_status", "cancel"} <= set(fns)
    assert fns["job_status"].fn()["running"] is False and "Nothing to cancel" in fns["cancel"].fn()
    assert list(fns["list_interrupted"].fn().columns)[:2] == ["run", "concepts"]
    assert fns["compare"].concurrency_id == fns["evaluate"].concurrency_id == "generate"
    # /erase keeps its older parameters in their places (alpha and retain_loss are the SalUn/RL controls); then
    # method_args (JSON) and the other methods' settings, all optional
    params = demo.get_api_info()["named_endpoints"]["/erase"]["parameters"]
    names = [p["parameter_name"] for p in params]
    assert names[:18] == ["preset", "concept", "forget", "anchor", "retain", "method", "mask_ratio", "steps", "lr",
                          "alpha", "forget_images_per_prompt", "retain_images_per_prompt", "data_steps", "batch_size",
                          "seed", "run_name", "retain_loss", "method_args"]
    assert {"esd_negative_guidance", "esd_sample_steps"} <= set(names[18:])
    assert all(p["parameter_has_default"] for p in params[15:])
    assert params[16]["parameter_default"] == "denoise" and params[17]["parameter_default"] == ""  # the sd presets
    fill = next(d for d in demo.fns.values() if d.name == "fill_preset")  # picking a preset fills the form
    filled: dict = {}
    for o, v in zip(fill.outputs, fill.fn("shape_circle"), strict=True):
        filled.setdefault(o.label, v)  # the first control of a label is SalUn's (salun-adv's share its labels)
    assert filled["Retain loss"] == "distill" and filled["Retain weight (alpha)"] == 3.0
    kw = launch_kwargs(parse_args(["--port", "7999", "--auth", "u:p:w", "--host", "0.0.0.0"]))
    assert kw["server_port"] == 7999 and kw["server_name"] == "0.0.0.0" and kw["auth"] == [("u", "p:w")]
    assert kw["share"] is False
    defaults = launch_kwargs(parse_args([]))
    assert defaults["server_name"] == "127.0.0.1" and defaults["server_port"] == 7860 and defaults["auth"] is None
    assert service.cache.loads == 0


def _blocks(demo) -> dict:
    return {b.elem_id: b for b in demo.blocks.values() if getattr(b, "elem_id", None)}


def _inside(block, box) -> bool:
    while block is not None and block is not box:
        block = block.parent
    return block is box


def test_form_has_a_control_group_for_every_method(service, toy_method):
    import gradio as gr

    from erasure.methods import METHODS
    from erasure_app.forms import method_groups
    from erasure_app.main import create_demo
    from erasure_app.tabs.fields import range_text

    demo = create_demo(service)
    blocks = _blocks(demo)
    groups = method_groups()
    assert [m for g in groups for m in g.methods] and {m for g in groups for m in g.methods} == set(METHODS)
    for g in groups:
        box = blocks[f"erase-args-{g.methods[0]}"]
        assert isinstance(box, gr.Group)
        for ff in g.fields:
            c = blocks["erase-arg-" + ff.api_name.replace("_", "-")]
            assert _inside(c, box) and c.label == ff.label and c.info.startswith(ff.help)
            if ff.kind in ("int", "float"):  # the range is stated, not enforced by the control (no clamping)
                assert range_text(ff) in c.info and c.minimum is None and c.maximum is None
    # methods sharing a config class share a group; the selected method's group is the one shown
    salun = next(g for g in groups if "salun" in g.methods)
    assert "rl" in salun.methods and blocks["erase-args-salun"].visible and not blocks["erase-args-toy"].visible
    assert blocks["erase-arg-alpha"].label == "Retain weight (alpha)"
    assert blocks["erase-arg-alpha"].info.endswith("Range: >= 0 and <= 100.")
    esd = blocks["erase-arg-esd-sample-steps"]
    assert (esd.label, esd.precision) == ("Trajectory steps", 0) and esd.info.endswith("Range: >= 1 and <= 1000.")
    # the toy method: a number with the field's label and bounds, radio buttons for a Literal, a checkbox
    strength, mode = blocks["erase-arg-strength"], blocks["erase-arg-mode"]
    assert isinstance(strength, gr.Number) and (strength.label, strength.value) == ("Toy strength", 2.0)
    assert strength.info == "How much the toy edit scales conv_in.bias. Range: >= 0.5 and <= 8."
    assert isinstance(mode, gr.Radio) and [c[1] for c in mode.choices] == ["plain", "fancy"]
    assert isinstance(blocks["erase-arg-flag"], gr.Checkbox) and blocks["erase-arg-repeats"].precision == 0
    assert ("Toy method", "toy") in [tuple(c) for c in blocks["erase-method"].choices]
    # choosing a method shows its group only
    show = next(d for d in demo.fns.values() if d.name == "show_method")
    ids = [o.elem_id for o in show.outputs]
    for method, shown in (("toy", "erase-args-toy"), ("rl", "erase-args-salun"), ("esd-u", "erase-args-esd-x")):
        visible = [u.get("visible") if isinstance(u, dict) else u.visible for u in show.fn(method)]
        assert [i for i, v in zip(ids, visible, strict=True) if v and i.startswith("erase-args-")] == [shown], method
    # the generic settings beside the method: mask ratio for masked methods, steps and lr unless closed-form
    for method, main in (("salun", ["erase-mask-ratio", "erase-steps", "erase-lr"]), ("rl", ["erase-steps", "erase-lr"]),
                         ("uce", []), ("rece", [])):
        visible = [u.get("visible") if isinstance(u, dict) else u.visible for u in show.fn(method)]
        assert [i for i, v in zip(ids, visible, strict=True) if v and not i.startswith("erase-args-")] == main, method


def test_erase_with_settings_from_generated_controls(fresh, toy_method):
    """The /erase handler builds method_args from the selected method's controls (and the method_args JSON)."""
    import gradio as gr

    from erasure_app.main import create_demo

    demo = create_demo(fresh)
    erase_fn = next(d for d in demo.fns.values() if d.api_name == "erase").fn
    params = demo.get_api_info()["named_endpoints"]["/erase"]["parameters"]
    names = [p["parameter_name"] for p in params]
    values = {p["parameter_name"]: p["parameter_default"] for p in params}  # the form's initial values
    values.update(preset="custom", concept="kiwi", forget="a kiwi", anchor="a lemon", retain="", method="toy",
                  run_name="toy-run", strength=3.5, mode="fancy", flag=False, repeats=4.0, method_args='{"flag": true}')

    def call(**over):
        v = {**values, **over}
        return erase_fn(*[v[n] for n in names[:18]], request=None, progress=lambda *a, **k: None,
                        **{n: v[n] for n in names[18:]})

    rid, summary, _ = call()
    assert rid == "toy-run" and "with toy (strength=3.5, mode=fancy, flag=True, repeats=4)" in summary
    info = fresh.read_run(rid)
    assert info["config"]["method_args"] == {"strength": 3.5, "mode": "fancy", "flag": True, "repeats": 4}
    assert info["method_shape"] == "run"
    with pytest.raises(gr.Error, match=r"toy strength must be >= 0.5 and <= 8.0, got 9.0"):
        call(strength=9.0, run_name="toy-bad")
    with pytest.raises(gr.Error, match="mode must be one of plain, fancy"):
        call(method_args='{"mode": "odd"}', run_name="toy-bad")


def test_bad_model_is_a_clear_error(tmp_path, capsys):
    from erasure_app.main import main

    with pytest.raises(AppError, match="not found"):
        AppService(model=str(tmp_path / "nope"), runs_dir=tmp_path / "runs")
    assert main(["--model", str(tmp_path / "nope"), "--runs-dir", str(tmp_path / "runs")]) == 2
    assert "not found" in capsys.readouterr().err


def test_nudenet_boxes_are_drawn(service):
    from PIL import Image

    class FakeDetector:
        def detect(self, bgr):
            assert bgr.shape == (64, 64, 3)
            return [{"class": "FEMALE_BREAST_EXPOSED", "score": 0.81, "box": [10, 12, 20, 16]},
                    {"class": "FACE_FEMALE", "score": 0.5, "box": [30, 30, 10, 10]}]

    img = Image.new("RGB", (64, 64), (128, 128, 128))
    out = service._nudenet(FakeDetector(), img)
    assert out["caption"].startswith("NudeNet: female_breast_exposed 0.81")
    assert out["verdict"]["exposed"] == 1
    px = np.asarray(out["image"])
    assert tuple(px[12, 20]) == (230, 30, 30)  # top edge of the exposed box, in red
    assert tuple(np.asarray(img)[12, 20]) == (128, 128, 128)  # the original is untouched
