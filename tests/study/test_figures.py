"""`alp_trl.study.figures`: the values the plots draw."""

import pytest


def test_coverage_excess_is_relative_to_the_mean_policy_kl_not_seed_by_seed():
    """A seed whose k1 estimate of the policy's KL is near 0 must not blow the figure's ratio up: the excess is
    normalised by the mean over seeds (hand values: policy KLs 0.02 and 0.0, mean 0.01)."""
    from alp_trl.study.figures import coverage_excess

    seeds = [
        {"kl_unperturbed": 0.02, "kl_averaged": 0.01, "kl_one_draw": 0.05},
        {"kl_unperturbed": 0.0, "kl_averaged": 0.002, "kl_one_draw": 0.03},
    ]
    mean, std = coverage_excess(seeds, "averaged")
    assert mean == pytest.approx((-1.0 + 0.2) / 2) and std == pytest.approx(abs(-1.0 - 0.2) / 2**0.5)
    assert coverage_excess(seeds[:1], "one_draw") == (pytest.approx(1.5), 0.0)
