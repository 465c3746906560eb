"""Data loading and prompt building: built-in sets, local files, nested columns, and errors that name the culprit."""

import json

import pytest
from datasets import Dataset

from alp_trl.arithmetic_data import evaluate, generate, verify_row
from alp_trl.data import build_prompts, clean_answer, load_split


def test_builtin_arithmetic_is_verified_and_has_both_splits():
    train, test = load_split("builtin:arithmetic", split="train"), load_split("builtin:arithmetic", split="test")
    assert len(train) == 2000 and len(test) == 200
    for row in list(train.select(range(50))) + list(test.select(range(50))):
        assert str(evaluate(row["expr"])) == row["answer"]
    assert set(train["level"]) == {"easy", "medium", "hard"}


def test_arithmetic_generation_is_reproducible_and_checked():
    mix = {"easy": 1.0}
    assert generate(5, 3, mix) == generate(5, 3, mix)
    with pytest.raises(AssertionError):
        verify_row({"expr": "2 + 2", "answer": "5"})


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


def _write_jsonl(path, rows):
    import json

    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_dataset_mixture_merges_sources_with_their_own_columns_shares_and_filters(tmp_path):
    from alp_trl.data_mixture import load_mixture, parse_dataset_mixture

    guru = _write_jsonl(
        tmp_path / "guru.jsonl",
        [
            {"prompt": [{"role": "user", "content": f"G{i}"}], "reward_model": {"ground_truth": str(i)}}
            for i in range(10)
        ],
    )
    openr1 = _write_jsonl(
        tmp_path / "openr1.jsonl",
        [{"question": f"O{i}", "solution": f"#### {i}", "scores": [i % 3 / 2, 0.5]} for i in range(12)],
    )
    mixture = parse_dataset_mixture(
        {
            "datasets": [
                {"id": guru, "problem_column": "prompt", "answer_column": "reward_model.ground_truth", "weight": 0.5},
                {
                    "id": openr1,
                    "problem_column": "question",
                    "answer_column": "solution",
                    "score_column": "scores",
                    "score_range": [0.3, 0.6],  # mean of [i%3/2, 0.5]: 0.25, 0.5, 0.75 -> keeps i % 3 == 1
                    "samples": 3,
                },
            ],
            "seed": 7,
        }
    )
    train, test = load_mixture(mixture, "Solve: {problem}", None, conversational=True)
    assert test is None and len(train) == 5 + 3
    by_source = {}
    for row in train:
        by_source.setdefault(row["source"], []).append(row)
    assert len(by_source[guru]) == 5 and len(by_source[openr1]) == 3
    for row in by_source[openr1]:
        index = int(row["prompt"][-1]["content"].removeprefix("Solve: O"))
        assert index % 3 == 1 and row["answer"] == str(index), "filtered by score, GSM8K-style answer cleaned"
    for row in by_source[guru]:
        assert row["answer"] == row["prompt"][-1]["content"].removeprefix("Solve: G")
    again, _ = load_mixture(mixture, "Solve: {problem}", None, conversational=True)
    assert again["prompt"] == train["prompt"], "the same seed gives the same mixture"
    assert [r["source"] for r in train] != [guru] * 5 + [openr1] * 3, "shuffled, not concatenated"
    mixture.test_split_size = 0.25
    train, test = load_mixture(mixture, "Solve: {problem}", None, conversational=True)
    assert len(train) == 6 and len(test) == 2


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ({"datasets": []}, r"dataset_mixture.datasets` must be a non-empty list"),
        ({"datasets": [{"id": "a", "weight": 1.5}]}, r"dataset_mixture.datasets\[0\].weight.*\(0, 1\]"),
        ({"datasets": [{"id": "a"}, {"id": "b", "samples": 0}]}, r"dataset_mixture.datasets\[1\].samples"),
        ({"datasets": [{"id": "a", "weight": 0.5, "samples": 3}]}, r"datasets\[0\]` sets both"),
        ({"datasets": [{"id": "a", "colums": ["x"]}]}, r"datasets\[0\]` has unknown keys \['colums'\]"),
        ({"datasets": [{"id": "a", "score_column": "s"}]}, r"score_column` and `score_range` go together"),
        ({"datasets": [{"id": "a"}], "test_split_size": 2}, r"test_split_size"),
        ({"datasets": [{"id": "a"}], "shuffle": True}, r"unknown keys \['shuffle'\]"),
    ],
)
def test_bad_dataset_mixture_is_refused_naming_the_key(value, message):
    from alp_trl.data_mixture import parse_dataset_mixture

    with pytest.raises(ValueError, match=message):
        parse_dataset_mixture(value)
