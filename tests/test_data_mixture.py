"""`dataset_mixture` (`alp_trl.data_mixture`): sources merged with their own columns, shares and filters; bad keys named."""

import pytest


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
