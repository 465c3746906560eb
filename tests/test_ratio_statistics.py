"""Importance-ratio statistics (`alp_trl.ratio_statistics`) by value."""

import math

import pytest
import torch

from alp_trl.ratio_statistics import importance_weight_sums, weight_diagnostics


def test_weight_diagnostics_by_hand():
    # two sequences: tokens [0.5, -0.5] and [30.0 (beyond the clamp of 20), masked]
    log_ratio = torch.tensor([[0.5, -0.5], [30.0, 1.0]])
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    token = weight_diagnostics({k: float(v) for k, v in importance_weight_sums(log_ratio, mask, "token").items()})
    w = [math.exp(0.5), math.exp(-0.5), math.exp(20.0)]
    assert token["is_weight_chi2"] == pytest.approx(sum(x * x for x in w) / 3 - 1)
    assert token["is_weight_ess_frac"] == pytest.approx(sum(w) ** 2 / (3 * sum(x * x for x in w)))
    assert token["ppl_ratio"] == pytest.approx((math.exp(0.0) + math.exp(-30.0)) / 2)
    assert token["seq_clamped_frac"] == 0.5 and token["abs_max_preclamp"] == 30.0
    seq = weight_diagnostics(
        {k: float(v) for k, v in importance_weight_sums(log_ratio, mask, "sequence", "mean").items()}
    )
    ws = [math.exp(0.0), math.exp(20.0)]  # sequence means 0 and 30 (clamped to 20)
    assert seq["is_weight_chi2"] == pytest.approx(sum(x * x for x in ws) / 2 - 1)
    assert seq["is_weight_ess_frac"] == pytest.approx(sum(ws) ** 2 / (2 * sum(x * x for x in ws)))
    assert seq["seq_clamped_frac"] == 0.5 and seq["abs_max_preclamp"] == 30.0
