"""The built-in arithmetic problems (`alp_trl.arithmetic_data`): verified answers, both splits, reproducible."""

import pytest

from alp_trl.arithmetic_data import (
    SHIPPED_MIX,
    SHIPPED_SEEDS,
    canonical_expression,
    evaluate,
    expression_split,
    generate,
    verify_row,
)
from alp_trl.data import load_split


def test_builtin_arithmetic_is_verified_and_has_both_splits():
    train, test = load_split("builtin:arithmetic", split="train"), load_split("builtin:arithmetic", split="test")
    assert len(train) == 2000 and len(test) == 200
    for row in list(train.select(range(50))) + list(test.select(range(50))):
        assert str(evaluate(row["expr"])) == row["answer"]
    assert set(train["level"]) == {"easy", "medium", "hard"}


def test_shipped_splits_share_no_expression():
    """The leak the second evidence round found (106 of 200 test problems word for word in train) cannot come back:
    no test expression is a train expression, even with the operands of + or * swapped, and each shipped row sits in
    the split its expression hashes to."""
    train, test = load_split("builtin:arithmetic", split="train"), load_split("builtin:arithmetic", split="test")
    train_exprs = {canonical_expression(e) for e in train["expr"]}
    test_exprs = {canonical_expression(e) for e in test["expr"]}
    assert not train_exprs & test_exprs
    assert {expression_split(e) for e in train["expr"]} == {"train"}
    assert {expression_split(e) for e in test["expr"]} == {"test"}
    assert not set(train["problem"]) & set(test["problem"])
    # the shipped files are what the generator writes (their first rows, regenerated)
    for split, rows in (("train", train), ("test", test)):
        assert generate(10, SHIPPED_SEEDS[split], SHIPPED_MIX, split) == list(rows.select(range(10)))


def test_canonical_expression_orders_only_commutative_operands():
    assert canonical_expression("5 + 2") == canonical_expression("2 + 5") == "2 + 5"
    assert canonical_expression("9 * 3") == "3 * 9"
    assert canonical_expression("7 - 3") == "7 - 3"
    assert expression_split("5 + 2") == expression_split("2 + 5")


def test_arithmetic_generation_is_reproducible_and_checked():
    mix = {"easy": 1.0}
    rows = generate(5, 3, mix)
    assert len(rows) == 5 and rows == generate(5, 3, mix)
    assert all(row["level"] == "easy" and str(evaluate(row["expr"])) == row["answer"] for row in rows)
    assert {expression_split(row["expr"]) for row in generate(20, 3, mix, split="test")} == {"test"}
    with pytest.raises(AssertionError):
        verify_row({"expr": "2 + 2", "answer": "5"})
