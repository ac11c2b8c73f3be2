"""Classification benchmark and CLI: records, tables, resume, and clear errors for bad input."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from erasure.classification.bench import run_bench
from erasure.classification.cli import main
from erasure.classification.config import ClsBenchConfig, TrainRecipe
from erasure.classification.data import load_dataset
from erasure.classification.pipeline import Workspace
from erasure.io import read_json


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny_workspace(cfg: ClsBenchConfig) -> Workspace:
    full = load_dataset("digits")
    g = torch.Generator().manual_seed(0)
    tr, te = torch.randperm(len(full.train), generator=g)[:200], torch.randperm(len(full.test), generator=g)[:100]
    bundle = dataclasses.replace(full, train=full.train.subset(tr), test=full.test.subset(te))
    return Workspace.create(cfg, bundle=bundle, recipe=TrainRecipe(epochs=3, lr=0.05, batch_size=32,
                                                                   schedule="cosine"))


def test_bench_records_tables_and_resume(tmp_path):
    cfg = ClsBenchConfig(methods=["retrain,ga,salun"], seeds=2, out=str(tmp_path / "out"),
                         cache_dir=str(tmp_path / "cache"), plot=True,
                         overrides={"salun": {"epochs": 1}, "ga": {"epochs": 1}})
    ws = tiny_workspace(cfg)
    summary = run_bench(cfg, ws=ws)
    out = tmp_path / "out"
    recs = read_json(out / "results.json")
    assert len(recs) == 6 and {r["method"] for r in recs} == {"retrain", "ga", "salun"}
    for r in recs:
        for k in ("UA", "MIA_efficacy", "RA", "TA", "RTE_s", "MIA_auc", "seed", "scenario", "config", "versions"):
            assert k in r
    for name in ("table.csv", "table.md", "table.txt", "summary.json", "originals.json", "splits/seed0.json",
                 "splits/seed1.json", "table.png"):
        assert (out / name).is_file(), name
    header = (out / "table.csv").read_text().splitlines()[0]
    assert "UA_std" in header and "Avg_Gap" in header and "MIA_efficacy_per_seed" in header
    assert "| SalUn |" in (out / "table.md").read_text()
    assert summary["rows"]["retrain"]["Avg_Gap"] == 0.0
    assert len(summary["rows"]["salun"]["MIA_efficacy_per_seed"]) == 2
    assert main(["table", str(out), "--no-plot"]) == 0
    assert main(["methods"]) == 0
    # resume: nothing is rerun
    stamp = [r["RTE_s"] for r in recs]
    run_bench(cfg, ws=ws)
    assert [r["RTE_s"] for r in read_json(out / "results.json")] == stamp
    # a changed knob reruns only that method
    cfg2 = dataclasses.replace(cfg, overrides={"salun": {"epochs": 1, "lr": 0.02}, "ga": {"epochs": 1}})
    run_bench(cfg2, ws=ws)
    recs2 = read_json(out / "results.json")
    assert len(recs2) == 8 and sum(r["method"] == "salun" for r in recs2) == 4


def test_cli_unlearn_end_to_end(tmp_path, capsys):
    run = tmp_path / "run"
    rc = main(["unlearn", "--method", "salun", "--scenario", "class", "--forget-class", "3", "--train-epochs", "2",
               "--cache-dir", str(tmp_path / "cache"), "--out", str(run), "--threads", "1",
               "--method-args", json.dumps({"epochs": 1, "batch_size": 128})])
    assert rc == 0
    rec = read_json(run / "run.json")
    assert rec["method"] == "salun" and rec["method_config"]["epochs"] == 1 and rec["forget_classes"] == [3]
    assert rec["config"]["method"] == "salun" and rec["config"]["out"] == str(run)
    assert (run / "weights.safetensors").is_file() and (run / "mask.safetensors").is_file()
    assert read_json(run / "split.json")["forget_classes"] == [3]
    assert "UA=" in capsys.readouterr().out


def _snapshot(d):
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


def test_cli_unlearn_refuses_existing_out_and_replaces_atomically(tmp_path, caplog, monkeypatch):
    import erasure.classification.pipeline as pipeline

    run = tmp_path / "run"
    common = ["--scenario", "class", "--forget-class", "3", "--train-epochs", "2", "--cache-dir", str(tmp_path / "cache"),
              "--out", str(run), "--threads", "1"]
    salun = ["unlearn", "--method", "salun", *common, "--method-args", json.dumps({"epochs": 1, "batch_size": 128})]
    assert main(salun) == 0
    first = _snapshot(run)
    assert {"run.json", "weights.safetensors", "mask.safetensors", "split.json"} <= set(first)
    assert not (tmp_path / "run.partial").exists()

    # a second run without --overwrite: exit 2, one line naming --overwrite, nothing touched
    caplog.clear()
    ga = ["unlearn", "--method", "ga", *common, "--method-args", json.dumps({"epochs": 1})]
    assert main(ga) == 2
    [err] = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert "--overwrite" in err and str(run) in err and "\n" not in err
    assert _snapshot(run) == first and not (tmp_path / "run.partial").exists()

    # --overwrite with a run that fails half-way: the first run stays whole, no .partial is left
    def diverge(*args, **kwargs):
        (kwargs["artifacts_dir"] / "half-written").write_text("x")
        raise FloatingPointError("loss is nan")

    with monkeypatch.context() as m:
        m.setattr(pipeline, "run_method", diverge)
        assert main([*ga, "--overwrite"]) == 2
    assert _snapshot(run) == first and not (tmp_path / "run.partial").exists()

    # --overwrite: replaced by the new run as a whole (salun's mask does not survive into the ga run)
    assert main([*ga, "--overwrite"]) == 0
    assert read_json(run / "run.json")["method"] == "ga"
    from erasure.runs import CLS_RUN_FORMAT, list_runs, read_run

    info = read_run(run)  # the run-directory object reads classification runs too
    assert info["format"] == CLS_RUN_FORMAT and info["method"] == "ga" and info["config"]["method"] == "ga"
    assert [r["method"] for r in list_runs(tmp_path, kind=CLS_RUN_FORMAT)] == ["ga"] and not list_runs(tmp_path)
    assert "mask.safetensors" not in set(_snapshot(run)) and (run / "weights.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "run"]  # no .partial or .old folder left


@pytest.mark.parametrize("argv, message", [
    (["bench", "--forget-fraction", "1.5"], "forget fraction"),
    (["bench", "--forget-fraction", "0"], "forget fraction"),
    (["unlearn", "--scenario", "class", "--forget-class", "10"], "unknown class"),
    (["bench", "--methods", "nope"], "unknown method"),
    (["unlearn", "--method-args", "{bad"], "not valid JSON"),
    (["bench", "--set", "salun.lr"], "method.key=value"),
])
def test_cli_bad_input(argv, message, caplog, tmp_path):
    rc = main([*argv, "--cache-dir", str(tmp_path)])
    assert rc == 2
    assert message in caplog.text


def test_cli_missing_dataset_and_wrong_checkpoint(tmp_path, caplog):
    rc = main(["train", "--dataset", "cifar10", "--data-root", str(tmp_path), "--cache-dir", str(tmp_path)])
    assert rc == 2 and "does not contain cifar10" in caplog.text
    from erasure.classification.models import build_model, save_checkpoint

    save_checkpoint(build_model("resnet18", 10, 1, (0.3,), (0.4,)), tmp_path / "r.safetensors")
    rc = main(["unlearn", "--original", str(tmp_path / "r.safetensors"), "--cache-dir", str(tmp_path),
               "--out", str(tmp_path / "run")])
    assert rc == 2 and "architecture 'resnet18'" in caplog.text
