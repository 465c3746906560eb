"""The built-in arithmetic problems (`alp_trl.arithmetic_data`): verified answers, both splits, reproducible."""

import pytest

from alp_trl.arithmetic_data import evaluate, generate, verify_row
from alp_trl.data import load_split


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
