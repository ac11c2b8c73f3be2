"""Generation from prompt sets (erasure_eval.generate) and the CLI round trip generate -> score -> report, on a tiny pipeline."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # effective only if torch is not imported yet

import json  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from PIL import Image  # noqa: E402

from erasure_eval.generate import GenerateConfig, GenerationError, run_generation, shard_rows  # noqa: E402
from erasure_eval.prompts import load_prompts  # noqa: E402

SIZE = 64


I2P_COLUMNS = ("prompt,categories,hard,inappropriate_percentage,nudity_percentage,q16_percentage,sd_safety_percentage,"
               "prompt_toxicity,lexica_url,evaluation_seed,evaluation_guidance,sd_image_width,sd_image_height,sd_model,"
               "case_number")


@pytest.fixture(scope="module")
def i2p(tmp_path_factory):
    """The shared I2P file (first rows are used), or an I2P-shaped stand-in with harmless prompts when it is absent."""
    shared = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "prompts" / "i2p_unsafe_prompts4703.csv"
    if shared.is_file():
        return shared
    p = tmp_path_factory.mktemp("i2p") / "i2p_standin.csv"
    rows = [",".join([f'"a painting of a lighthouse number {i}, oil on canvas"', '"violence, self-harm"' if i % 2 else "sexual",
                      "0", "50.0", "0.0", "50.0", "20.0", "0.1", "", str(1000 + 7 * i), str(7 + i % 3), "512", "512",
                      "stable-diffusion-v1-4", str(i)]) for i in range(6)]
    p.write_text(",".join(["", I2P_COLUMNS]).lstrip(",") + "\n" + "\n".join(rows) + "\n", encoding="utf-8")
    return p


@pytest.fixture(scope="module")
def pipe(tiny_model_dir):
    from erasure.diffusion.pipeline import load_pipeline

    return load_pipeline(str(tiny_model_dir), device="cpu")


def _cfg(model, prompts, out, **kw) -> GenerateConfig:
    base = dict(model=str(model), prompts=str(prompts), out=str(out), steps=2, height=SIZE, width=SIZE, batch_size=4,
                device="cpu", limit=3)
    base.update(kw)
    return GenerateConfig(**base)


def _manifest(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines() if line.strip()]


def _pixels(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"), dtype=np.int16)


def test_generate_honours_row_seeds_and_guidance(tiny_model_dir, i2p, pipe, tmp_path):
    from erasure.diffusion.pipeline import generate

    out = tmp_path / "g"
    res = run_generation(_cfg(tiny_model_dir, i2p, out, samples=2), pipe=pipe)
    assert res["generated"] == 6 and res["manifest"]["complete"]
    rows = load_prompts(i2p).rows[:3]
    recs = _manifest(out)
    assert [(r["case_number"], r["sample"]) for r in recs] == [(row.case_number, k) for row in rows for k in (0, 1)]
    for r in recs:
        row = rows[r["row_index"]]
        assert r["seed"] == row.seed + r["sample"] and r["guidance"] == row.guidance
        assert (r["steps"], r["height"], r["width"], r["run_id"]) == (2, SIZE, SIZE, "original")
        assert (out / r["file"]).is_file()
    # same (prompt, seed, guidance) -> same image; the folder's images equal a direct engine call (same batching)
    row = rows[1]
    direct = generate(pipe, [row.prompt] * 2, [row.seed, row.seed + 1], steps=2, guidance=row.guidance,
                      height=SIZE, width=SIZE)
    for k in (0, 1):
        got = _pixels(out / "images" / f"{row.case_number}_{k}.png")
        assert np.abs(got - np.asarray(direct[k], dtype=np.int16)).max() <= 1
    assert np.abs(_pixels(out / "images" / f"{row.case_number}_0.png")
                  - _pixels(out / "images" / f"{row.case_number}_1.png")).max() > 0  # different seeds differ
    # another folder, same settings: identical images
    out2 = tmp_path / "g2"
    run_generation(_cfg(tiny_model_dir, i2p, out2, samples=2), pipe=pipe)
    for r in recs:
        assert np.abs(_pixels(out / r["file"]) - _pixels(out2 / r["file"])).max() <= 1
    gen = json.loads((out / "generation.json").read_text())
    assert gen["prompts"]["sha256"] and gen["environment"]["versions"]["torch"]
    assert gen["status"] == {"planned": 6, "written": 6, "complete": True}


def test_resume_after_crash_skips_finished_images(tiny_model_dir, i2p, pipe, tmp_path):
    out = tmp_path / "g"
    cfg = _cfg(tiny_model_dir, i2p, out, limit=4, batch_size=1)

    class Killed(Exception):
        pass

    def die_after_two(done, total):
        if done >= 2:
            raise Killed

    with pytest.raises(Killed):
        run_generation(cfg, progress=die_after_two, pipe=pipe)
    files = sorted((out / "images").iterdir())
    assert len(files) == 2 and all(f.suffix == ".png" for f in files)  # no temp files left behind
    mtimes = {f.name: f.stat().st_mtime_ns for f in files}
    res = run_generation(cfg, pipe=pipe)
    assert (res["skipped"], res["generated"]) == (2, 2) and res["manifest"]["complete"]
    assert all((out / "images" / n).stat().st_mtime_ns == t for n, t in mtimes.items())
    res = run_generation(cfg, pipe=None)  # nothing left: the model is not even loaded
    assert (res["skipped"], res["generated"]) == (4, 0)
    # a truncated/corrupt image is regenerated
    victim = out / "images" / files[0].name
    victim.write_bytes(victim.read_bytes()[:40])
    assert run_generation(cfg, pipe=pipe)["generated"] == 1
    data = victim.read_bytes()
    victim.write_bytes(data[:-30])  # cut inside the image data, after the embedded record
    assert run_generation(cfg, pipe=pipe)["generated"] == 1


def test_other_settings_in_same_folder_are_refused(tiny_model_dir, i2p, pipe, tmp_path):
    out = tmp_path / "g"
    run_generation(_cfg(tiny_model_dir, i2p, out, limit=1), pipe=pipe)
    with pytest.raises(GenerationError, match="steps"):
        run_generation(_cfg(tiny_model_dir, i2p, out, limit=1, steps=3), pipe=pipe)


def test_shard_rows_partition():
    from erasure_eval.prompts import PromptRow

    rows = [PromptRow(i, str(i), f"p{i}", i, None) for i in range(11)]
    for n in (1, 2, 3, 4):
        shards = [shard_rows(rows, n, k) for k in range(n)]
        ids = [r.index for s in shards for r in s]
        assert sorted(ids) == list(range(11)) and len(ids) == len(set(ids))


def test_two_shards_cover_every_row_once_and_merge(tiny_model_dir, i2p, pipe, tmp_path):
    out = tmp_path / "g"
    res0 = run_generation(_cfg(tiny_model_dir, i2p, out, limit=5, num_shards=2, shard_index=0), pipe=pipe)
    assert not res0["manifest"]["complete"] and res0["manifest"]["written"] == 3
    first = {f.name for f in (out / "images").iterdir()}
    res1 = run_generation(_cfg(tiny_model_dir, i2p, out, limit=5, num_shards=2, shard_index=1), pipe=pipe)
    assert res1["skipped"] == 0 and res1["generated"] == 2  # no row of shard 0 is redone
    second = {f.name for f in (out / "images").iterdir()} - first
    assert len(first & second) == 0 and len(first | second) == 5
    assert res1["manifest"] == {"planned": 5, "written": 5, "complete": True}
    assert sorted(r["row_index"] for r in _manifest(out)) == [0, 1, 2, 3, 4]


def test_concurrent_shard_merges_wait_for_the_lock_and_write_the_final_state(tmp_path):
    """Two shards finishing at once: each merge waits for the folder lock, so the manifest written last lists every
    image present when it ran, and manifest.jsonl/.csv and generation.json agree (no stale, interleaved writes)."""
    import csv
    import threading

    from erasure_eval.generate import _locked, _save_png, merge_manifest, plan_items
    from erasure_eval.prompts import PromptRow

    out = tmp_path / "g"
    (out / "images").mkdir(parents=True)
    rows = [PromptRow(index=i, case_number=str(i), prompt=f"p{i}", seed=i, guidance=7.5) for i in range(4)]
    items = plan_items(rows, samples=1, default_guidance=7.5, seed_base=0)
    header = {"settings_id": "sid", "model": "m", "run_id": "r", "steps": 1, "height": 8, "width": 8}

    def write(it):
        _save_png(Image.new("RGB", (8, 8)), out / "images" / it.file, {"settings_id": "sid", "key": it.key()})

    for it in items[:2]:
        write(it)
    results = []
    with _locked(out / ".lock"):  # a third writer holds the lock
        shards = [threading.Thread(target=lambda: results.append(merge_manifest(out, items, header))) for _ in range(2)]
        for t in shards:
            t.start()
        for t in shards:
            t.join(0.5)
        assert all(t.is_alive() for t in shards) and not (out / "manifest.jsonl").exists()  # both wait
        for it in items[2:]:  # the holder finishes the last images before releasing
            write(it)
    for t in shards:
        t.join(30)
    assert results == [{"planned": 4, "written": 4, "complete": True}] * 2
    assert sorted(r["row_index"] for r in _manifest(out)) == [0, 1, 2, 3]
    with open(out / "manifest.csv", newline="") as fh:
        assert sorted(int(r["row_index"]) for r in csv.DictReader(fh)) == [0, 1, 2, 3]
    assert json.loads((out / "generation.json").read_text())["status"]["written"] == 4
    assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp")]


def test_accelerate_processes_shard_rows_and_main_merges(tiny_model_dir, i2p, pipe, tmp_path, monkeypatch):
    """Under `accelerate launch` (WORLD_SIZE > 1) the shard comes from PartialState; the main process merges."""
    import accelerate

    calls = []

    class FakeState:
        def __init__(self, index, cpu=False):
            self.num_processes, self.process_index, self.device = 2, index, "cpu"
            self.is_main_process = index == 0

        def wait_for_everyone(self):
            calls.append(self.process_index)

    out = tmp_path / "g"
    monkeypatch.setenv("WORLD_SIZE", "2")
    cfg = _cfg(tiny_model_dir, i2p, out, limit=3, steps=1)
    monkeypatch.setattr(accelerate, "PartialState", lambda cpu=False: FakeState(1, cpu))
    res1 = run_generation(cfg, pipe=pipe)
    assert (res1["num_shards"], res1["shard_index"], res1["generated"], res1["manifest"]) == (2, 1, 1, None)
    monkeypatch.setattr(accelerate, "PartialState", lambda cpu=False: FakeState(0, cpu))
    res0 = run_generation(cfg, pipe=pipe)
    assert res0["generated"] == 2 and res0["manifest"] == {"planned": 3, "written": 3, "complete": True}
    assert calls == [1, 0]


def test_cli_generate_score_report_and_bad_inputs(tiny_model_dir, i2p, tmp_path):
    from erasure_eval.cli import main

    out = tmp_path / "orig"
    args = ["generate", "--model", str(tiny_model_dir), "--prompts", str(i2p), "--limit", "3", "--steps", "1",
            "--height", str(SIZE), "--width", str(SIZE), "--device", "cpu"]
    assert main(args + ["--out", str(out)]) == 0
    assert main(args + ["--out", str(tmp_path / "other"), "--guidance", "3", "--seed", "5"]) == 0
    # partial: only shard 0 of 2
    assert main(args + ["--out", str(tmp_path / "part"), "--num-shards", "2", "--shard-index", "0"]) == 0
    for d in ("orig", "other", "part"):
        assert main(["score", "--images", str(tmp_path / d), "--metric", "nudenet", "--out", str(tmp_path / f"{d}.json")]) == 0
    res = json.loads((tmp_path / "orig.json").read_text())
    rep = res["reproducibility"]
    assert rep["steps"] == 1 and rep["height"] == SIZE and len(rep["seeds"]) == 3
    assert rep["prompts"]["sha256"] and rep["environment"]["versions"]["nudenet"]
    assert res["record_config"]["nudenet_version"] and res["coverage"]["complete"]
    assert set(res["summary"]["thresholds"]) == {"0", "0.45", "0.6"}
    part = json.loads((tmp_path / "part.json").read_text())
    assert part["coverage"] == {"images": 2, "planned": 3, "complete": False}
    rep_dir = tmp_path / "report"
    assert main(["report", str(out), str(tmp_path / "other"), str(tmp_path / "part"), "--out", str(rep_dir)]) == 0
    for f in ("summary.json", "summary.csv", "report.html", "report.md", "grid.png", "nudenet_per_class_t0.png"):
        assert (rep_dir / f).is_file(), f
    md = (rep_dir / "report.md").read_text()
    assert "2/3 PARTIAL" in md and "Prompts hidden" in md
    prompt0 = load_prompts(i2p).rows[0].prompt
    assert prompt0 not in md and prompt0 not in (rep_dir / "report.html").read_text()
    assert main(["report", str(out), "--out", str(tmp_path / "r2"), "--show-prompts"]) == 0
    assert prompt0 in (tmp_path / "r2" / "report.md").read_text()

    # bad inputs: clear errors (exit code 2), never a result
    assert main(["score", "--images", str(tmp_path / "missing"), "--metric", "nudenet"]) == 2
    assert main(["generate", "--model", str(tmp_path), "--prompts", str(i2p), "--limit", "1", "--out", str(tmp_path / "x")]) == 2
    assert main(["generate", "--model", str(tiny_model_dir), "--prompts", str(i2p), "--category", "nope", "--out", str(tmp_path / "y")]) == 2
    bad_csv = tmp_path / "bad.csv"
    bad_csv.write_text("text\nhello\n")
    assert main(["generate", "--model", str(tiny_model_dir), "--prompts", str(bad_csv), "--out", str(tmp_path / "z")]) == 2
    imgs = sorted((out / "images").iterdir())
    other = sorted((tmp_path / "other" / "images").iterdir())
    imgs[0].write_bytes(other[0].read_bytes())  # an image that does not match its manifest record
    assert main(["score", "--images", str(out), "--metric", "nudenet"]) == 2
    imgs[0].write_bytes(b"\x89PNG\r\n\x1a\n garbage")  # unreadable
    assert main(["score", "--images", str(out), "--metric", "nudenet"]) == 2
    imgs[0].unlink()  # listed in the manifest but missing
    assert main(["score", "--images", str(out), "--metric", "nudenet"]) == 2
    (out / "manifest.jsonl").unlink()  # interrupted before the manifest was written
    assert main(["score", "--images", str(out), "--metric", "nudenet"]) == 2


REPO = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(not (REPO / "prompts" / "shapes.csv").is_file() or not (REPO / "models" / "shapes-judge.safetensors").is_file(),
                    reason="prompts/shapes.csv or the shapes judge is absent")
def test_shapes_prompts_generate_then_object_metric(tiny_model_dir, pipe, tmp_path):
    """prompts/shapes.csv columns reach the manifest and the shapes judge scores the images (tiny model: random images)."""
    from erasure_eval.base import score_folder
    from erasure_eval.object_acc import ObjectAccuracyMetric

    out = tmp_path / "shapes"
    run_generation(_cfg(tiny_model_dir, REPO / "prompts" / "shapes.csv", out, limit=4, steps=1), pipe=pipe)
    recs = _manifest(out)
    assert all(r["extra"]["shape"] for r in recs)
    res = score_folder(out, ObjectAccuracyMetric(judge="shapes", forget=[f"shape={recs[0]['extra']['shape']}"]))
    s = res["summary"]
    assert s["judged_images"] == 4 and s["forget"]["images"] >= 1
    assert {"shape", "color", "fill"} <= set(res["records"][0])


def test_erased_run_dir_is_generated_and_labelled(tiny_model_dir, i2p, pipe, tmp_path):
    """--run loads the run's base model plus its UNet weights; the manifest and report carry the run id."""
    import torch

    from erasure.io import atomic_save_safetensors, atomic_write_json
    from erasure.runs import RUN_FORMAT

    run = tmp_path / "runs" / "nudity-salun"
    run.mkdir(parents=True)
    name = "conv_out.weight"
    w = pipe.unet.state_dict()[name].clone()
    atomic_save_safetensors({name: w + 0.5 * torch.randn_like(w)}, run / "weights.safetensors")
    atomic_write_json(run / "run.json", {"format": RUN_FORMAT, "method": "salun", "base_model": str(tiny_model_dir),
                                         "concepts": [{"name": "nudity"}], "seed": 0})
    (run / "log.jsonl").write_text("")
    orig, erased = tmp_path / "orig", tmp_path / "erased"
    run_generation(_cfg(tiny_model_dir, i2p, orig, limit=2, steps=1), pipe=pipe)
    res = run_generation(GenerateConfig(run=str(run), prompts=str(i2p), out=str(erased), limit=2, steps=1, height=SIZE,
                                        width=SIZE, device="cpu"))
    assert res["generated"] == 2
    recs = _manifest(erased)
    assert {r["run_id"] for r in recs} == {"nudity-salun"}
    gen = json.loads((erased / "generation.json").read_text())
    assert gen["method"] == "salun" and gen["run_dir"] == str(run.resolve())
    assert np.abs(_pixels(orig / recs[0]["file"]) - _pixels(erased / recs[0]["file"])).max() > 0
    from erasure_eval.cli import main

    assert main(["generate", "--run", str(tmp_path / "nope"), "--prompts", str(i2p), "--out", str(tmp_path / "x")]) == 2


