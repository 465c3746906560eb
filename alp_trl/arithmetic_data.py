"""The repository's own arithmetic data set, for the offline demo and tests (`builtin:arithmetic`).

Regenerate the shipped files with:

    python -m alp_trl.arithmetic_data --out alp_trl/assets/arithmetic

Every answer is computed from the problem, then checked twice: by evaluating the expression with a separate
evaluator (Python's `ast`), and by math-verify, which must accept `\\boxed{answer}` against the gold answer.

The splits share no expression: every expression (up to the order of the operands of `+` and `*`) belongs to exactly
one split, by a hash of its canonical form (`expression_split`), so a test problem is never a train problem reworded.
"""

import argparse
import ast
import hashlib
import json
import operator
import random
from pathlib import Path


# level -> (operators, operand range). Chosen so that a 135M model answers some but not all (mixed group outcomes).
LEVELS = {
    "easy": (("+",), (1, 9)),
    "medium": (("+", "-"), (10, 49)),
    "hard": (("+", "-", "*"), (2, 99)),
}
TEMPLATES = ("What is {expr}?", "Compute {expr}.", "Calculate {expr}.")
_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul}


def evaluate(expr: str) -> int:
    """Evaluate an integer expression of + - * with Python's parser (not `eval`)."""

    def walk(node):
        if isinstance(node, ast.Expression):
            return walk(node.body)
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            return _OPS[type(node.op)](walk(node.left), walk(node.right))
        if isinstance(node, ast.Constant) and isinstance(node.value, int):
            return node.value
        raise ValueError(f"unsupported expression {expr!r}")

    return walk(ast.parse(expr, mode="eval"))


def make_problem(rng: random.Random, level: str) -> dict:
    ops, (low, high) = LEVELS[level]
    op = rng.choice(ops)
    a, b = rng.randint(low, high), rng.randint(low, high)
    if op == "-" and b > a:
        a, b = b, a  # keep answers non-negative
    if op == "*":
        b = rng.randint(2, 9)
    expr = f"{a} {op} {b}"
    answer = {"+": a + b, "-": a - b, "*": a * b}[op]
    return {"problem": rng.choice(TEMPLATES).format(expr=expr), "answer": str(answer), "level": level, "expr": expr}


TEST_SHARE = 0.2  # the share of the expression space that belongs to the test split
SHIPPED_MIX = {"easy": 0.5, "medium": 0.35, "hard": 0.15}  # the level mix of the shipped files
SHIPPED_SEEDS = {"train": 0, "test": 1}


def canonical_expression(expr: str) -> str:
    """`expr` with the operands of a commutative operator in ascending order (`"5 + 2"` -> `"2 + 5"`)."""
    a, op, b = expr.split()
    if op in ("+", "*") and int(a) > int(b):
        a, b = b, a
    return f"{a} {op} {b}"


def expression_split(expr: str) -> str:
    """`"test"` for a fixed `TEST_SHARE` of the expressions, chosen by a hash of the canonical form, else `"train"`."""
    digest = hashlib.sha256(canonical_expression(expr).encode()).digest()
    return "test" if int.from_bytes(digest[:8], "big") / 2**64 < TEST_SHARE else "train"


def verify_row(row: dict) -> None:
    """Raise if the gold answer is not the value of the expression, or if math-verify would not accept it."""
    from math_verify import parse, verify

    value = evaluate(row["expr"])
    if str(value) != row["answer"]:
        raise AssertionError(f"{row['expr']} = {value}, not {row['answer']}")
    gold = parse(f"${row['answer']}$")
    if not verify(gold, parse(f"The answer is \\boxed{{{value}}}.")):
        raise AssertionError(f"math-verify rejects the gold answer of {row}")


def generate(num_rows: int, seed: int, mix: dict[str, float], split: str | None = None) -> list[dict]:
    """`num_rows` verified problems, levels drawn by `mix`; with `split`, only expressions of that split."""
    rng = random.Random(seed)
    levels, weights = zip(*mix.items())
    rows = []
    while len(rows) < num_rows:
        row = make_problem(rng, rng.choices(levels, weights)[0])
        if split is not None and expression_split(row["expr"]) != split:
            continue
        verify_row(row)
        rows.append({"id": f"arith-{seed}-{len(rows):05d}", **row})
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(Path(__file__).parent / "assets" / "arithmetic"))
    parser.add_argument("--train-rows", type=int, default=2000)
    parser.add_argument("--test-rows", type=int, default=200)
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for split, rows in (("train", args.train_rows), ("test", args.test_rows)):
        data = generate(rows, SHIPPED_SEEDS[split], SHIPPED_MIX, split)
        with open(out / f"{split}.jsonl", "w") as f:
            for row in data:
                f.write(json.dumps(row) + "\n")
        print(f"wrote {len(data)} verified problems to {out / f'{split}.jsonl'}")


if __name__ == "__main__":
    main()
