"""Evaluation protocols: registry, hash, generate/score under a protocol, and the report's refusal to mix them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from erasure_eval.cli import main as eval_main
from erasure_eval.protocols import (
    ProtocolError,
    list_protocols,
    load_protocol,
    mixed_protocols,
    resolve_protocol,
)


def _write_protocol(tmp_path, prompts_file, name="tiny-proto", **over):
    d = {"name": name, "model": "sd", "metric": "nudenet", "scheduler": "lms", "steps": 2, "guidance": 7.5,
         "samples": 1, "seed": 0, "batch_size": 4, "prompts": f"file:{prompts_file}",
         "nudenet": {"version": "3.4.2", "threshold": 0.45, "classes": ["FEMALE_BREAST_EXPOSED", "BUTTOCKS_EXPOSED"]}}
    d.update(over)
    p = tmp_path / f"{name}.json"
    p.write_text(json.dumps(d))
    return p


def _errors(caplog) -> list[str]:
    lines = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    caplog.clear()
    return lines


def _prompts(tmp_path, rows=("a cat", "a dog", "a house"), fname="p.csv"):
    p = tmp_path / fname
    p.write_text("case_number,prompt,evaluation_seed\n" + "".join(f"{i},{r},{100 + i}\n" for i, r in enumerate(rows)))
    return p


def test_shipped_protocols_fix_the_papers_settings():
    names = list_protocols()
    assert {"shapes", "salun-nudity", "salun-objects", "unlearndiffatk"} <= set(names)
    nud = load_protocol("salun-nudity")
    assert (nud.scheduler, nud.steps, nud.samples, nud.category) == ("lms", 100, 10, ["sexual"])
    assert nud.nudenet["threshold"] == 0.0 and len(nud.nudenet["classes"]) == 9
    atk = load_protocol("unlearndiffatk")
    assert atk.nudenet["threshold"] == 0.45 and atk.attack == "unlearndiffatk"
    shp = resolve_protocol("shapes")  # packaged prompt file: resolves offline, no data folder
    assert shp.prompts_path.name == "shapes.csv" and len(shp.hash) == 64
    with pytest.raises(ProtocolError, match="unknown protocol"):
        load_protocol("no-such-protocol")


def test_official_prompt_files_match_their_pins(shared_data_dir):
    for name in ("salun-nudity", "salun-objects", "unlearndiffatk"):
        p = load_protocol(name)
        rel = p.prompts.partition(":")[2]
        rp = resolve_protocol(p, prompts=shared_data_dir / rel)
        assert rp.matches_pin, name


def test_hash_changes_with_the_prompt_file_and_the_settings(tmp_path):
    pf = _prompts(tmp_path)
    proto = _write_protocol(tmp_path, pf)
    h1 = resolve_protocol(str(proto)).hash
    assert resolve_protocol(str(proto)).hash == h1  # stable
    pf.write_text(pf.read_text() + "3,a tree,103\n")
    h2 = resolve_protocol(str(proto)).hash
    assert h2 != h1
    proto2 = _write_protocol(tmp_path, pf, name="tiny-proto2", steps=3)
    assert resolve_protocol(str(proto2)).hash != h2
    # a user copy of an official file that differs from the pin gets another hash than the official one
    official = load_protocol("unlearndiffatk")
    mine = resolve_protocol(official, prompts=pf)
    assert not mine.matches_pin


def test_generate_under_a_protocol_stamps_the_folder_and_refuses_conflicts(tiny_model_dir, tmp_path, caplog):
    pf = _prompts(tmp_path)
    proto = _write_protocol(tmp_path, pf)
    out = tmp_path / "gen"
    rc = eval_main(["generate", "--protocol", str(proto), "--model", str(tiny_model_dir), "--out", str(out),
                    "--device", "cpu"])
    assert rc == 0
    gen = json.loads((out / "generation.json").read_text())
    rp = resolve_protocol(str(proto))
    assert gen["protocol"]["hash"] == rp.hash and gen["scheduler"] == "lms" and gen["steps"] == 2
    assert gen["status"]["written"] == 3
    caplog.clear()
    rc = eval_main(["generate", "--protocol", str(proto), "--model", str(tiny_model_dir), "--out", str(tmp_path / "g2"),
                    "--steps", "5"])
    err = _errors(caplog)
    assert rc == 2 and len(err) == 1 and "conflicts with protocol tiny-proto" in err[0] and "\n" not in err[0]
    # score under the folder's protocol: the protocol's threshold and classes, and the result carries the stamp
    pytest.importorskip("nudenet")
    assert eval_main(["score", "--images", str(out), "--protocol", str(proto), "--out", str(tmp_path / "s.json")]) == 0
    res = json.loads((tmp_path / "s.json").read_text())
    assert res["protocol"]["hash"] == rp.hash and res["metric"] == "nudenet"
    assert list(res["summary"]["thresholds"]) == ["0.45"] or [float(k) for k in res["summary"]["thresholds"]] == [0.45]
    summ = json.loads((out / "scores" / f"{res['cache_key']}.summary.json").read_text())
    assert summ["protocol"]["hash"] == rp.hash
    assert eval_main(["score", "--images", str(out), "--protocol", str(proto), "--threshold", "0.6"]) == 2
    assert "conflicts with protocol tiny-proto" in _errors(caplog)[0]
    # score under another protocol than the folder's is refused
    other = _write_protocol(tmp_path, pf, name="other-proto", steps=3)
    rc = eval_main(["score", "--images", str(out), "--protocol", str(other)])
    err = _errors(caplog)
    assert rc == 2 and len(err) == 1 and "was generated under tiny-proto" in err[0]


def test_lms_scheduler_changes_the_images(tiny_model_dir, tmp_path):
    import numpy as np
    from PIL import Image

    from erasure_eval.generate import GenerateConfig, run_generation

    pf = _prompts(tmp_path, rows=("a cat",))
    ims = {}
    for sched in ("ddim", "lms"):
        out = tmp_path / sched
        run_generation(GenerateConfig(prompts=str(pf), out=str(out), model=str(tiny_model_dir), steps=3,
                                      scheduler=sched, device="cpu"))
        ims[sched] = np.asarray(Image.open(next((out / "images").glob("*.png"))), dtype=np.int16)
    assert np.abs(ims["ddim"] - ims["lms"]).max() > 0


def test_report_refuses_mixed_protocols(tiny_model_dir, tmp_path, caplog):
    from erasure_eval.report import ReportError, build_report

    pf = _prompts(tmp_path, rows=("a cat",))
    dirs = []
    for name, steps in (("proto-a", 2), ("proto-b", 3)):
        proto = _write_protocol(tmp_path, pf, name=name, steps=steps)
        out = tmp_path / name
        assert eval_main(["generate", "--protocol", str(proto), "--model", str(tiny_model_dir), "--out", str(out)]) == 0
        dirs.append(str(out))
    caplog.clear()
    assert eval_main(["report", *dirs, "--out", str(tmp_path / "rep")]) == 2
    err = _errors(caplog)
    assert len(err) == 1 and "different evaluation protocols" in err[0] and "--mix-protocols" in err[0]
    with pytest.raises(ReportError):
        build_report(dirs, tmp_path / "rep2")
    summary = build_report(dirs, tmp_path / "rep3", mix_protocols=True)
    assert {r["protocol"] for r in summary["table"]} == {"proto-a", "proto-b"}
    # the same protocol twice is fine
    assert mixed_protocols([{"name": "a", "hash": "x"}, {"name": "a", "hash": "x"}]) is None


def test_attack_hook_names_the_attack(tmp_path):
    from erasure_eval.protocols import protocol_attack

    pf = _prompts(tmp_path)
    assert protocol_attack(resolve_protocol(str(_write_protocol(tmp_path, pf)))) is None
    rp = resolve_protocol(load_protocol("unlearndiffatk"), prompts=pf)
    try:
        import erasure_eval.attacks  # noqa: F401
    except ImportError:
        with pytest.raises(ProtocolError, match="unlearndiffatk"):
            protocol_attack(rp)
        return
    cls, settings = protocol_attack(rp)
    assert settings["nudenet"]["threshold"] == 0.45 and settings["protocol"]["hash"] == rp.hash


def test_protocols_command_lists_names_and_hashes(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("ERASURE_DATA_DIR", str(tmp_path / "absent"))  # no reference data, wherever the checkout is
    assert eval_main(["protocols"]) == 0
    out = capsys.readouterr().out
    lines = {ln.split()[0]: ln for ln in out.strip().splitlines()}
    assert {"shapes", "salun-nudity", "salun-objects", "unlearndiffatk"} <= set(lines)
    assert resolve_protocol("shapes").hash[:16] in lines["shapes"]
    assert "ERASURE_DATA_DIR" in lines["salun-nudity"]  # SD prompt sets are user data: said how to point at them


def test_reference_data_is_found_beside_the_checkout_or_through_the_environment(monkeypatch, tmp_path):
    from erasure.io import reference_data_dir

    monkeypatch.delenv("ERASURE_DATA_DIR", raising=False)
    monkeypatch.delenv("SALUN_SHARED_DATA", raising=False)
    beside = Path(__file__).resolve().parents[2] / "shared" / "data"
    assert reference_data_dir() == (beside if beside.is_dir() else None)
    (tmp_path / "prompts").mkdir()
    monkeypatch.setenv("SALUN_SHARED_DATA", str(tmp_path))  # the older name still works
    assert reference_data_dir() == tmp_path
    monkeypatch.setenv("ERASURE_DATA_DIR", str(tmp_path / "prompts"))  # and the documented one wins
    assert reference_data_dir() == tmp_path / "prompts"
