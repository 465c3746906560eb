"""Exact tests and the pre-registered decision rule for the study's small counts (a handful of runs per method),
written out so that no statistics package is needed."""

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


VERDICTS = ("for", "no verdict", "against")  # the rule's outcomes, in the order a report lists them


def blowup_verdict(method_blown: int, control_blown: int, for_margin: int) -> str:
    """The rule fixed before a training comparison, on its final counts: `"for"` the paper when the method blows up in
    at least `for_margin` fewer runs than the control (Bypass), `"against"` when in as many or more, else
    `"no verdict"`. `blowup_verdict(5, 8, 3)` is `"for"`, `(6, 8, 3)` `"no verdict"`, `(8, 8, 3)` `"against"`."""
    return _verdict_of_difference(control_blown - method_blown, for_margin)


def _verdict_of_difference(fewer: int, for_margin: int) -> str:
    """The rule on how many fewer runs the method blew up in than the control."""
    if for_margin < 1:
        raise ValueError(f"for_margin must be at least 1, got {for_margin}")
    return "for" if fewer >= for_margin else "against" if fewer <= 0 else "no verdict"


def possible_verdicts(
    method: tuple[int, int], control: tuple[int, int], runs: int, for_margin: int
) -> tuple[str, ...]:
    """The verdicts `blowup_verdict` can still reach when each arm has `runs` runs in all and so far (runs that blew
    up, runs judged) of `method` and `control`: every split of the runs still to come is possible."""
    (method_blown, method_judged), (control_blown, control_judged) = method, control
    for name, blown, judged in (("method", *method), ("control", *control)):
        if not 0 <= blown <= judged <= runs:
            raise ValueError(f"{name}: need 0 <= blown ({blown}) <= judged ({judged}) <= runs ({runs})")
    least = control_blown - (method_blown + runs - method_judged)  # the method blows up in every run to come
    most = control_blown + runs - control_judged - method_blown  # the control does, the method in none
    reached = {_verdict_of_difference(fewer, for_margin) for fewer in range(least, most + 1)}
    return tuple(verdict for verdict in VERDICTS if verdict in reached)
