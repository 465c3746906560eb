"""`ALPGRPOTrainer`: TRL's `GRPOTrainer` with Adaptive Layerwise Perturbation and the off-policy baselines.

The trainer is a list of "here we differ from GRPOTrainer, because ..."; what each override needs lives in the module
named for it:

- `__init__`: attaches `LayerwisePerturbation` to the policy (ALP only; `perturbation.py`), builds its own vLLM engine
  where TRL's cannot run (`vllm_engine.py`);
- `_generate` / `_generate_single_turn`: with transformers generation, records the sampling log-probs while `generate`
  runs (`rollout_logprobs.py`), so the rollout denominator costs no extra forward pass (vLLM returns them); sigma
  stays out of the vLLM weight sync;
- `_generate_and_score_completions`: guarantees a rollout denominator, attaches the MIS / TIS weight and logs the
  engine's mismatch (`rollout_denominator.py`); for ALP and Bypass, skips TRL's old-policy forward pass;
- `_get_per_token_logps_and_entropies`: the sampler's truncation replayed on the numerator (`sampling_replay.py`);
- `_compute_loss`: the policy-update forward runs with the noise on, then the one policy loss of `objectives.py`
  (`policy_loss`, `corrections.py` says what each correction divides by) and its metrics (`loss_metrics.py`);
- `training_step` / `_prepare_inputs`: the update step keeps cuDNN SDPA out where its backward returns NaN
  (`attention_backend.py`); generation keeps PyTorch's choice;
- `_get_grad_norm`: the non-finite guard (`nonfinite_guard.py`): a step with a NaN/inf loss or gradient norm on any
  rank never reaches the optimizer, the LR scheduler or sigma;
- `create_optimizer`: sigma gets its own parameter group (`perturb_lr`, no weight decay);
- `save_model` / `_save` / `_load_from_checkpoint` / `create_model_card`: sigma goes to a side file (DeepSpeed's
  float32 master copy under DeepSpeed; `LayerwisePerturbation.save` / `load`), never into the model weights; FSDP
  checkpoints keep it and load it natively; the reference-model sync, sigma's dtype under ZeRO-3 and the model card's
  section are in `sigma_persistence.py`.
"""

import logging
import os
from contextlib import contextmanager, nullcontext

import torch
from trl import GRPOTrainer

from .attention_backend import (
    enabled_sdpa_backends,
    sdpa_backends_restored,
    sdpa_backends_without_cudnn,
    update_excludes_cudnn_sdpa,
)
from .config import ALPConfig
from .loss_metrics import log_policy_update, log_rollout_ratio, log_sigma, reduce_named_scalars
from .nonfinite_guard import NonFiniteStepGuard, guard_optimizer_step
from .objectives import (
    PolicyLossSettings,
    aggregate_policy_loss,
    entropy_bonus_term,
    policy_loss,
)
from .perturbation import MODULE_NAME, LayerwisePerturbation, deepspeed_fp32_master
from .rollout_denominator import RolloutDenominator
from .rollout_logprobs import (
    RecordingMismatch,
    capture_generation_logprobs,
)
from .sampling_replay import SamplingTruncation, replayed_forward, truncated_sampling_warning
from .sigma_persistence import SyncRefModelWithoutSigma, match_sigma_dtype_for_deepspeed, model_card_section
from .simulated_engine import simulated_sampler
from .tool_rollout import tool_rollout_func
from .vllm_engine import (
    EngineFailure,
    build_vllm_generation,
    engine_failure_message,
    is_engine_failure,
    uses_own_engine,
    vllm_built_after_init,
)


logger = logging.getLogger(__name__)

# The multimodal / model-specific inputs TRL passes to the policy's forward when the batch has them.
_FORWARD_KWARG_KEYS = (
    "pixel_values",
    "image_grid_thw",
    "num_images",
    "pixel_attention_mask",
    "spatial_shapes",
    "num_tiles",
    "image_sizes",
    "token_type_ids",
    "mm_token_type_ids",
    "image_position_ids",
)

__all__ = ["ALPGRPOTrainer", "reduce_named_scalars"]


