"""Rewards: math-verify grading on hand-made cases, off the main thread, in worker processes, with timeouts."""

import multiprocessing
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from alp_trl import rewards
from alp_trl.rewards import (
    GRADING_STATS,
    accuracy_reward,
    completion_text,
    get_reward_funcs,
    grade,
    make_format_reward,
    make_length_reward,
)


CASES = [
    ("The answer is \\boxed{19}.", "19", 1.0),
    ("\\boxed{20}", "19", 0.0),
    ("So we get \\boxed{\\frac{3}{4}}", "0.75", 1.0),  # LaTeX fraction vs plain number
    ("The result is $0.5$.", "\\frac{1}{2}", 1.0),  # plain number vs LaTeX gold
    ("\\boxed{2\\sqrt{2}}", "\\sqrt{8}", 1.0),
    ("Final answer: 1,234", "1234", 1.0),
    ("\\boxed{12}", "#### 12", 1.0),  # GSM8K-style gold
]


@pytest.mark.parametrize(("prediction", "gold", "expected"), CASES)
def test_grade_hand_cases(prediction, gold, expected):
    score, outcome = grade(prediction, gold)
    assert (score, outcome) == (expected, "ok")


def test_unparseable_completion_scores_zero_and_is_counted():
    assert grade("I do not know.", "5") == (0.0, "parse_failures")
    GRADING_STATS.pop()
    completions = [
        [{"role": "assistant", "content": "no digits here"}],
        [{"role": "assistant", "content": "\\boxed{5}"}],
    ]
    logged = {}
    scores = accuracy_reward(completions, ["5", "5"], log_metric=lambda name, value: logged.__setitem__(name, value))
    assert scores == [0.0, 1.0]
    assert logged["rewards/accuracy/parse_failures"] == 1.0 and logged["rewards/accuracy/timeouts"] == 0.0


def test_unparseable_gold_is_counted_separately():
    assert grade("\\boxed{3}", "") == (0.0, "gold_parse_failures")


def test_main_thread_timeout_gives_zero_and_counts_a_timeout(monkeypatch):
    import math_verify.parser

    finished = []

    def slow_extract(*args, **kwargs):
        time.sleep(30)
        finished.append(True)
        return []

    monkeypatch.setattr(math_verify.parser, "extract_target_from_pred", slow_extract)
    assert grade("\\boxed{1}", "1", timeout=1) == (0.0, "timeouts")
    assert not finished, "the signal alarm must interrupt the slow parse"


def test_grading_from_threads_uses_a_worker_process():
    import alp_trl.rewards as rewards

    assert threading.current_thread() is threading.main_thread()
    with ThreadPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(lambda case: rewards.safe_grade(case[0], case[1]), CASES[:4]))
    assert [score for score, _ in results] == [expected for _, _, expected in CASES[:4]]
    # graded by the worker process, not by the in-thread fallback (taken only when no worker can start)
    grader = rewards._PROCESS_GRADER
    assert grader._executor is not None and not grader._unavailable
    workers = list(grader._executor._processes.values())
    assert workers and all(w.pid != os.getpid() and w.is_alive() for w in workers)
    # a plain `grade` with a time limit off the main thread fails inside math-verify (signals): caught, never raised
    with ThreadPoolExecutor(max_workers=1) as pool:
        assert pool.submit(grade, "\\boxed{19}", "19", 5).result() == (0.0, "errors")


def sleeping_grader(prediction, answer, timeout):
    time.sleep(60)
    return 1.0, "ok"


def test_hung_worker_is_killed_and_replaced(monkeypatch):
    monkeypatch.setattr(rewards, "WORKER_GRACE_SECONDS", 1)
    grader = rewards._ProcessGrader()
    outcome = {}

    def run():
        start = time.monotonic()
        outcome["slow"] = grader.grade("\\boxed{1}", "1", 1, grader=sleeping_grader)
        outcome["seconds"] = time.monotonic() - start
        outcome["after"] = grader.grade("\\boxed{1}", "1", 5)

    worker = threading.Thread(target=run)
    worker.start()
    worker.join(timeout=120)
    assert outcome["slow"] == (0.0, "timeouts") and outcome["seconds"] < 30
    assert outcome["after"] == (1.0, "ok"), "a fresh worker grades after the hung one was killed"


def _grade_in_process(case):
    return grade(case[0], case[1])[0]


def test_grading_in_a_process_pool():
    with multiprocessing.get_context("spawn").Pool(2) as pool:
        assert pool.map(_grade_in_process, CASES) == [expected for _, _, expected in CASES]


def test_format_and_length_rewards():
    boxed = make_format_reward("boxed")
    assert boxed(["x = \\boxed{3}", "x = 3", [{"role": "assistant", "content": "\\boxed{ 4 }"}]]) == [1.0, 0.0, 1.0]
    tagged = make_format_reward("answer")
    assert tagged(["<answer>3</answer>", "<answer></answer>", "3"]) == [1.0, 0.0, 0.0]
    length = make_length_reward(10)
    assert length(["a" * 5, "a" * 15, "a" * 40]) == [0.0, -0.5, -1.0]


def test_registry_names_and_errors():
    funcs = get_reward_funcs(["accuracy", "format", "length"], format_tag="boxed", length_target_chars=50)
    assert [f.__name__ for f in funcs] == ["accuracy", "format", "length"]
    with pytest.raises(ValueError, match=r"reward_funcs.*\['accuracy', 'format', 'length'\]"):
        get_reward_funcs(["accuracy", "bleu"])
    assert completion_text([{"role": "assistant", "content": "hi"}]) == "hi"
