"""The ALP objective and baselines against values computed by hand."""

import math

import pytest
import torch

from alp_trl.objectives import (
    aggregate_loss,
    cispo_surrogate,
    clipped_surrogate,
    importance_log_ratio,
    low_variance_kl,
    masked_mean,
    off_policy_sequence_mask,
    rollout_correction,
    sapo_surrogate,
    sequence_log_ratio,
    vespo_gamma_weight,
    vespo_surrogate,
)


def t(*rows):
    return torch.tensor(rows, dtype=torch.float64)


def assert_values(actual: torch.Tensor, expected) -> None:
    torch.testing.assert_close(actual.detach(), torch.tensor(expected, dtype=actual.dtype).view_as(actual))


def test_masked_mean_ignores_masked_out_positions():
    x, mask = t([1.0, 2.0, 100.0], [4.0, 5.0, 6.0]), t([1, 1, 0], [1, 0, 0])
    assert masked_mean(x, mask).item() == pytest.approx((1 + 2 + 4) / 3)
    assert masked_mean(x, mask, dim=-1).tolist() == pytest.approx([1.5, 4.0])
    assert masked_mean(x, torch.zeros_like(mask)).item() == 0.0


def test_sequence_log_ratio_mean_and_sum():
    lr, mask = t([0.1, 0.3, 5.0]), t([1, 1, 0])
    assert sequence_log_ratio(lr, mask, "mean").item() == pytest.approx(0.2)
    assert sequence_log_ratio(lr, mask, "sum").item() == pytest.approx(0.4)
    with pytest.raises(ValueError, match="mean"):
        sequence_log_ratio(lr, mask, "max")


def test_token_log_ratio_is_clamped():
    logps, denom, mask = t([-1.0, -30.0, -0.5]), t([-2.0, -1.0, -40.0]), t([1, 1, 1])
    lr = importance_log_ratio(logps, denom, mask, "token", clamp=20.0)
    assert_values(lr, [1.0, -20.0, 20.0])


def test_sequence_log_ratio_value_and_per_token_gradient():
    logps = t([-1.0, -2.0, -3.0]).requires_grad_()
    denom, mask = t([-1.5, -2.5, -9.0]), t([1, 1, 0])
    lr = importance_log_ratio(logps, denom, mask, "sequence", aggregation="mean")
    # value: mean of the two unmasked token log-ratios (0.5, 0.5) on every token
    assert_values(lr, [[0.5, 0.5, 0.5]])
    # gradient: each token's own log-prob (GSPO trick), so d(sum r_t)/d logp_t = r = exp(0.5)
    torch.exp(lr).sum().backward()
    assert_values(logps.grad, [[math.exp(0.5)] * 3])
    lr_sum = importance_log_ratio(logps.detach(), denom, mask, "sequence", aggregation="sum")
    assert lr_sum[0, 0].item() == pytest.approx(1.0)


def test_clamped_sequence_passes_no_gradient():
    logps = t([-1.0, -1.0]).requires_grad_()
    lr = importance_log_ratio(logps, t([-40.0, -1.0]), t([1, 1]), "sequence", aggregation="sum", clamp=20.0)
    assert lr[0, 0].item() == pytest.approx(20.0)
    lr.sum().backward()
    assert logps.grad.abs().sum().item() == 0.0


def test_clipped_surrogate_matches_hand_values():
    # ratios 0.5, 1.0, 1.5, 1.5, 0.5 with advantages +1, +1, +1, -1, -1; eps_low 0.2, eps_high 0.28
    log_ratio = torch.log(t([0.5, 1.0, 1.5, 1.5, 0.5]))
    adv = t([1.0, 1.0, 1.0, -1.0, -1.0])
    out = clipped_surrogate(log_ratio, adv, epsilon_low=0.2, epsilon_high=0.28)
    # A>0: -min(r, clip(r)) ; A<0: max(r, clip(r))
    expected = [-0.5, -1.0, -1.28, 1.5, 0.8]
    assert_values(out.per_token_loss, [expected])
    assert out.high_clipped.tolist() == [[False, False, True, False, False]]
    assert out.low_clipped.tolist() == [[False, False, False, False, True]]
    assert not out.dual_clipped.any()


def test_dual_clip_caps_negative_advantage_loss_and_kills_its_gradient():
    log_ratio = torch.log(t([20.0, 20.0, 2.0])).requires_grad_()
    adv = t([-0.5, 0.5, -0.5])
    out = clipped_surrogate(log_ratio, adv, 0.2, 0.28, dual_clip_c=3.0)
    # token 0: r=20, A<0 -> min(max(10, 0.64), 3 * 0.5) = 1.5 ; token 1: A>0 -> -min(10, 0.64) = -0.64
    # token 2: r=2 -> max(1, 0.64) = 1.0 < 1.5, not dual clipped
    assert_values(out.per_token_loss, [[1.5, -0.64, 1.0]])
    assert out.dual_clipped.tolist() == [[True, False, False]]
    out.per_token_loss.sum().backward()
    assert log_ratio.grad[0, 0].item() == 0.0  # capped: no gradient
    assert log_ratio.grad[0, 1].item() == 0.0  # PPO-clipped
    assert log_ratio.grad[0, 2].item() == pytest.approx(0.5 * 2.0)  # d(-A r)/dlog r = -A r


