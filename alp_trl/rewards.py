"""Reward functions for math RL, selectable by name: `accuracy` (math-verify), `format`, `length`.

Each function follows TRL's reward-function contract: `f(completions, **dataset_columns) -> list[float]`. Recipes name
them in `reward_funcs` and weigh them with TRL's `reward_weights`.

math-verify times out with `signal.alarm`, which only works in the main thread of the main interpreter. The accuracy
reward uses it there; anywhere else (a thread pool, an async reward loop) it grades in a worker process of its own,
with the same time limit enforced from outside. A completion that cannot be parsed, or whose grading times out, gets
0 and increments a counter (`GradingStats`) that the trainer logs; grading never raises.
"""

import logging
import re
import threading
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field


logger = logging.getLogger(__name__)

DEFAULT_TIMEOUT_SECONDS = 5
WORKER_GRACE_SECONDS = 10  # a worker process gets this long beyond `timeout` (start-up, imports) before it is killed


@dataclass
class GradingStats:
    """Counters of the accuracy reward since the last `pop()`."""

    graded: int = 0
    parse_failures: int = 0
    gold_parse_failures: int = 0
    timeouts: int = 0
    errors: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, outcome: str) -> None:
        with self._lock:
            self.graded += 1
            if outcome != "ok":
                setattr(self, outcome, getattr(self, outcome) + 1)

    def pop(self) -> dict[str, int]:
        with self._lock:
            counts = {
                k: getattr(self, k) for k in ("graded", "parse_failures", "gold_parse_failures", "timeouts", "errors")
            }
            self.graded = self.parse_failures = self.gold_parse_failures = self.timeouts = self.errors = 0
        return counts


GRADING_STATS = GradingStats()


def completion_text(completion) -> str:
    """The text of a completion, conversational (`[{"role": "assistant", "content": ...}]`) or plain."""
    if isinstance(completion, list):
        return "".join(m.get("content") or "" for m in completion if isinstance(m, dict))
    if isinstance(completion, dict):
        return completion.get("content") or ""
    return str(completion)


def _parse_gold(answer: str, timeout: int | None):
    """Parse a gold answer given as a plain number, an expression, LaTeX (with or without `$`), or GSM8K's `#### N`."""
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse

    text = str(answer).strip()
    if "####" in text:
        text = text.split("####")[-1].strip().replace(",", "")
    delimited = "$" in text or "\\boxed" in text or "\\(" in text or "\\[" in text
    for candidate in [text] if delimited else [f"${text}$", text]:
        parsed = parse(
            candidate, parsing_timeout=timeout, extraction_config=[LatexExtractionConfig(), ExprExtractionConfig()]
        )
        if parsed:
            return parsed
    return []


def grade(prediction: str, answer: str, timeout: int | None = DEFAULT_TIMEOUT_SECONDS) -> tuple[float, str]:
    """
    Grade one completion against a gold answer (a plain number or LaTeX) with math-verify.

    Returns `(score, outcome)`, outcome one of `"ok"`, `"parse_failures"`, `"gold_parse_failures"`, `"timeouts"`,
    `"errors"`. With `timeout` set, math-verify's signal-based time limit applies to each parse and comparison, so
    this must run in a main thread (see `safe_grade`); math-verify swallows its own timeouts into a failed parse or
    comparison, so a failure that took the whole time limit is reported as a timeout. `timeout=None` disables it.
    """
    import time

    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

    start = time.monotonic()

    def failed(outcome: str) -> tuple[float, str]:
        timed_out = timeout is not None and time.monotonic() - start >= 0.95 * timeout
        return 0.0, "timeouts" if timed_out else outcome

    try:
        gold = _parse_gold(answer, timeout)
        if not gold:
            return failed("gold_parse_failures")
        pred = parse(
            prediction,
            parsing_timeout=timeout,
            extraction_config=[LatexExtractionConfig(boxed_match_priority=0), ExprExtractionConfig()],
        )
        if not pred:
            return failed("parse_failures")
        if verify(gold, pred, timeout_seconds=timeout):
            return 1.0, "ok"
        return failed("ok")
    except Exception:  # a grader must never take training down
        logger.debug("math-verify failed on %r vs %r", prediction[:200], answer, exc_info=True)
        return failed("errors")


def _in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


