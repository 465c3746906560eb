"""The ratio's denominator per generation batch (`alp_trl.rollout_denominator`), on one process: the generation's
log-probs checked, completed (recomputed when missing, NaNs counted), the MIS weight attached, the metrics-only mode
of plain GRPO; all by value."""

import logging
import math
from collections import defaultdict

import pytest
import torch

from alp_trl.rollout_denominator import RolloutDenominator

from .helpers import tiny_config


class SingleProcess:
    """The accelerator of one process: reducing and gathering change nothing."""

    device = torch.device("cpu")

    def reduce(self, tensor, reduction="sum"):
        return tensor

    def gather(self, tensor):
        return tensor


class Recompute:
    """The noise-free forward pass `complete` asks for: returns `logps`, counts its calls."""

    def __init__(self, logps):
        self.logps, self.calls = logps, 0

    def __call__(self):
        self.calls += 1
        return self.logps


MASK = torch.tensor([[1, 1, 1], [1, 1, 0]])


def _complete(config, output, recompute, keep_for_trl_loss=False):
    denominator = RolloutDenominator(config)
    denominator.start_batch()
    metrics = defaultdict(list)
    denominator.complete(output, recompute, SingleProcess(), metrics, keep_for_trl_loss=keep_for_trl_loss)
    return dict(metrics)


def test_check_keeps_aligned_log_probs_and_drops_misaligned_ones(tmp_path):
    denominator = RolloutDenominator(tiny_config(tmp_path))
    denominator.start_batch()
    ids, logprobs = [[5, 6], [7]], [[-0.1, -0.2], [-0.3]]
    assert denominator.check(ids, logprobs, None) is logprobs and denominator.problem is None
    assert denominator.check(ids, [[-0.1], [-0.3]], None) is None
    assert denominator.problem == "completion 0 has 2 tokens but 1 log-probs"
    assert denominator.check(ids, logprobs, None) is None, "one misaligned call spoils the whole batch"
    denominator.start_batch()
    assert denominator.check(ids, logprobs, [[1, 1], [1, 0]]) is None
    assert denominator.problem == "completion 1 has 1 tokens but a tool mask of 2"
    denominator.start_batch()
    denominator.note_problem("the log-prob recorder: another batch")
    denominator.note_problem("a second problem")
    assert denominator.check(ids, logprobs, None) is None
    assert denominator.problem == "the log-prob recorder: another batch", "the first problem is kept"


def test_missing_log_probs_are_recomputed_once_and_counted(tmp_path, caplog):
    recomputed = torch.tensor([[-1.0, -2.0, -3.0], [-4.0, -5.0, -6.0]])
    recompute = Recompute(recomputed)
    output = {"completion_mask": MASK}
    with caplog.at_level(logging.WARNING, logger="alp_trl.rollout_denominator"):
        metrics = _complete(tiny_config(tmp_path), output, recompute)
    assert recompute.calls == 1
    assert output["sampling_per_token_logps"] is recomputed
    assert metrics == {"alp/rollout_logps_recomputed": [1.0], "alp/rollout_logp_nan_frac": [0.0]}
    assert [r.getMessage().split(";")[0] for r in caplog.records] == ["The generation backend returned no log-probs"]


def test_returned_log_probs_are_kept_and_their_nans_counted_where_the_mask_is_on(tmp_path):
    nan = float("nan")
    rollout = torch.tensor([[-1.0, nan, -3.0], [-4.0, -5.0, nan]])  # the second NaN is masked out
    recompute = Recompute(None)
    output = {"completion_mask": MASK, "sampling_per_token_logps": rollout}
    metrics = _complete(tiny_config(tmp_path), output, recompute)
    assert recompute.calls == 0 and output["sampling_per_token_logps"] is rollout
    assert metrics == {"alp/rollout_logps_recomputed": [0.0], "alp/rollout_logp_nan_frac": [pytest.approx(1 / 5)]}
    tool_masked = {"completion_mask": MASK, "tool_mask": torch.tensor([[1, 0, 1], [1, 1, 1]]), **output}
    metrics = _complete(tiny_config(tmp_path), tool_masked, recompute)
    assert metrics["alp/rollout_logp_nan_frac"] == [0.0], "a tool-result token is not the engine's"