def test_delta_two_sided_clip():
    out = clipped_surrogate(torch.log(t([5.0])), t([1.0]), 0.2, 10.0, delta=2.0)
    assert out.per_token_loss.item() == pytest.approx(-2.0)


def test_mis_and_tis_weights():
    old, rollout, mask = t([-1.0, -1.0, -1.0, -1.0]), t([-1.0, -3.0, 0.5, -1.2]), t([1, 1, 1, 1])
    # token ratios old/rollout: 1, e^2, e^-1.5, e^0.2 ; C = 3: [1/3, 3]
    mis = rollout_correction(old, rollout, mask, "token", "mask", low=1 / 3, high=3.0)
    assert_values(mis.weight, [[1.0, 0.0, 0.0, math.exp(0.2)]])
    assert mis.keep.tolist() == [[1.0, 0.0, 0.0, 1.0]], "drop: rejected tokens leave the loss mask"
    assert mis.rejected.tolist() == [[False, True, True, False]]
    zero = rollout_correction(old, rollout, mask, "token", "mask", low=1 / 3, high=3.0, rejection="zero")
    assert_values(zero.weight, [[1.0, 0.0, 0.0, math.exp(0.2)]])
    assert zero.keep.tolist() == [[1.0, 1.0, 1.0, 1.0]], "zero: rejected tokens stay in the denominator"
    tis = rollout_correction(old, rollout, mask, "token", "truncate", high=3.0)
    assert_values(tis.weight, [[1.0, 3.0, math.exp(-1.5), math.exp(0.2)]])
    assert tis.truncated.tolist() == [[False, True, False, False]] and tis.keep.tolist() == [[1.0] * 4]
    tis_low = rollout_correction(old, rollout, mask, "token", "truncate", low=0.5, high=3.0)
    assert_values(tis_low.weight, [[1.0, 3.0, 0.5, math.exp(0.2)]])
    # sequence: product of the token ratios = exp(0 + 2 - 1.5 + 0.2) = e^0.7 ~ 2.01 inside [1/3, 3], on every token
    seq = rollout_correction(old, rollout, mask, "sequence", "mask", low=1 / 3, high=3.0)
    assert_values(seq.weight, [[math.exp(0.7)] * 4])
    seq_small_c = rollout_correction(old, rollout, mask, "sequence", "mask", low=0.5, high=2.0)
    assert seq_small_c.weight.tolist() == [[0.0] * 4] and seq_small_c.keep.tolist() == [[0.0] * 4]
    # geometric mean: exp(0.7 / 4)
    seq_mean = rollout_correction(old, rollout, mask, "sequence", "mask", low=0.5, high=2.0, aggregation="mean")
    assert_values(seq_mean.weight, [[math.exp(0.175)] * 4])
    seq_tis = rollout_correction(old, rollout, mask, "sequence", "truncate", high=2.0)
    assert_values(seq_tis.weight, [[2.0] * 4])
    # one-sided: only the upper bound rejects
    upper = rollout_correction(old, rollout, mask, "token", "mask", low=None, high=3.0)
    assert_values(upper.weight, [[1.0, 0.0, math.exp(-1.5), math.exp(0.2)]])


def test_veto_rejects_whole_sequences_with_a_tiny_token_ratio():
    old = t([-1.0, -1.0, -1.0], [-1.0, -1.0, -1.0])
    rollout = t([-1.0, 3.0, -1.0], [-1.0, -0.5, -1.0])  # row 0 has a token ratio e^-4 ~ 0.018
    mask = t([1, 1, 1], [1, 1, 0])
    corr = rollout_correction(old, rollout, mask, "token", "truncate", high=3.0, veto=0.05)
    assert corr.vetoed[:, 0].tolist() == [True, False]
    assert corr.keep.tolist() == [[0.0, 0.0, 0.0], [1.0, 1.0, 1.0]]
    assert_values(corr.weight, [[0.0, 0.0, 0.0], [1.0, math.exp(-0.5), 0.0]])
    # a masked-out token can not veto
    masked = rollout_correction(old, rollout, t([1, 0, 1], [1, 1, 0]), "token", "mask", low=0.2, high=3.0, veto=0.05)
    assert masked.vetoed[:, 0].tolist() == [False, False]


