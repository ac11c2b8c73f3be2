"""Prompt-set CSV loading and filters (erasure_eval.prompts)."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # effective only if torch is not imported yet

import pytest  # noqa: E402

from erasure_eval.prompts import PromptFileError, filter_rows, load_prompts  # noqa: E402


def _csv(tmp_path, text: str, name: str = "p.csv"):
    p = tmp_path / name
    p.write_text(text, encoding="utf-8")
    return p


def test_minimal_csv_defaults(tmp_path):
    ps = load_prompts(_csv(tmp_path, "prompt\na cat\na dog\n"))
    assert [r.prompt for r in ps.rows] == ["a cat", "a dog"]
    assert [r.case_number for r in ps.rows] == ["0", "1"]
    assert ps.rows[0].seed is None and ps.rows[0].guidance is None
    assert len(ps.sha256) == 64


def test_missing_prompt_column(tmp_path):
    with pytest.raises(PromptFileError, match="no 'prompt' column"):
        load_prompts(_csv(tmp_path, "text,evaluation_seed\na cat,1\n"))


def test_missing_file(tmp_path):
    with pytest.raises(PromptFileError, match="not found"):
        load_prompts(tmp_path / "nope.csv")


def test_bad_seed_and_duplicate_case(tmp_path):
    with pytest.raises(PromptFileError, match="evaluation_seed"):
        load_prompts(_csv(tmp_path, "prompt,evaluation_seed\na cat,abc\n"))
    with pytest.raises(PromptFileError, match="repeats"):
        load_prompts(_csv(tmp_path, "case_number,prompt\n1,a\n1,b\n"))


def test_empty_prompt_rows_are_skipped_and_recorded(tmp_path):
    ps = load_prompts(_csv(tmp_path, "case_number,prompt\n0,a cat\n1,\n2,a dog\n"))
    assert [r.case_number for r in ps.rows] == ["0", "2"]
    assert ps.skipped_empty == ["1"]


def test_filters(tmp_path):
    ps = load_prompts(_csv(tmp_path, 'prompt,categories\na,"sexual, violence"\nb,hate\nc,sexual\nd,hate\n'))
    assert [r.prompt for r in filter_rows(ps.rows, category="sexual")] == ["a", "c"]
    assert [r.prompt for r in filter_rows(ps.rows, category=["hate", "violence"])] == ["a", "b", "d"]
    assert [r.prompt for r in filter_rows(ps.rows, start=1, end=3)] == ["b", "c"]
    assert [r.prompt for r in filter_rows(ps.rows, category="hate", limit=1)] == ["b"]
    with pytest.raises(PromptFileError, match="no rows in category"):
        filter_rows(ps.rows, category="shocking")
    with pytest.raises(PromptFileError, match="leave no prompt rows"):
        filter_rows(ps.rows, start=10)


def test_shared_i2p_and_imagenette(shared_data_dir):
    i2p = load_prompts(shared_data_dir / "prompts" / "i2p_unsafe_prompts4703.csv")
    assert len(i2p.rows) + len(i2p.skipped_empty) == 4703
    r0 = i2p.rows[0]
    assert r0.seed == 4261553411 and r0.guidance == 13.0 and r0.categories == ["violence", "self-harm"]
    assert len(filter_rows(i2p.rows, category="sexual")) == 931
    inet = load_prompts(shared_data_dir / "prompts" / "imagenette.csv")  # starts with a BOM
    assert inet.rows[0].extra["class"] == "tench" and inet.rows[0].case_number == "0"
    nud = load_prompts(shared_data_dir / "prompts" / "unlearndiffatk" / "nudity.csv")
    assert len(nud.rows) == 142
