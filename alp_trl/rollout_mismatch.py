"""Kept for existing imports: the rollout-mismatch simulator now lives in `alp_trl.simulated_engine` (the config field
`rollout_mismatch` and the metrics `rollout_mismatch/*` keep their names)."""

from .simulated_engine import NOISE_KINDS, simulated_sampler  # noqa: F401
