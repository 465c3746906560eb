"""What each `off_policy_correction` is, in one table: every rule that depends on the correction reads it from here.

A correction is described by four facts:

- `ratio_denominator`: what the importance ratio divides by. `"rollout"`: the log-probs of the policy that sampled the
  rollout (ALP, Bypass: one ratio, training over inference); `"old"`: the policy before this update (PPO's ratio, with
  the MIS / TIS baselines' auxiliary weight on top); `"trl"`: TRL's own GRPO loss, untouched (`"none"`).
- `rollout_weight`: the auxiliary weight pi_old / pi_rollout of the MIS / TIS baselines: `"mask"` (MIS: reject outside
  the bounds), `"truncate"` (TIS: truncate at the upper bound), or `None`.
- `weight_level`: whether that weight is per token or per sequence.
- `perturbed`: whether the policy-update forward runs with the layerwise noise (ALP only).

The loss types that are defined with each correction follow from these facts (`allowed_loss_types`).
"""

from dataclasses import dataclass


@dataclass(frozen=True)
class Correction:
    """One off-policy correction: what its ratio divides by, its auxiliary rollout weight, and the noise."""

    name: str
    ratio_denominator: str
    rollout_weight: str | None = None
    weight_level: str | None = None
    perturbed: bool = False

    @property
    def divides_by_rollout(self) -> bool:
        """The ratio's denominator is the rollout policy's log-probs (ALP, Bypass)."""
        return self.ratio_denominator == "rollout"

    @property
    def has_rollout_weight(self) -> bool:
        """An auxiliary MIS / TIS weight pi_old / pi_rollout multiplies the PPO loss."""
        return self.rollout_weight is not None

    @property
    def truncates(self) -> bool:
        """TIS: the rollout weight is truncated at an upper bound (rather than rejected outside bounds, MIS)."""
        return self.rollout_weight == "truncate"

    @property
    def is_trl_loss(self) -> bool:
        """`"none"`: TRL's own GRPO loss computes the objective (this package only logs)."""
        return self.ratio_denominator == "trl"

    @property
    def reads_old_logps(self) -> bool:
        """The loss reads the old policy's log-probs (PPO's ratio), which TRL computes after generation."""
        return self.ratio_denominator == "old"

    def allows_loss_type(self, loss_type: str) -> bool:
        """VESPO's gamma weight of the sequence ratio is its own off-policy correction: a MIS / TIS weight on top
        would count the rollout mismatch twice. Every other pair is defined."""
        return not (loss_type == "vespo" and self.has_rollout_weight)


CORRECTIONS: dict[str, Correction] = {
    c.name: c
    for c in (
        Correction("alp", "rollout", perturbed=True),
        Correction("bypass", "rollout"),
        Correction("token_mis", "old", "mask", "token"),
        Correction("seq_mis", "old", "mask", "sequence"),
        Correction("tis", "old", "truncate", "token"),
        Correction("seq_tis", "old", "truncate", "sequence"),
        Correction("ppo", "old"),
        Correction("none", "trl"),
    )
}
OFF_POLICY_CORRECTIONS = tuple(CORRECTIONS)
# The baselines with an auxiliary rollout weight pi_old / pi_rollout (MIS: reject outside bounds; TIS: truncate).
ROLLOUT_CORRECTIONS = tuple(name for name, c in CORRECTIONS.items() if c.has_rollout_weight)


def correction(name: str) -> Correction:
    """The `Correction` called `name`; an error names the allowed values."""
    if name not in CORRECTIONS:
        raise ValueError(f"`off_policy_correction` got {name!r}; allowed values are {list(CORRECTIONS)}.")
    return CORRECTIONS[name]