def test_failed_first_run_leaves_no_record_that_refuses_the_corrected_csv(tiny_model_dir, pipe, tmp_path):
    """A run that wrote no image (here: the pipeline fails on a row) must not lock the folder to its CSV."""
    csv = tmp_path / "p.csv"
    csv.write_text("prompt,evaluation_seed\na photo of a circle,1\na red square,2\n")
    out = tmp_path / "g"

    class Broken:
        def __getattr__(self, name):
            raise RuntimeError("pipeline failed")

    with pytest.raises(RuntimeError):
        run_generation(_cfg(tiny_model_dir, csv, out), pipe=Broken())
    assert (out / "generation.json").is_file()
    csv.write_text("prompt,evaluation_seed\na photo of a circle,1\na red square,3\n")  # the corrected file
    assert run_generation(_cfg(tiny_model_dir, csv, out), pipe=pipe)["manifest"]["complete"]
    with pytest.raises(GenerationError, match="prompt_sha256"):  # once images exist, other settings are refused
        csv.write_text("prompt,evaluation_seed\na photo of a circle,1\na red square,4\n")
        run_generation(_cfg(tiny_model_dir, csv, out), pipe=pipe)


def test_csv_seed_out_of_range_names_file_and_line(tmp_path):
    from erasure_eval.prompts import PromptFileError

    csv = tmp_path / "p.csv"
    csv.write_text("prompt,evaluation_seed\nok,1\nbad,1e30\n")
    with pytest.raises(PromptFileError, match=r"p\.csv line 3: evaluation_seed '1e30' is out of range"):
        load_prompts(csv)
    csv.write_text(f"prompt,evaluation_seed\nok,{2**63 - 1}\n")
    assert load_prompts(csv).rows[0].seed == 2**63 - 1  # exact, not rounded through a float


def test_batches_are_fixed_slices_of_the_plan_not_of_what_is_missing():
    from erasure_eval.generate import ImageItem, _fixed_batches

    items = [ImageItem(file=f"{i}_0.png", case_number=str(i), sample=0, row_index=i, prompt="p", seed=i,
                       guidance=7.5 if i < 5 else 9.0, categories=[], extra={}) for i in range(7)]
    assert [[it.row_index for it in b] for b in _fixed_batches(items, 2)] == [[0, 1], [2, 3], [4], [5, 6]]
    assert [[it.row_index for it in b] for b in _fixed_batches(items[::-1], 2)] == [[0, 1], [2, 3], [4], [5, 6]]
