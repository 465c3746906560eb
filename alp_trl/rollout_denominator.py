"""The ratio's denominator: the rollout log-probs of a generation batch, checked, completed, and what they imply.

ALP and Bypass divide by the log-probs of the policy that sampled the rollout; the MIS / TIS baselines weight by
pi_old / pi_rollout. After TRL has generated and scored a batch, `RolloutDenominator.complete`:

- recomputes the rollout log-probs with one noise-free forward pass when the backend returned none or they did not
  line up with the completions (`check` decides that right after generation), warning once with the reason;
- counts NaN rollout log-probs;
- attaches the MIS / TIS weight of the whole generation batch (computed once, as verl does, so that a rejection can
  leave the loss's global token count too);
- logs the engine's distance from the unperturbed policy (`rollout_mismatch/*`).
"""

import logging
from collections.abc import Callable

import torch

from .loss_metrics import log_rollout_correction, reduce_named_scalars
from .objectives import rollout_correction
from .ratio_statistics import mismatch_statistics
from .rollout_logprobs import missing_rollout_logps_warning, rollout_logprobs_misalignment


logger = logging.getLogger(__name__)


class RolloutDenominator:
    """The rollout log-probs of each generation batch, for one trainer (`args`: its `ALPConfig`)."""

    def __init__(self, args):
        self.args = args
        self.problem: str | None = None  # why this batch's rollout log-probs cannot be used, if they cannot
        self._warned_missing = False

    def start_batch(self) -> None:
        self.problem = None

    def note_problem(self, problem: str) -> None:
        """Something on the way (e.g. the log-prob recorder) found the batch's log-probs unusable."""
        self.problem = self.problem or problem

    def check(self, completion_ids, logprobs, tool_mask):
        """The generation's log-probs if they line up with the completions TRL assembled, else `None` (then
        `complete` recomputes them)."""
        problem = self.problem or rollout_logprobs_misalignment(completion_ids, logprobs, tool_mask)
        if problem is not None:
            self.problem = problem
            return None
        return logprobs

    def complete(
        self,
        output: dict,
        unperturbed_logps: Callable[[], torch.Tensor],
        accelerator,
        metrics,
        keep_for_trl_loss: bool,
    ) -> None:
        """Complete a scored generation batch in place (see the module docstring). `unperturbed_logps()` runs the
        noise-free forward pass of the current policy over the batch (called at most once, on every rank when one
        needs it); `keep_for_trl_loss`: with `off_policy_correction="none"`, whether TRL's loss had the rollout
        log-probs anyway (vLLM, the simulated engine); if not, they are removed again after the metrics."""
        args = self.args
        mask = output["completion_mask"]
        if "tool_mask" in output:
            mask = mask * output["tool_mask"]
        missing = "sampling_per_token_logps" not in output
        # A forward pass is a collective under FSDP2 / ZeRO-3: if any rank recomputes, all of them run it.
        any_missing = accelerator.reduce(torch.tensor(float(missing), device=accelerator.device), "sum").item() > 0
        metrics["alp/rollout_logps_recomputed"].append(float(missing))
        unperturbed = output.get("old_per_token_logps")  # TRL's old-policy log-probs, when it computed them
        if any_missing:
            recomputed = unperturbed_logps()
            unperturbed = recomputed if unperturbed is None else unperturbed
            if missing:
                if not self._warned_missing:
                    logger.warning(missing_rollout_logps_warning(self.problem, args))
                    self._warned_missing = True
                output["sampling_per_token_logps"] = recomputed
        rollout = output["sampling_per_token_logps"]
        nan_count = (torch.isnan(rollout) & mask.bool()).sum().float()
        totals = accelerator.reduce(torch.stack([nan_count, mask.sum().float()]), reduction="sum")
        metrics["alp/rollout_logp_nan_frac"].append((totals[0] / totals[1].clamp(min=1.0)).item())

        if args.correction.has_rollout_weight:
            if unperturbed is None:
                unperturbed = unperturbed_logps()
            self.attach_rollout_weight(output, unperturbed, rollout, mask, accelerator, metrics)
        if args.rollout_mismatch != "none" or args.log_rollout_mismatch:
            # The engine's distance from the unperturbed policy (the simulator's, vLLM's, transformers generation's).
            if unperturbed is None:
                unperturbed = unperturbed_logps()
            stats = mismatch_statistics(unperturbed, rollout, mask)
            named = {f"rollout_mismatch/{k}": (v, "max" if k.endswith("_max") else "mean") for k, v in stats.items()}
            for name, value in reduce_named_scalars(accelerator, named).items():
                metrics[name].append(value)
        if args.correction.is_trl_loss and not keep_for_trl_loss:
            # metrics-only (`log_rollout_mismatch`): TRL's loss must not see log-probs it would not have had
            output.pop("sampling_per_token_logps", None)

    def attach_rollout_weight(self, output, old_logps, rollout_logps, mask, accelerator, metrics) -> None:
        """The MIS / TIS weight and rejection of a generation batch (`objectives.rollout_correction`), stored in the
        batch for the loss; rejected tokens leave `num_items_in_batch` (`mis_rejection="drop"`)."""
        spec = self.args.rollout_correction_kwargs()
        corr = rollout_correction(old_logps, rollout_logps, mask, **spec)
        output["old_per_token_logps"] = old_logps
        output["rollout_is_weight"], output["rollout_keep"] = corr.weight, corr.keep
        if self.args.mis_rejection == "drop":
            output["num_items_in_batch"] = accelerator.gather((mask.float() * corr.keep).sum()).sum()
        log_rollout_correction(accelerator, metrics, corr, mask, spec)