class _ProcessGrader:
    """One worker process that grades off the main thread; replaced if a grading hangs past its deadline."""

    def __init__(self):
        self._executor: ProcessPoolExecutor | None = None
        self._lock = threading.Lock()
        self._unavailable = False  # a worker process could not start here (e.g. `python -` has no main file)

    def _get(self) -> ProcessPoolExecutor:
        if self._executor is None:
            import multiprocessing

            self._executor = ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn"))
        return self._executor

    def grade(self, prediction: str, answer: str, timeout: int | None, grader: Callable = None) -> tuple[float, str]:
        grader = grader or grade  # (tests pass a slow grader here)
        with self._lock:  # one worker: serialise, and replace it cleanly after a hang
            if not self._unavailable:
                future = self._get().submit(grader, prediction, answer, timeout)
                try:
                    return future.result(timeout=None if timeout is None else timeout + WORKER_GRACE_SECONDS)
                except FutureTimeout:
                    self._reset()
                    return 0.0, "timeouts"
                except BrokenProcessPool:
                    self._reset()
                    self._unavailable = True
                    logger.warning(
                        "No grading worker process can start here: grading off the main thread runs "
                        "in-thread without a time limit."
                    )
        return grade(prediction, answer, timeout=None)

    def _reset(self) -> None:
        if self._executor is not None:
            for process in list(getattr(self._executor, "_processes", {}).values()):
                process.kill()
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None


_PROCESS_GRADER = _ProcessGrader()


def safe_grade(prediction: str, answer: str, timeout: int | None = DEFAULT_TIMEOUT_SECONDS) -> tuple[float, str]:
    """`grade` that is safe from any thread: in-process on the main thread, in a worker process elsewhere."""
    if _in_main_thread() or timeout is None:
        return grade(prediction, answer, timeout)
    return _PROCESS_GRADER.grade(prediction, answer, timeout)


def accuracy_reward(completions, answer, timeout: int | None = DEFAULT_TIMEOUT_SECONDS, **kwargs) -> list[float]:
    """1.0 when math-verify finds the completion's final answer equal to the gold `answer`, else 0.0.

    Parse failures, timeouts and grader errors score 0 and are counted; with TRL's `log_metric` (passed by the
    trainer) the counts are logged as `rewards/accuracy/<counter>`.
    """
    rewards = []
    for completion, gold in zip(completions, answer, strict=True):
        score, outcome = safe_grade(completion_text(completion), gold, timeout)
        GRADING_STATS.add(outcome)
        rewards.append(score)
    log_metric = kwargs.get("log_metric")
    if log_metric is not None:
        for name, count in GRADING_STATS.pop().items():
            if name != "graded":
                log_metric(f"rewards/accuracy/{name}", float(count))
    return rewards


def make_accuracy_reward(timeout: int | None = DEFAULT_TIMEOUT_SECONDS) -> Callable:
    """`accuracy_reward` with a grading time limit of `timeout` seconds (logged as reward `accuracy`)."""

    def accuracy(completions, answer, **kwargs) -> list[float]:
        return accuracy_reward(completions, answer, timeout=timeout, **kwargs)

    return accuracy


_BOXED = re.compile(r"\\boxed\s*\{.+?\}", re.DOTALL)


def make_format_reward(tag: str = "boxed") -> Callable:
    """1.0 when the completion gives its answer in `\\boxed{...}` (tag `"boxed"`) or inside `<tag>...</tag>`."""
    pattern = _BOXED if tag == "boxed" else re.compile(rf"<{re.escape(tag)}>.+?</{re.escape(tag)}>", re.DOTALL)

    def format_reward(completions, **kwargs) -> list[float]:
        return [1.0 if pattern.search(completion_text(c)) else 0.0 for c in completions]

    format_reward.__name__ = "format"
    return format_reward


def make_length_reward(target_chars: int = 400) -> Callable:
    """0 up to `target_chars` characters, then linearly down to -1 at twice the target (a brevity pressure)."""

    def length_reward(completions, **kwargs) -> list[float]:
        out = []
        for c in completions:
            excess = len(completion_text(c)) - target_chars
            out.append(-min(1.0, max(0.0, excess / target_chars)))
        return out

    length_reward.__name__ = "length"
    return length_reward


REWARD_REGISTRY: dict[str, Callable[..., Callable]] = {
    "accuracy": lambda reward_timeout=DEFAULT_TIMEOUT_SECONDS, **kw: make_accuracy_reward(reward_timeout),
    "format": lambda format_tag="boxed", **kw: make_format_reward(format_tag),
    "length": lambda length_target_chars=400, **kw: make_length_reward(length_target_chars),
}


def get_reward_funcs(names: list[str], **options) -> list[Callable]:
    """Build the reward functions named in a recipe (`REWARD_REGISTRY` keys), with their options."""
    unknown = [n for n in names if n not in REWARD_REGISTRY]
    if unknown:
        raise ValueError(f"`reward_funcs` got unknown names {unknown}; allowed values are {sorted(REWARD_REGISTRY)}.")
    funcs = []
    for name in names:
        func = REWARD_REGISTRY[name](**options)
        funcs.append(func)
    return funcs
