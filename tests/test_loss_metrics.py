"""The update's metrics (`alp_trl.loss_metrics`): named scalars reduced across ranks, each by its own rule."""

import math

import pytest
import torch

from alp_trl.loss_metrics import reduce_named_scalars


def test_named_scalars_are_reduced_by_their_own_rule_in_one_gather():
    class TwoRanks:  # rank 0's row and a second rank's, as accelerate's gather would stack them
        calls = 0

        def gather(self, row):
            TwoRanks.calls += 1
            return torch.cat([row, row * torch.tensor([[3.0, 3.0, 3.0, 3.0]])])

    named = {
        "m": (torch.tensor(1.0), "mean"),
        "x": (torch.tensor(2.0), "max"),
        "n": (torch.tensor(-1.0), "min"),
        "s": (torch.tensor(0.5), "sum"),
    }
    assert reduce_named_scalars(TwoRanks(), named) == {"m": 2.0, "x": 6.0, "n": -3.0, "s": 2.0}
    assert TwoRanks.calls == 1


class OneRank:
    """accelerate's reductions on a single process."""

    def reduce(self, tensor, reduction="sum"):
        return tensor

    def gather(self, row):
        return row


def _update_metrics(level):
    from collections import defaultdict
    from types import SimpleNamespace

    from alp_trl.loss_metrics import log_policy_update
    from alp_trl.objectives import PolicyLossSettings, policy_loss

    # sequence 0 (advantage +1): ratios e^0.5 (above 1 + eps: high-clipped) and e^-0.1, its third token padding;
    # sequence 1 (advantage -1): e^-0.5 (below 1 - eps: low-clipped), e^0.1 and 1
    log_r = torch.tensor([[0.5, -0.1, 3.0], [-0.5, 0.1, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    entropies = torch.tensor([[1.0, 2.0, 100.0], [0.5, 0.5, 2.0]])
    settings = PolicyLossSettings(importance_sampling_level=level, sequence_ratio_aggregation="mean")
    loss = policy_loss(log_r, torch.zeros_like(log_r), torch.tensor([1.0, -1.0]), mask, settings)
    args = SimpleNamespace(importance_sampling_level=level, loss_type="dapo", sequence_ratio_aggregation="mean")
    args.log_ratio_clamp = 20.0
    metrics = defaultdict(list)
    log_policy_update(OneRank(), metrics, args, log_r, loss, entropies, survival={})
    return {name: values[0] for name, values in metrics.items()}, log_r[mask.bool()]


def test_token_level_update_metrics_by_hand():
    logged, kept = _update_metrics("token")
    assert logged["entropy"] == pytest.approx((1 + 2 + 0.5 + 0.5 + 2) / 5)
    assert logged["clip_ratio/high_mean"] == pytest.approx(1 / 5) and logged["clip_ratio/low_mean"] == pytest.approx(
        1 / 5
    )
    assert logged["alp/clip_frac"] == pytest.approx(2 / 5) and logged["alp/dual_clip_frac"] == 0
    # per sequence: the least low-clipped sequence (0 of 2) and the most high-clipped one (1 of 2)
    assert logged["clip_ratio/low_min"] == 0 and logged["clip_ratio/high_max"] == pytest.approx(1 / 2)
    assert logged["alp/ratio/max"] == pytest.approx(math.exp(0.5)) and logged["alp/log_ratio_abs_max"] == 0.5
    assert logged["alp/train_rollout_kl"] == pytest.approx((kept.exp() - 1 - kept).mean().item())


def test_sequence_level_flags_count_sequences():
    logged, _ = _update_metrics("sequence")
    # sequence ratios: e^0.2 = 1.22 (mean of 0.5, -0.1; advantage +1: high-clipped) and e^(-0.4/3) = 0.875 (not
    # clipped): 1 of 2 sequences, where a token count would give 2 of 5 tokens
    assert logged["alp/clip_frac"] == logged["clip_ratio/high_mean"] == pytest.approx(1 / 2)
    assert logged["clip_ratio/low_mean"] == 0
    assert logged["entropy"] == pytest.approx((1 + 2 + 0.5 + 0.5 + 2) / 5), "entropy stays a token mean"
