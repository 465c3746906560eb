"""The update's metrics (`alp_trl.loss_metrics`): named scalars reduced across ranks, each by its own rule."""

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