def test_token_mis_attaches_the_weight_and_the_rejection(tmp_path):
    # weights pi_old / pi_rollout: [[1, 2, 4], [1/4, 1, masked]]; MIS keeps [1/3, 3]
    old = torch.zeros(2, 3)
    rollout = -torch.tensor([[1.0, 2.0, 4.0], [0.25, 1.0, 1.0]]).log()
    rollout[1, 2] = 5.0  # masked out: no weight, not rejected
    config = tiny_config(tmp_path, off_policy_correction="token_mis", mis_threshold=3.0)
    recompute = Recompute(None)
    output = {"completion_mask": MASK, "sampling_per_token_logps": rollout, "old_per_token_logps": old}
    metrics = _complete(config, output, recompute)
    assert recompute.calls == 0, "TRL's old-policy log-probs are the numerator of the weight"
    torch.testing.assert_close(output["rollout_is_weight"], torch.tensor([[1.0, 2.0, 0.0], [0.0, 1.0, 0.0]]))
    assert output["rollout_keep"].tolist() == [[1.0, 1.0, 0.0], [0.0, 1.0, 1.0]]
    assert output["num_items_in_batch"].item() == 3.0, "rejected tokens leave the loss's token count"
    assert output["old_per_token_logps"] is old
    assert metrics == {
        "alp/rollout_logps_recomputed": [0.0],
        "alp/rollout_logp_nan_frac": [0.0],
        "alp/mis_masked_frac": [pytest.approx(2 / 5)],
    }


def test_token_mis_without_any_log_probs_runs_one_forward_for_both(tmp_path):
    recompute = Recompute(torch.tensor([[-1.0, -2.0, -3.0], [-4.0, -5.0, -6.0]]))
    output = {"completion_mask": MASK}
    metrics = _complete(tiny_config(tmp_path, off_policy_correction="token_mis"), output, recompute)
    assert recompute.calls == 1
    assert torch.equal(output["rollout_is_weight"], MASK.float()), "the recomputed denominator: every weight 1"
    assert output["rollout_keep"].tolist() == [[1.0] * 3] * 2
    assert metrics["alp/rollout_logps_recomputed"] == [1.0] and metrics["alp/mis_masked_frac"] == [0.0]


@pytest.mark.parametrize("keep_for_trl_loss", [False, True])
def test_plain_grpo_logs_the_mismatch_and_keeps_the_log_probs_only_where_trl_had_them(tmp_path, keep_for_trl_loss):
    unperturbed = torch.tensor([[-1.0, -1.0, -1.0], [-2.0, -2.0, -9.0]])
    rollout = torch.tensor([[-1.0, -1.5, -0.5], [-2.0, -2.0, -1.0]])  # diffs 0, 0.5, -0.5, 0, 0 (last masked out)
    recompute = Recompute(unperturbed)
    config = tiny_config(tmp_path, off_policy_correction="none", log_rollout_mismatch=True)
    output = {"completion_mask": MASK, "sampling_per_token_logps": rollout}
    metrics = _complete(config, output, recompute, keep_for_trl_loss=keep_for_trl_loss)
    assert recompute.calls == 1, "the unperturbed policy's log-probs, once"
    assert ("sampling_per_token_logps" in output) is keep_for_trl_loss
    assert "rollout_is_weight" not in output
    k3 = (math.exp(0.5) - 1.5 + math.exp(-0.5) - 0.5) / 5
    prob_max = max(abs(math.exp(-1.0) - math.exp(-1.5)), abs(math.exp(-1.0) - math.exp(-0.5)))
    assert metrics == {
        "alp/rollout_logps_recomputed": [0.0],
        "alp/rollout_logp_nan_frac": [0.0],
        "rollout_mismatch/logp_abs_diff_mean": [pytest.approx(1.0 / 5)],
        "rollout_mismatch/logp_abs_diff_max": [pytest.approx(0.5)],
        "rollout_mismatch/prob_abs_diff_max": [pytest.approx(prob_max)],
        "rollout_mismatch/kl_k3": [pytest.approx(k3)],
    }