class ALPGRPOTrainer(GRPOTrainer):
    """
    [`~trl.GRPOTrainer`] with Adaptive Layerwise Perturbation (ALP) and the off-policy baselines of the ALP paper.

    With `off_policy_correction="alp"` (the default of [`ALPConfig`]), the policy-update forward pass adds learnable
    Gaussian noise `sigma_l * eps` to the input hidden state of the selected decoder layers, and the loss uses one
    importance ratio: the perturbed training policy over the unperturbed policy that sampled the rollout (vLLM's
    log-probs with `use_vllm=True`, otherwise those of the transformers generation, captured while it runs). The ratio
    is token- or sequence-level (`importance_sampling_level`), clamped, PPO-clipped (`epsilon`, `epsilon_high`) and
    dual-clipped on negative advantages (`dual_clip_c`), and aggregated as `loss_type` says. The baselines `"bypass"`,
    `"token_mis"`, `"seq_mis"`, `"tis"`, `"seq_tis"`, `"ppo"` and `"none"` (plain GRPO) are one config switch away.

    Args:
        model, reward_funcs, train_dataset, eval_dataset, processing_class, ...:
            As for [`~trl.GRPOTrainer`].
        args ([`ALPConfig`], *optional*):
            Configuration; `None` builds a default `ALPConfig`.
        recipe_text (`str`, *optional*):
            The training recipe (YAML text), written into the model card; the entry point passes it.

    Example:

    ```python
    from alp_trl import ALPConfig, ALPGRPOTrainer

    trainer = ALPGRPOTrainer(
        model="Qwen/Qwen2.5-0.5B-Instruct",
        reward_funcs=my_reward,
        args=ALPConfig(output_dir="out", importance_sampling_level="sequence", perturb_sigma_init=0.02),
        train_dataset=dataset,
    )
    trainer.train()
    ```
    """

    _tag_names = ["trl", "grpo", "alp"]
    _name = "ALP-GRPO"

    def __init__(
        self, model, reward_funcs=None, args: ALPConfig | None = None, recipe_text: str | None = None, **kwargs
    ):
        if args is None:
            model_name = model if isinstance(model, str) else model.config._name_or_path
            args = ALPConfig(output_dir=f"{str(model_name).split('/')[-1]}-ALP")
        elif not isinstance(args, ALPConfig):
            raise TypeError(
                f"ALPGRPOTrainer needs an ALPConfig, got {type(args).__name__}. Build one with the same fields: "
                "ALPConfig(**your_grpo_config.to_dict()) or use trl.GRPOTrainer for plain GRPO."
            )
        if args.code_tool == "python":
            # SimpleTIR-style multi-turn rollouts through TRL's `rollout_func` hook (alp_trl.tool_rollout)
            kwargs["rollout_func"] = tool_rollout_func(kwargs)
        # With engine options (`vllm_dtype`, `vllm_enforce_eager`) or on a CPU, the vLLM backend is built here,
        # after GRPOTrainer.__init__, rather than by it (alp_trl.vllm_engine); otherwise it is TRL's as TRL builds it.
        own_engine = uses_own_engine(args)
        with vllm_built_after_init(args, own_engine):
            super().__init__(model=model, reward_funcs=reward_funcs, args=args, **kwargs)
        if own_engine:
            self.use_vllm = True
            self.vllm_generation = build_vllm_generation(self)
            self._last_loaded_step = -1
        self._rollout_denominator = RolloutDenominator(args)  # the ratio's denominator per generation batch
        self.recipe_text = recipe_text  # the training recipe, recorded in the model card
        self._log_sigma_to_save: torch.Tensor | None = None  # DeepSpeed's float32 sigma while `save_model` runs
        self._last_sigma_per_layer: dict[int, float] | None = None  # the last logged sigma, for the model card
        self.perturbation: LayerwisePerturbation | None = None
        if args.uses_perturbation:
            self.perturbation = LayerwisePerturbation.for_training(self.model, args, self.accelerator.process_index)
            if self.is_deepspeed_enabled:
                match_sigma_dtype_for_deepspeed(self.model, self.perturbation)
            # `sync_ref_model=True`: the reference model stays a noise-free copy of the weights
            SyncRefModelWithoutSigma.replace_in(self.callback_handler.callbacks, self.perturbation)
        self._replay = None  # the sampler's truncation the numerator replays (alp_trl.sampling_replay)
        truncation = SamplingTruncation.of(self.top_k, self.top_p, self.min_p)
        if args.uses_rollout_logps and args.sampling_mask_replay and truncation.active:
            self._replay = truncation
        self._warned_unreplayed_forward = False
        truncation_warning = truncated_sampling_warning(args, self._replay is not None)
        if args.uses_rollout_logps and truncation_warning:
            logger.warning(truncation_warning)
        self._loss_settings = PolicyLossSettings.from_config(args)
        self._nonfinite = NonFiniteStepGuard(args.max_consecutive_nonfinite_steps)
        self._micro_step_tokens = None
        self._sdpa_backends_outside_update = None
        # whether the policy-update step keeps cuDNN SDPA out (`cudnn_sdpa_backward`), decided once
        self._exclude_cudnn_sdpa, reason = update_excludes_cudnn_sdpa(
            args.cudnn_sdpa_backward, self.accelerator.unwrap_model(self.model), self.accelerator.device
        )
        if self.accelerator.is_main_process:
            warn = self._exclude_cudnn_sdpa and args.cudnn_sdpa_backward == "auto"
            (logger.warning if warn else logger.info)(reason)

    # ------------------------------------------------------------------------------------------------ generation
    @property
    def _records_rollout_logps(self) -> bool:
        return self.args.uses_rollout_logps or self.args.rollout_mismatch != "none"

    def _generate(self, prompts):
        """TRL's generation (single turn, tool / environment loops, `rollout_func`), then a check that the rollout
        log-probs line up with the completions TRL assembled; if they do not, they are dropped, and
        `_generate_and_score_completions` recomputes them with one noise-free forward pass (with a warning)."""
        self._rollout_denominator.start_batch()
        # TRL pushes `model.named_parameters()` to vLLM before generating: sigma must never be part of that sync
        # (vLLM has no such weight), so the perturbation submodule is out of the model while it runs.
        unregistered = self.perturbation.unregistered() if self.use_vllm and self.perturbation is not None else None
        try:
            with unregistered or nullcontext():
                result = super()._generate(prompts)
        except Exception as error:
            if self.use_vllm and is_engine_failure(error):
                raise EngineFailure(engine_failure_message(error, self.args)) from error
            raise
        if not self._records_rollout_logps:
            return result
        prompt_ids, completion_ids, tool_mask, completions, logprobs, extra_fields, images, tool_images = result
        logprobs = self._rollout_denominator.check(completion_ids, logprobs, tool_mask)
        return prompt_ids, completion_ids, tool_mask, completions, logprobs, extra_fields, images, tool_images

    @contextmanager
    def _skipping_unused_old_logps(self):
        """Keep TRL from computing old-policy log-probs that ALP and Bypass never read.

        Their ratio's denominator is the rollout's log-probs, but TRL runs one more no-grad forward pass over the whole
        generation batch for `old_per_token_logps` whenever generation and optimizer steps are misaligned
        (`steps_per_generation * num_iterations` does not divide `gradient_accumulation_steps`): in the paper's recipes
        (16 updates per generation batch) about a quarter of the update's compute. TRL decides this from
        `args.gradient_accumulation_steps` alone (its only use there), so generation sees a shallow copy of the args
        in which the steps are aligned (made field by field: `copy.copy` would go through `ALPConfig.__getstate__`,
        which drops the Hub token).
        """
        args = self.args
        generate_every = args.steps_per_generation * self.num_iterations
        if not args.correction.divides_by_rollout or args.gradient_accumulation_steps % generate_every == 0:
            yield
            return
        aligned = object.__new__(type(args))
        aligned.__dict__.update(args.__dict__)
        aligned.gradient_accumulation_steps = generate_every
        self.args = aligned
        try:
            yield
        finally:
            self.args = args

    def _generate_single_turn(self, prompt_ids, images, multimodal_fields, num_generations, has_tool_images=False):
        if self.use_vllm or self.use_transformers_continuous_batching or not self._records_rollout_logps:
            return super()._generate_single_turn(
                prompt_ids, images, multimodal_fields, num_generations, has_tool_images=has_tool_images
            )
        # Plain transformers generation: record the log-probs of the sampled tokens while `generate` runs, from the
        # policy itself or from the simulated inference engine (`rollout_mismatch`).
        policy = self.accelerator.unwrap_model(self.model)
        causal_lm = policy.get_base_model() if hasattr(policy, "get_base_model") else policy
        args = self.args
        with (
            simulated_sampler(policy, args.rollout_mismatch, args.rollout_mismatch_std, args.seed, self._step),
            capture_generation_logprobs(causal_lm, temperature=self.temperature, truncation=self._replay) as recorder,
        ):
            completion_ids, _ = super()._generate_single_turn(
                prompt_ids, images, multimodal_fields, num_generations, has_tool_images=has_tool_images
            )
        try:
            return completion_ids, recorder.logprobs_for(completion_ids)
        except RecordingMismatch as mismatch:
            # e.g. a custom `generate` that does not run the hooked forward pass. Placeholders of the right lengths
            # keep TRL's tool-loop stitching intact; `_generate` then drops the whole batch's log-probs.
            self._rollout_denominator.note_problem(f"the log-prob recorder: {mismatch}")
            return completion_ids, [[float("nan")] * len(ids) for ids in completion_ids]

    def _generate_and_score_completions(self, inputs):
        with self._skipping_unused_old_logps():
            output = super()._generate_and_score_completions(inputs)
        if not self._records_rollout_logps:
            return output
        self._rollout_denominator.complete(
            output,
            lambda: self._unperturbed_policy_logps(output),
            self.accelerator,
            self._metrics["train" if self.model.training else "eval"],
            keep_for_trl_loss=self.args.rollout_mismatch != "none" or self.use_vllm,
        )
        return output

    def _get_per_token_logps_and_entropies(
        self, model, input_ids, attention_mask, logits_to_keep, batch_size=None, compute_entropy=False, **kwargs
    ):
        """TRL's log-probs, except with sampling-mask replay (`sampling_mask_replay` and a truncated sampler): the
        policy's log-probs over the tokens its own sampler would keep (`alp_trl.sampling_replay`), from the logits,
        which TRL's fused LM head never materialises; chunked by `batch_size` as TRL chunks. The reference model,
        MoE auxiliary losses and multimodal inputs keep TRL's path."""
        extra = {k: v for k, v in kwargs.items() if v is not None and v is not False}
        if self._replay is None or model is self.ref_model or extra:
            if self._replay is not None and extra and not self._warned_unreplayed_forward:
                logger.warning("sampling_mask_replay is not applied to forwards with %s.", sorted(extra))
                self._warned_unreplayed_forward = True
            return super()._get_per_token_logps_and_entropies(
                model, input_ids, attention_mask, logits_to_keep, batch_size, compute_entropy, **kwargs
            )
        logps, entropies = replayed_forward(
            model,
            input_ids,
            attention_mask,
            logits_to_keep,
            batch_size or input_ids.size(0),
            self.temperature,
            self._replay,
            compute_entropy,
            self.accelerator.autocast,
        )
        return logps, entropies, None

    @torch.no_grad()
    def _unperturbed_policy_logps(self, output) -> torch.Tensor:
        """Log-probs of the completions under the current, unperturbed policy (one no-grad forward pass)."""
        input_ids = torch.cat([output["prompt_ids"], output["completion_ids"]], dim=1)
        attention_mask = torch.cat([output["prompt_mask"], output["completion_mask"]], dim=1)
        logps, _, _ = self._get_per_token_logps_and_entropies(
            self.model,
            input_ids,
            attention_mask,
            output["completion_ids"].size(1),
            batch_size=self.args.per_device_train_batch_size,
            **{k: output[k] for k in _FORWARD_KWARG_KEYS if k in output},
        )
        return logps

    # ------------------------------------------------------------------------------------------------------ loss
    def training_step(self, model, inputs, num_items_in_batch):
        # The whole step (forward, backward, gradient-checkpoint recomputation) without cuDNN SDPA where its backward
        # returns NaN; `_prepare_inputs` (generation, no-grad log-probs) runs with the backends as they were.
        self._sdpa_backends_outside_update = enabled_sdpa_backends() if self._exclude_cudnn_sdpa else None
        self._micro_step_tokens = None
        try:
            with sdpa_backends_without_cudnn(self._exclude_cudnn_sdpa):
                loss = super().training_step(model, inputs, num_items_in_batch)
        finally:
            self._sdpa_backends_outside_update = None
            if self.perturbation is not None:
                self.perturbation.disarm()
        self._nonfinite.record(loss, self._micro_step_tokens)
        return loss

    def _prepare_inputs(self, generation_batch):
        with sdpa_backends_restored(self._sdpa_backends_outside_update):
            return super()._prepare_inputs(generation_batch)

    # ------------------------------------------------------------------------------------------ non-finite guard
    def _get_grad_norm(self, model, grad_norm=None):
        """Trainer's gradient norm of the step, then the non-finite guard, right before `optimizer.step()`: the step
        is skipped on every rank if its gradient norm or a micro-step loss is NaN/inf on any rank."""
        grad_norm = super()._get_grad_norm(model, grad_norm=grad_norm)
        guard_optimizer_step(self._nonfinite, self.accelerator, self.optimizer, grad_norm, self.state.global_step + 1)
        return grad_norm

    def _perturbed(self, mode: str):
        """The noise context of the policy-update forward pass (train mode only).

        The noise is keyed by (optimizer step, micro-step within its accumulation window): both survive a resume from
        a checkpoint (TRL's micro-step counter restarts at 0 there), so a resumed run draws the same noise.
        """
        if self.perturbation is None or mode != "train":
            return nullcontext()
        return self.perturbation.active(self.state.global_step, self._step % self.args.gradient_accumulation_steps)

    def _compute_loss(self, model, inputs):
        args = self.args
        mode = "train" if self.model.training else "eval"
        if mode == "train":  # for the non-finite guard's description of a skipped step
            self._micro_step_tokens = inputs["completion_mask"].sum()
        if args.correction.is_trl_loss:
            return super()._compute_loss(model, inputs)

        prompt_ids, prompt_mask = inputs["prompt_ids"], inputs["prompt_mask"]
        completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
        input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
        attention_mask = torch.cat([prompt_mask, completion_mask], dim=1)
        mask = completion_mask if "tool_mask" not in inputs else completion_mask * inputs["tool_mask"]
        with self._perturbed(mode):
            per_token_logps, entropies, aux_loss = self._get_per_token_logps_and_entropies(
                model,
                input_ids,
                attention_mask,
                completion_ids.size(1),
                compute_entropy=True,
                compute_aux_loss=self.aux_loss_enabled,
                **{k: inputs.get(k) for k in _FORWARD_KWARG_KEYS},
            )
        # The MIS / TIS weight is the generation batch's, when `_generate_and_score_completions` computed it (a batch
        # built by hand gets the same weight from this micro-batch alone, inside `policy_loss`).
        select = None
        if self.top_entropy_quantile < 1.0:
            select = lambda kept: self.get_high_entropy_mask(entropies, kept, 1 - self.top_entropy_quantile)  # noqa: E731
        loss = policy_loss(
            per_token_logps,
            inputs["sampling_per_token_logps"],
            inputs["advantages"],
            mask,
            self._loss_settings,
            old_logps=inputs.get("old_per_token_logps"),
            rollout_weight=inputs.get("rollout_is_weight"),
            rollout_keep=inputs.get("rollout_keep"),
            select_tokens=select,
            ref_logps=inputs.get("ref_per_token_logps") if self.beta != 0.0 else None,
            beta=self.beta,
            use_bias_correction_kl=args.use_bias_correction_kl,
        )
        accumulation = self.current_gradient_accumulation_steps if mode == "train" else 1.0
        num_items = None
        if self._loss_settings.aggregation == "dapo":
            # `num_items_in_batch` spans the generation batch: rescale it to one accumulation window, as TRL does.
            num_items = inputs["num_items_in_batch"].clamp(min=1.0) / self.accelerator.num_processes
            if mode == "train":
                num_items = num_items * self.current_gradient_accumulation_steps / args.steps_per_generation
        total, policy_value = aggregate_policy_loss(loss, self._loss_settings, accumulation, num_items)
        if self._entropy_bonus_enabled:
            bonus = self._entropy_bonus(entropies, loss.mask, loss.token_mask, mode, accumulation, policy_value)
            total = total - bonus
        if self.aux_loss_enabled:
            total = total + self.router_aux_loss_coef * aux_loss / accumulation
            self._metrics[mode]["aux_loss"].append(self.accelerator.gather_for_metrics(aux_loss).mean().item())

        survival = self.perturbation.survival_per_layer() if self.perturbation is not None and mode == "train" else {}
        metrics = self._metrics[mode]
        log_policy_update(self.accelerator, metrics, args, per_token_logps, loss, entropies, survival)
        unperturbed_logged = args.log_unperturbed_ratio and self.perturbation is not None and mode == "train"
        if args.rejection_drops_tokens or unperturbed_logged:  # the policy's own ratio over every scored token
            engine_logps = inputs["sampling_per_token_logps"]  # as the engine gave them: its NaN tokens left out
            scored, rollout = mask * ~torch.isnan(engine_logps), engine_logps.nan_to_num(0.0)
        if args.rejection_drops_tokens:  # the statistics above saw only the kept tokens
            log_rollout_ratio(self.accelerator, metrics, "alp/all_tokens_", per_token_logps, rollout, scored)
        if unperturbed_logged:
            with torch.no_grad():  # the same forward without the noise (a collective under ZeRO-3: every rank runs it)
                unperturbed, _, _ = self._get_per_token_logps_and_entropies(
                    model,
                    input_ids,
                    attention_mask,
                    completion_ids.size(1),
                    **{k: inputs.get(k) for k in _FORWARD_KWARG_KEYS},
                )
            log_rollout_ratio(self.accelerator, metrics, "alp/unperturbed_", unperturbed, rollout, scored)
        if self.perturbation is not None:
            self._last_sigma_per_layer = self.perturbation.sigma_per_layer()  # every rank: under ZeRO-3 a gather
            log_sigma(metrics, self._last_sigma_per_layer)
        return total

    def _entropy_bonus(self, entropies, mask, entropy_mask, mode, accumulation, policy_loss) -> torch.Tensor:
        """TRL's entropy bonus (`entropy_coef`, `use_adaptive_entropy`), which does not depend on the ratio: the
        coefficient times the mean entropy of the tokens the policy loss acts on, with TRL's adaptive controller (the
        coefficient of the previous optimizer step applies; the window-global entropy updates it at the step's end).
        Under ALP the entropies are the perturbed policy's (the update forward's). Uses TRL's controller state
        (`entropy_coef`, `_last_world_entropy`, `_entropy_window_stats`); tests compare with `GRPOTrainer`."""
        args = self.args
        effective_mask = mask if entropy_mask is None else mask * entropy_mask
        bonus = entropy_bonus_term(entropies, effective_mask) / accumulation
        if self.use_adaptive_entropy:
            coef = self.entropy_coef if self._last_world_entropy <= args.entropy_target else 0.0
        else:
            coef = self.entropy_coef
        self._metrics[mode]["policy_loss"].append(self.accelerator.gather(policy_loss).nanmean().item())
        if self.use_adaptive_entropy and mode == "train":
            stats = torch.stack([(entropies * effective_mask).sum(), effective_mask.sum()]).detach()
            window = self._entropy_window_stats
            self._entropy_window_stats = stats if window is None else window + stats
            if self.accelerator.sync_gradients:
                totals = self.accelerator.reduce(self._entropy_window_stats, reduction="sum")
                world_entropy = (totals[0] / totals[1].clamp(min=1.0)).item()
                if world_entropy <= args.entropy_target:
                    self.entropy_coef = min(self.entropy_coef + args.entropy_coef_delta, args.entropy_coef_max)
                else:
                    self.entropy_coef = max(self.entropy_coef - args.entropy_coef_delta, args.entropy_coef_min)
                self._last_world_entropy = world_entropy
                self._entropy_window_stats = None
        if mode == "train" and self.accelerator.sync_gradients:
            self._metrics[mode]["entropy_coef"].append(self.entropy_coef)
        return coef * bonus

    # --------------------------------------------------------------------------------------------------- metrics
    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if self.model.training and not any(key.startswith("eval_") for key in logs):
            logs["train/nonfinite_steps"] = float(self._nonfinite.total_skipped)
        super().log(logs, start_time)

    # ----------------------------------------------------------------------------------------------- optimizer
    def create_optimizer(self, model=None):
        """Build TRL's optimizer for the model weights, then give sigma its own group (`perturb_lr`, no decay)."""
        sigma = self.perturbation.log_sigma if self.perturbation is not None else None
        if sigma is None or not sigma.requires_grad:
            return super().create_optimizer(model)
        if self.optimizer is None:
            sigma.requires_grad_(False)  # keep sigma out of the weight groups built by Trainer
            try:
                super().create_optimizer(model)
            finally:
                sigma.requires_grad_(True)
        if not any(p is sigma for group in self.optimizer.param_groups for p in group["params"]):
            self.optimizer.add_param_group({"params": [sigma], "lr": self.args.perturb_lr, "weight_decay": 0.0})
        return self.optimizer

    # ----------------------------------------------------------------------------------------------- persistence
    def save_model(self, output_dir: str | None = None, _internal_call: bool = False):
        # Every rank runs this. Under DeepSpeed the module holds sigma in the model's dtype: read the float32 master
        # copy (a collective) here, so that the side file keeps it rather than the bf16 copy of the state dict.
        self._log_sigma_to_save = None
        if self.perturbation is not None and self.is_deepspeed_enabled:
            self._log_sigma_to_save = deepspeed_fp32_master(self.perturbation.log_sigma)
        try:
            return super().save_model(output_dir, _internal_call)
        finally:
            self._log_sigma_to_save = None

    def _save(self, output_dir: str | None = None, state_dict=None):
        if self.perturbation is None:
            return super()._save(output_dir, state_dict)
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        log_sigma = self._log_sigma_to_save
        if state_dict is not None:  # gathered by DeepSpeed / FSDP on every rank: take sigma from it
            if log_sigma is None:
                log_sigma = next((v for k, v in state_dict.items() if k.endswith(f"{MODULE_NAME}.log_sigma")), None)
            state_dict = {k: v for k, v in state_dict.items() if MODULE_NAME not in k.split(".")}
        # Save the model without the perturbation submodule, then sigma into its side file.
        with self.perturbation.unregistered():
            super()._save(output_dir, state_dict)
        if self.args.should_save:
            self.perturbation.save(output_dir, log_sigma)

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        if self.perturbation is None or self.is_fsdp_enabled:
            # FSDP checkpoints (accelerate's `pytorch_model_fsdp.bin` / sharded folder) hold the whole wrapped model,
            # sigma included, and are loaded with the same key set they were saved with: sigma comes back natively.
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        with self.perturbation.unregistered():
            super()._load_from_checkpoint(resume_from_checkpoint, model)
        if not self.perturbation.load(resume_from_checkpoint):
            logger.warning(
                "No %s in %s: sigma starts from perturb_sigma_init.", "ALP side file", resume_from_checkpoint
            )

    def create_model_card(self, *args, **kwargs):
        super().create_model_card(*args, **kwargs)
        if not self.is_world_process_zero():
            return
        path = os.path.join(self.args.output_dir, "README.md")
        if not os.path.exists(path):
            return
        sigma = None
        if self.perturbation is not None:
            # the last logged values: reading the parameter here (rank 0 only) could need a collective gather
            sigma = self._last_sigma_per_layer or self.perturbation.sigma_per_layer()
        with open(path, "a") as f:
            f.write(model_card_section(self.args, sigma, self.recipe_text))
