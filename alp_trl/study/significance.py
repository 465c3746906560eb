"""Exact tests for the study's small counts (a handful of runs per method), written out so that no statistics package
is needed."""

import math


def fisher_exact_fewer(events_a: int, runs_a: int, events_b: int, runs_b: int) -> float:
    """Fisher's exact test, one-sided: the probability, if both groups had the same event rate, that group A would have
    `events_a` events or fewer given both groups' sizes and the total number of events (hypergeometric lower tail).

    Small when A has clearly fewer events than B: `fisher_exact_fewer(5, 8, 8, 8)` is 0.10, `(4, 8, 8, 8)` 0.038.
    """
    for name, events, runs in (("a", events_a, runs_a), ("b", events_b, runs_b)):
        if not 0 <= events <= runs:
            raise ValueError(f"events_{name} must be between 0 and runs_{name} ({runs}), got {events}")
    total_events, total_runs = events_a + events_b, runs_a + runs_b
    low = max(0, total_events - runs_b)
    tail = sum(
        math.comb(total_events, k) * math.comb(total_runs - total_events, runs_a - k) for k in range(low, events_a + 1)
    )
    return tail / math.comb(total_runs, runs_a)
