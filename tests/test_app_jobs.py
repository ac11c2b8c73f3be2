"""The service's job view (/job_status, /cancel), job limits and run-store safety, on the tiny random pipeline."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import json  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402

import pytest  # noqa: E402

from erasure.progress import ProgressEvent  # noqa: E402
from erasure_app.jobs import Job  # noqa: E402
from erasure_app.service import LIMITS, AppError, AppService, page_words  # noqa: E402

FAST = dict(steps=2, forget_images_per_prompt=2, retain_images_per_prompt=2, data_steps=2, batch_size=2)


@pytest.fixture
def service(tiny_model_dir, tmp_path):
    return AppService(model=str(tiny_model_dir), runs_dir=tmp_path / "runs", device="cpu",
                      data_cache_dir=str(tmp_path / "cache"), judge="none")


def _cfg(service, concept="apple", **kw):
    return service.make_config(concept, "an apple", "a pear", "a car", **{**FAST, **kw})


def test_job_percent_and_eta_from_measured_steps():
    job = Job("r", None, plan={"generating Df/Dr": 200.0, "fine-tuning": 100.0}, planned_images=20)
    assert job.percent == 0.0 and job.eta_s is None
    job.update(ProgressEvent("generating Df/Dr", 0, 10))  # 10 of the 20 images were cached: half the work
    assert job.plan["generating Df/Dr"] == 100.0
    time.sleep(0.05)
    job.update(ProgressEvent("generating Df/Dr", 10, 10))
    job.update(ProgressEvent("fine-tuning", 0, 4))
    job.stage_started -= 1.0  # one measured step took 1 s
    job.update(ProgressEvent("fine-tuning", 1, 4, {"loss": 0.5, "step": 1}))
    assert job.percent == pytest.approx(62.5)
    assert job.eta_s == pytest.approx(3.0, abs=0.2)  # 3 steps left at 1 s each
    assert job.losses == [{"step": 1, "series": "loss", "value": 0.5}]


def test_job_status_queue_and_cancel_from_anyone(service):
    started, release = threading.Event(), threading.Event()
    errors: dict = {}

    def progress(event):
        if event.stage == "fine-tuning":
            started.set()
            release.wait(60)

    def run(name, cfg, **kw):
        try:
            service.erase(cfg, name, owner=name, **kw)
        except AppError as err:
            errors[name] = str(err)

    first = threading.Thread(target=run, args=("first", _cfg(service, steps=3)), kwargs={"progress": progress})
    first.start()
    assert started.wait(120)
    second = threading.Thread(target=run, args=("second", _cfg(service, concept="b")))
    second.start()
    for _ in range(100):
        if service.job_status()["queue"]:
            break
        time.sleep(0.05)
    st = service.job_status()
    assert st["running"] and st["kind"] == "erase" and st["run"] == "first" and st["stage"] == "fine-tuning"
    assert st["total"] == 3 and st["step"] >= 1 and 0 < st["percent"] < 100
    assert [q["run"] for q in st["queue"]] == ["second"]
    json.dumps(st)  # the /job_status answer is JSON
    # a queued job is cancelled by its run name, by anyone; it never starts
    assert "Cancelling 'second'" in service.cancel("second")
    second.join(30)
    assert "never started" in errors["second"] and not service.job_status()["queue"]
    # the running one with no argument (not only from the session that started it)
    assert "Cancelling 'first'" in service.cancel()
    assert service.job_status()["cancelling"]
    release.set()
    first.join(120)
    st = service.job_status()
    assert not st["running"] and "'first' cancelled at step" in st["last"]
    assert "Nothing to cancel" in service.cancel()


def test_cancel_during_data_generation(service):
    """A job is stoppable before training too (a long Df/Dr generation), through the same cancel."""

    def progress(event):
        if event.stage == "generating Df/Dr":
            service.cancel()

    # stopped at the next progress event: the next batch of images, or the stage after the last one
    with pytest.raises(AppError, match="cancelled during (generating Df/Dr|encoding images)"):
        service.erase(_cfg(service, forget_images_per_prompt=4), "gen-cancel", progress=progress)
    st = service.job_status()
    assert not st["running"] and "'gen-cancel' cancelled during" in st["last"] and "fine-tuning" not in st["last"]


@pytest.mark.parametrize("kw, msg", [
    (dict(forget="\n".join(f"p{i}" for i in range(LIMITS["prompts"] + 1))), "the limit is 256 per list"),
    (dict(concept="x" * (LIMITS["concept_chars"] + 1)), "concept name is 101 characters"),
    (dict(forget_images_per_prompt=5000), "Df/Dr images; the limit is 4,096"),
    (dict(steps=1_000_000, batch_size=4), "work units"),
])
def test_job_limits(service, kw, msg):
    args = dict(concept="apple", forget="an apple", anchor="a pear", retain="a car", **FAST)
    args.update(kw)
    with pytest.raises(AppError, match=msg):
        service.make_config(args.pop("concept"), args.pop("forget"), args.pop("anchor"), args.pop("retain"), **args)


def test_messages_in_the_pages_words(service):
    assert page_words("add --retain-prompt, or set --alpha 0 to train without one") == \
        "add retain prompts, or set the retain weight (alpha) to 0 to train without one"
    with pytest.raises(AppError) as err:
        service.make_config("apple", "an apple", "a pear", "", **FAST)
    assert "--" not in str(err.value) and "retain prompts" in str(err.value)
    for v in (0, 1.5):  # no silent clamping: the config names the field and range
        with pytest.raises(AppError, match="(?i)mask ratio must be > 0.0 and <= 1.0"):
            _cfg(service, mask_ratio=v)


def test_partial_suffix_damaged_run_and_download(service, tmp_path):
    import tempfile

    rid = service.erase(_cfg(service), "ok-run")
    for bad in ("ok-run.partial", "x.PARTIAL", "x.tmp"):
        with pytest.raises(AppError, match="may not end in"):
            service.rename_run(rid, bad)
        with pytest.raises(AppError, match="may not end in"):
            service.check_new_run(bad, _cfg(service))
    # a damaged run.json is listed as damaged, does not break the listing or the app, and can be deleted
    bad = service.runs_dir / "broken"
    bad.mkdir()
    info = json.loads((service.runs_dir / rid / "run.json").read_text())
    (bad / "run.json").write_text(json.dumps(dict(info, config="oops")))
    assert [r["run"] for r in service.list_runs()] == [rid]
    assert [r["run"] for r in service.list_damaged()] == ["broken"]
    from erasure_app.main import create_demo

    create_demo(service)
    assert "deleted damaged run 'broken'" in service.delete_run("broken")
    assert not bad.exists() and service.list_damaged() == []
    # downloading twice leaves one zip, not a new one per call
    before = set(os.listdir(tempfile.gettempdir()))
    z1 = service.run_zip(rid)
    mtime = z1.stat().st_mtime_ns
    z2 = service.run_zip(rid)
    assert z1 == z2 and z2.stat().st_mtime_ns == mtime
    assert set(os.listdir(tempfile.gettempdir())) - before == set()
    assert [p.name for p in z1.parent.iterdir()] == [f"{rid}-run.zip"]


def test_evaluation_prompts_are_sampled_across_the_file_and_seeds_honoured(tmp_path):
    import csv

    from erasure.resources import prompt_file
    from erasure_app.service import sample_prompt_csv

    out = sample_prompt_csv(prompt_file("shapes.csv"), 4, tmp_path)
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == 4 and len({r["shape"] for r in rows}) == 4  # not the first 4 rows (all circles)
    assert sample_prompt_csv(prompt_file("shapes.csv"), 4, tmp_path) == out  # seeded: the same sample
    src = tmp_path / "mine.csv"
    src.write_text("Prompt,SEED\nan apple,7\na pear,8\na car,9\n")
    rows = list(csv.DictReader(sample_prompt_csv(src, 2, tmp_path).open()))
    assert len(rows) == 2 and {(r["prompt"], r["evaluation_seed"]) for r in rows} <= {
        ("an apple", "7"), ("a pear", "8"), ("a car", "9")}


def test_evaluation_is_a_job_in_the_banner_and_can_be_cancelled(service, tmp_path):
    rid = service.erase(_cfg(service), "eval-run")
    f = tmp_path / "p.csv"
    f.write_text("prompt,seed\nan apple,0\na car,1\n")
    seen = []

    def progress(stage, done, total):
        seen.append(service.job_status())
        if stage.startswith("generating"):
            service.cancel()

    with pytest.raises(AppError, match="evaluation of run 'eval-run' cancelled"):
        service.evaluate(rid, "csv", str(f), limit=2, steps=1, guidance=7.5, progress=progress)
    assert seen[0]["running"] and seen[0]["kind"] == "evaluate" and seen[0]["run"] == rid
    st = service.job_status()
    assert not st["running"] and "evaluation of run 'eval-run' cancelled" in st["last"]


def test_prompt_sets_offered_only_where_they_exist(service, monkeypatch):
    from erasure.resources import prompt_file

    monkeypatch.delenv("SALUN_I2P_CSV", raising=False)
    monkeypatch.setattr(AppService, "i2p_path", staticmethod(lambda: None))
    sources = [s for _, s in service.prompt_sources()]
    own = prompt_file("sd_prompts.csv").is_file()
    assert sources == (["model"] if own else []) + ["csv"]  # no I2P without its file
    monkeypatch.setattr(AppService, "i2p_path", staticmethod(lambda: prompt_file("shapes.csv")))
    assert "i2p" in [s for _, s in service.prompt_sources()]