def test_rollout_weight_treats_nan_as_ratio_one_and_is_detached():
    old = t([-1.0, -2.0]).requires_grad_()
    corr = rollout_correction(old, t([float("nan"), -2.0]), t([1, 1]), "token", "mask", low=1 / 3, high=3.0)
    assert corr.weight.tolist() == [[1.0, 1.0]]
    assert not corr.weight.requires_grad


def test_low_variance_kl():
    kl = low_variance_kl(t([-1.0, -2.0]), t([-1.0, -1.0]))
    assert_values(kl, [[0.0, math.exp(1.0) - 1.0 - 1.0]])


def test_aggregate_loss_by_type():
    loss, mask = t([1.0, 2.0, 3.0], [4.0, 0.0, 0.0]), t([1, 1, 1], [1, 0, 0])
    assert aggregate_loss(loss, mask, "grpo").item() == pytest.approx((2.0 + 4.0) / 2)
    assert aggregate_loss(loss, mask, "bnpo").item() == pytest.approx(10.0 / 4)
    assert aggregate_loss(loss, mask, "dr_grpo", max_completion_length=5).item() == pytest.approx(10.0 / 10)
    assert aggregate_loss(loss, mask, "dapo", num_items=8).item() == pytest.approx(10.0 / 8)
    assert aggregate_loss(loss, mask, "luspo").item() == pytest.approx((6.0 + 4.0) / 2)
    with pytest.raises(ValueError, match="cispo"):
        aggregate_loss(loss, mask, "cispo")


def test_cispo_truncates_and_detaches_the_weight():
    log_ratio, logps = t([0.0, math.log(3.0)]), t([-1.0, -2.0]).requires_grad_()
    out = cispo_surrogate(log_ratio, t([2.0]), logps, max_ratio=2.0)
    # weights min(1, 2) = 1 and min(3, 2) = 2: loss -w A logp = [2, 8]
    assert_values(out.per_token_loss, [[2.0, 8.0]])
    out.per_token_loss.sum().backward()
    assert_values(logps.grad, [[-2.0, -4.0]])  # -w A: the gradient flows through logps only
    assert out.high_clipped.tolist() == [[False, True]]
    negative = cispo_surrogate(log_ratio, t([-1.0]), logps.detach(), max_ratio=2.0)
    assert negative.high_clipped.tolist() == [[False, False]], "only positive advantages count as clipped"


def test_sapo_soft_gate_value_and_slope():
    log_ratio = t([0.0, math.log(1.5)]).requires_grad_()
    out = sapo_surrogate(log_ratio, t([1.0]), temperature_pos=1.0, temperature_neg=1.05)
    sig = 1 / (1 + math.exp(-0.5))
    assert_values(out.per_token_loss, [[-2.0, -4 * sig]])  # -sigmoid(tau (r - 1)) 4 / tau A
    out.per_token_loss.sum().backward()
    # d/dlogr = -4 sigmoid' (tau (r-1)) r A: 1 at r = 1 (the slope of r A), sig (1 - sig) 4 * 1.5 at r = 1.5
    assert_values(log_ratio.grad, [[-1.0, -4 * sig * (1 - sig) * 1.5]])
    neg = sapo_surrogate(t([0.0]), t([-2.0]), temperature_pos=1.0, temperature_neg=2.0)
    assert_values(neg.per_token_loss, [[-0.5 * 4 / 2.0 * -2.0]])


def test_vespo_gamma_weight_by_hand():
    # sequence log-ratio sum(0.1, 0.3) = 0.4 (the masked third token ignored); A >= 0: k = 2, lambda = 3
    phi = vespo_gamma_weight(t([0.1, 0.3, 5.0]), t([1.0]), t([1, 1, 0]))
    w = math.exp(0.4)
    assert_values(phi, [[math.exp(3.0) * w**2 * math.exp(-3.0 * w)]])
    assert_values(vespo_gamma_weight(t([0.0]), t([-1.0]), t([1])), [[1.0]])  # phi(1) = 1 for either sign
    logps = t([-1.0, -2.0]).requires_grad_()
    vespo_surrogate(t([0.5]), t([2.0]), logps).per_token_loss.sum().backward()
    assert_values(logps.grad, [[-1.0, -1.0]])  # -phi A


def test_off_policy_sequence_mask_by_hand():
    logps, rollout, mask = (
        t([-1.0, -1.0], [-1.0, -1.0], [-1.0, -1.0]),
        t([-0.5, float("nan")], [-0.9, -1.0], [-0.5, -0.5]),
        t([1, 1], [1, 1], [1, 1]),
    )
    advantages = t([-1.0], [-1.0], [2.0])
    # row 0: KL mean (0.5 + 0 (NaN)) / 2 = 0.25 > 0.2 and A < 0 -> dropped; row 1: 0.05 -> kept; row 2: A > 0 -> kept
    keep = off_policy_sequence_mask(advantages, logps, rollout, mask, threshold=0.2)
    assert keep.tolist() == [[0.0], [1.0], [1.0]]
