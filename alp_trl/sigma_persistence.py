"""sigma outside the model weights: the reference-model sync without it, its dtype under DeepSpeed, its model card.

sigma (the perturbation's learnable log-std, `alp_trl.perturbation`) lives in a submodule of the policy during
training, but it is not a weight of the model: it is saved to a side file (`alp_perturbation.safetensors`), kept out
of the reference model and of the vLLM weight sync, and described in the model card.
"""

import logging

from trl.trainer.callbacks import SyncRefModelCallback

from .perturbation import LayerwisePerturbation


logger = logging.getLogger(__name__)


class SyncRefModelWithoutSigma(SyncRefModelCallback):
    """TRL's reference-model sync (`sync_ref_model=True`), with sigma out of the policy while it runs: TRL zips the
    policy's and the reference model's parameters strictly, and the policy carries one more (sigma)."""

    def __init__(self, ref_model, accelerator, perturbation: LayerwisePerturbation):
        super().__init__(ref_model=ref_model, accelerator=accelerator)
        self.perturbation = perturbation

    def on_step_end(self, args, state, control, **kwargs):
        with self.perturbation.unregistered():
            return super().on_step_end(args, state, control, **kwargs)

    @classmethod
    def replace_in(cls, callbacks: list, perturbation: LayerwisePerturbation) -> None:
        """Replace TRL's `SyncRefModelCallback` in a trainer's callback list, in place."""
        for index, callback in enumerate(callbacks):
            if type(callback) is SyncRefModelCallback:
                callbacks[index] = cls(callback.ref_model, callback.accelerator, perturbation)


def match_sigma_dtype_for_deepspeed(model, perturbation: LayerwisePerturbation) -> None:
    """ZeRO-3 flattens all trainable parameters into one buffer of one dtype: give sigma the model's dtype.

    (Outside DeepSpeed sigma stays float32, so that small updates of log-sigma are not lost to bf16 rounding; under
    DeepSpeed the optimizer keeps float32 master weights anyway.)
    """
    log_sigma = perturbation.log_sigma
    dtypes = {p.dtype for p in model.parameters() if p.is_floating_point() and p is not log_sigma}
    if len(dtypes) == 1 and log_sigma.dtype not in dtypes:
        log_sigma.data = log_sigma.data.to(dtypes.pop())
        logger.info("DeepSpeed: sigma parameters cast to the model's dtype %s.", log_sigma.dtype)


def model_card_section(args, sigma_per_layer: dict[int, float] | None, recipe: str | None) -> str:
    """The model card's "ALP settings" (and "Recipe") section: the correction, the ratio, the clip, and, with a
    perturbation, sigma per layer (`sigma_per_layer`; `None` without one)."""
    epsilon_high = args.epsilon_high if args.epsilon_high is not None else args.epsilon  # as the loss reads it
    lines = [
        "",
        "## ALP settings",
        "",
        f"- off_policy_correction: `{args.off_policy_correction}`",
        f"- importance_sampling_level: `{args.importance_sampling_level}` "
        f"(sequence aggregation `{args.sequence_ratio_aggregation}`)",
        f"- clip: epsilon `{args.epsilon}`, epsilon_high `{epsilon_high}`, dual_clip_c `{args.dual_clip_c}`",
    ]
    if sigma_per_layer is not None:
        sigma = ", ".join(f"{k}: {v:.4g}" for k, v in sigma_per_layer.items())
        lines += [
            f"- perturb_layers: `{args.perturb_layers}`, sigma shape `{args.perturb_sigma_shape}`, "
            f"noise scale `{args.perturb_noise_scale}`",
            f"- sigma per layer: {sigma}",
            "- sigma is stored in `alp_perturbation.safetensors` beside the weights and is not part of them.",
        ]
    if recipe:
        lines += ["", "## Recipe", "", "```yaml", recipe.rstrip(), "```"]
    return "\n".join(lines) + "\n"
