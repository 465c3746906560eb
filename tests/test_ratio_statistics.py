"""Importance-ratio statistics (`alp_trl.ratio_statistics`) by value."""

import math

import pytest
import torch

from alp_trl.ratio_statistics import (
    binned_log_ratio_envelope,
    importance_weight_sums,
    mismatch_statistics,
    ratio_statistics,
    weight_diagnostics,
)


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


def test_ratio_and_mismatch_statistics_by_hand():
    log_ratio = torch.tensor([[0.0, 0.5, -0.5, 9.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    stats = ratio_statistics(log_ratio, mask)
    assert stats["ratio_max"].item() == torch.tensor(0.5).exp().item()  # the masked 9.0 is ignored
    assert abs(stats["log_ratio_abs_max"].item() - 0.5) < 1e-7
    expected_k3 = sum(torch.tensor(x).exp().item() - 1 - x for x in (0.0, 0.5, -0.5)) / 3
    assert abs(stats["kl_k3"].item() - expected_k3) < 1e-6
    train, rollout = torch.log(torch.tensor([[0.5, 0.9]])), torch.log(torch.tensor([[0.25, 0.9]]))
    mismatch = mismatch_statistics(train, rollout, torch.ones(1, 2))
    assert abs(mismatch["prob_abs_diff_max"].item() - 0.25) < 1e-6
    assert abs(mismatch["logp_abs_diff_max"].item() - torch.log(torch.tensor(2.0)).item()) < 1e-6


def test_envelope_bins_tokens_by_rollout_probability():
    rollout = torch.log(torch.tensor([[0.005, 0.006, 0.5, 0.55, 0.97]]))
    log_ratio = torch.tensor([[1.0, 3.0, 0.1, 0.2, 0.0]])
    rows = binned_log_ratio_envelope(log_ratio, rollout, torch.ones(1, 5), bins=[0.0, 0.01, 0.6, 1.0])
    assert [(r["lo"], r["hi"], r["count"]) for r in rows] == [(0.0, 0.01, 2), (0.01, 0.6, 2), (0.6, 1.0, 1)]
    assert rows[0]["q50"] == 2.0 and rows[2]["q99"] == 0.0


def test_ratio_statistics_on_known_log_ratios():
    ratios = torch.arange(1.0, 102.0)  # 1, 2, ..., 101
    stats = ratio_statistics(ratios.log().unsqueeze(0), torch.ones(1, 101))
    assert stats["ratio_p50"].item() == pytest.approx(51.0)  # linear interpolation at 0.5 * 100
    assert stats["ratio_p99"].item() == pytest.approx(100.0)  # at 0.99 * 100 = 99 -> the 100th value
    assert stats["ratio_max"].item() == pytest.approx(101.0) and stats["ratio_min"].item() == pytest.approx(1.0)
    assert stats["log_ratio_abs_max"].item() == pytest.approx(math.log(101.0))
    assert stats["kl_k3"].item() == pytest.approx((ratios - 1 - ratios.log()).mean().item(), rel=1e-5)
    masked = ratio_statistics(ratios.log().unsqueeze(0), (ratios <= 3).float().unsqueeze(0))
    assert masked["ratio_max"].item() == pytest.approx(3.0), "masked-out tokens do not count"
