"""`ALPGRPOTrainer`: TRL's `GRPOTrainer` with Adaptive Layerwise Perturbation and the off-policy baselines.

The trainer is a list of "here we differ from GRPOTrainer, because ...":

- `__init__`: attaches `LayerwisePerturbation` to the policy (ALP only);
- `_generate_single_turn`: with transformers generation, records the sampling log-probs while `generate` runs, so the
  rollout denominator costs no extra forward pass (vLLM already returns them);
- `_generate_and_score_completions`: guarantees a rollout denominator and counts NaN rollout log-probs; for ALP and
  Bypass, skips TRL's old-policy forward pass (they never read it);
- `_compute_loss`: the policy-update forward runs with the noise on, then the math of `objectives.py`;
- `training_step` / `_prepare_inputs`: the update step keeps cuDNN SDPA out where its backward returns NaN
  (`attention_backend.py`); generation keeps PyTorch's choice;
- `_get_grad_norm`: the non-finite guard (`nonfinite_guard.py`): a step with a NaN/inf loss or gradient norm on any
  rank never reaches the optimizer, the LR scheduler or sigma;
- `create_optimizer`: sigma gets its own parameter group (`perturb_lr`, no weight decay);
- `save_model` / `_save` / `_load_from_checkpoint`: sigma goes to a side file (DeepSpeed's float32 master copy under
  DeepSpeed), never into the model weights; FSDP checkpoints keep it and load it natively.
"""

import logging
import os
from contextlib import contextmanager, nullcontext

import torch
from trl import GRPOTrainer
from trl.trainer.callbacks import SyncRefModelCallback

from .attention_backend import (
    enabled_sdpa_backends,
    resolve_cudnn_sdpa,
    sdpa_backends_restored,
    sdpa_backends_without_cudnn,
)
from .config import ROLLOUT_CORRECTIONS, ALPConfig
from .nonfinite_guard import NonFiniteStepGuard, is_finite_number
from .objectives import (
    aggregate_loss,
    cispo_surrogate,
    clipped_surrogate,
    entropy_bonus_term,
    importance_log_ratio,
    kl_correction_weight,
    low_variance_kl,
    off_policy_sequence_mask,
    rollout_correction,
    sapo_surrogate,
    vespo_gamma_weight,
    vespo_surrogate,
)
from .perturbation import MODULE_NAME, LayerwisePerturbation, deepspeed_fp32_master
from .ratio_statistics import importance_weight_sums, mismatch_statistics, ratio_statistics, weight_diagnostics
from .rollout_logprobs import RecordingMismatch, capture_generation_logprobs, rollout_logprobs_misalignment
from .rollout_mismatch import simulated_sampler
from .sampling_replay import SamplingTruncation, replayed_logprobs
from .tool_rollout import trainer_tir_rollout
from .vllm_engine import (
    EngineFailure,
    build_vllm_generation,
    engine_failure_message,
    is_engine_failure,
    uses_own_engine,
)


logger = logging.getLogger(__name__)

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


# How each loss type reduces its per-token loss (the ones not listed reduce by their own name): as TRL does.
_LOSS_AGGREGATION = {"cispo": "dapo", "vespo": "dapo", "sapo": "grpo"}


def reduce_named_scalars(accelerator, named: dict[str, tuple[torch.Tensor, str]]) -> dict[str, float]:
    """Reduce named 0-d tensors across ranks, each by its own rule (`"mean"`, `"max"`, `"min"`, `"sum"`), with one
    gather for all of them; returns plain floats by name."""
    names = list(named)
    device = named[names[0]][0].device
    row = torch.stack([named[n][0].detach().float().to(device) for n in names]).unsqueeze(0)
    gathered = accelerator.gather(row).view(-1, len(names))
    rules = {"mean": torch.mean, "max": torch.amax, "min": torch.amin, "sum": torch.sum}
    return {n: rules[named[n][1]](gathered[:, i]).item() for i, n in enumerate(names)}


def _per_sequence_mean(flags: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Fraction of each completion's tokens that a `(B, T)` flag marks, `(B,)`."""
    return (flags.detach().float() * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)


def _sequence_flag(flags: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """`(B, 1)`: whether a `(B, T)` flag marks any completion token of each sequence."""
    return (flags.bool() & mask.bool()).any(-1, keepdim=True)


@contextmanager
def _vllm_built_after_init(args: ALPConfig, active: bool):
    """`GRPOTrainer.__init__` with `use_vllm` off, so that it builds no engine (the trainer builds its own after it);
    the config is restored as it was, whatever happens."""
    use_vllm = args.use_vllm
    args.use_vllm = use_vllm and not active
    try:
        yield
    finally:
        args.use_vllm = use_vllm


class _SyncRefModelWithoutSigma(SyncRefModelCallback):
    """TRL's reference-model sync (`sync_ref_model=True`), with sigma out of the policy while it runs."""

    def __init__(self, ref_model, accelerator, trainer: "ALPGRPOTrainer"):
        super().__init__(ref_model=ref_model, accelerator=accelerator)
        self.trainer = trainer

    def on_step_end(self, args, state, control, **kwargs):
        with self.trainer.perturbation.unregistered():
            return super().on_step_end(args, state, control, **kwargs)


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
            for name in ("rollout_func", "tools", "environment_factory"):
                if kwargs.get(name):
                    raise ValueError(
                        f"`code_tool='python'` runs its own multi-turn loop and cannot be combined with `{name}`: use "
                        "one or the other (TRL's tools / environments, or code_tool)."
                    )
            kwargs["rollout_func"] = trainer_tir_rollout
        # With engine options (`vllm_dtype`, `vllm_enforce_eager`) or on a CPU, the vLLM backend is built here,
        # after GRPOTrainer.__init__, rather than by it (alp_trl.vllm_engine); otherwise it is TRL's as TRL builds it.
        own_engine = uses_own_engine(args)
        with _vllm_built_after_init(args, own_engine):
            super().__init__(model=model, reward_funcs=reward_funcs, args=args, **kwargs)
        if own_engine:
            self.use_vllm = True
            self.vllm_generation = build_vllm_generation(self)
            self._last_loaded_step = -1
        self._warned_missing_rollout_logps = False
        self._rollout_logps_problem: str | None = None
        self.recipe_text = recipe_text  # the training recipe, recorded in the model card
        self._log_sigma_to_save: torch.Tensor | None = None  # DeepSpeed's float32 sigma while `save_model` runs
        self._last_sigma_per_layer: dict[int, float] | None = None  # the last logged sigma, for the model card
        self.perturbation: LayerwisePerturbation | None = None
        if args.uses_perturbation:
            self.perturbation = LayerwisePerturbation.attach(
                self.model,
                layers=args.perturb_layers,
                sigma_init=args.perturb_sigma_init,
                sigma_shape=args.perturb_sigma_shape,
                learnable=args.perturb_sigma_learnable,
                noise_scale=args.perturb_noise_scale,
                seed=args.perturb_seed if args.perturb_seed is not None else args.seed,
            )
            self.perturbation.rank = self.accelerator.process_index
            self.perturbation.track_survival = True  # alp/noise_survival: a few ops on 256 positions per layer
            self._match_sigma_dtype_for_deepspeed()
            self._sync_reference_without_sigma()
        self._replay = None  # the sampler's truncation the numerator replays (alp_trl.sampling_replay)
        truncation = SamplingTruncation.of(self.top_k, self.top_p, self.min_p)
        if args.uses_rollout_logps and args.sampling_mask_replay and truncation.active:
            self._replay = truncation
        self._warned_unreplayed_forward = False
        if args.uses_rollout_logps:
            self._warn_on_truncated_sampling()
        self._nonfinite = NonFiniteStepGuard(args.max_consecutive_nonfinite_steps)
        self._micro_step_tokens = None
        self._sdpa_backends_outside_update = None
        self._exclude_cudnn_sdpa = self._resolve_update_attention()

    def _resolve_update_attention(self) -> bool:
        """Decide once whether the policy-update step keeps cuDNN SDPA out (`cudnn_sdpa_backward`), and log it."""
        model = self.accelerator.unwrap_model(self.model)
        attn_implementation = getattr(getattr(model, "config", None), "_attn_implementation", None)
        device = self.accelerator.device
        capability = torch.cuda.get_device_capability(device) if device.type == "cuda" else None
        exclude, reason = resolve_cudnn_sdpa(
            self.args.cudnn_sdpa_backward, attn_implementation, torch.__version__, capability
        )
        if self.accelerator.is_main_process:
            (logger.warning if exclude and self.args.cudnn_sdpa_backward == "auto" else logger.info)(reason)
        return exclude

    def _match_sigma_dtype_for_deepspeed(self) -> None:
        """ZeRO-3 flattens all trainable parameters into one buffer of one dtype: give sigma the model's dtype.

        (Outside DeepSpeed sigma stays float32, so that small updates of log-sigma are not lost to bf16 rounding;
        under DeepSpeed the optimizer keeps float32 master weights anyway.)
        """
        if not self.is_deepspeed_enabled:
            return
        log_sigma = self.perturbation.log_sigma
        dtypes = {p.dtype for p in self.model.parameters() if p.is_floating_point() and p is not log_sigma}
        if len(dtypes) == 1 and log_sigma.dtype not in dtypes:
            log_sigma.data = log_sigma.data.to(dtypes.pop())
            logger.info("DeepSpeed: sigma parameters cast to the model's dtype %s.", log_sigma.dtype)

    def _sync_reference_without_sigma(self) -> None:
        """`sync_ref_model=True`: TRL's callback zips the policy's and the reference model's parameters strictly, and
        the policy carries one more (sigma). Replace it by one that syncs with the perturbation module taken out of
        the policy, so the reference model stays a noise-free copy of the weights."""
        callbacks = self.callback_handler.callbacks
        for index, callback in enumerate(callbacks):
            if type(callback) is SyncRefModelCallback:
                callbacks[index] = _SyncRefModelWithoutSigma(callback.ref_model, callback.accelerator, self)

    def _warn_on_truncated_sampling(self) -> None:
        args = self.args
        reshaped = []
        if self._replay is None:  # with replay the numerator is the truncated distribution too
            if args.top_p is not None and args.top_p < 1.0:
                reshaped.append(f"top_p={args.top_p}")
            if args.top_k is not None and args.top_k > 0:
                reshaped.append(f"top_k={args.top_k}")
            if args.min_p:
                reshaped.append(f"min_p={args.min_p}")
        if args.repetition_penalty != 1.0:
            reshaped.append(f"repetition_penalty={args.repetition_penalty}")
        if reshaped:
            logger.warning(
                "off_policy_correction=%r with %s: completions are sampled from a truncated/reshaped distribution, "
                "but the trainer's log-probs (the numerator) are those of the full temperature-scaled distribution, "
                "so the importance ratio is biased on the tokens the truncation changed. Use top_p=1, top_k=0, or "
                "sampling_mask_replay=True for top_p / top_k / min_p, for an unbiased ratio.",
                args.off_policy_correction,
                ", ".join(reshaped),
            )

    # ------------------------------------------------------------------------------------------------ generation
    @property
    def _records_rollout_logps(self) -> bool:
        return self.args.uses_rollout_logps or self.args.rollout_mismatch != "none"

    def _generate(self, prompts):
        """TRL's generation (single turn, tool / environment loops, `rollout_func`), then a check that the rollout
        log-probs line up with the completions TRL assembled; if they do not, they are dropped, and
        `_generate_and_score_completions` recomputes them with one noise-free forward pass (with a warning)."""
        self._rollout_logps_problem = None
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
        problem = self._rollout_logps_problem or rollout_logprobs_misalignment(completion_ids, logprobs, tool_mask)
        if problem is not None:
            self._rollout_logps_problem = problem
            logprobs = None
        return prompt_ids, completion_ids, tool_mask, completions, logprobs, extra_fields, images, tool_images

    @contextmanager
    def _unused_old_logps_skipped(self):
        """Keep TRL from computing old-policy log-probs that ALP and Bypass never read.

        Their ratio's denominator is the rollout's log-probs, but TRL runs one more no-grad forward pass over the whole
        generation batch for `old_per_token_logps` whenever generation and optimizer steps are misaligned
        (`steps_per_generation * num_iterations` does not divide `gradient_accumulation_steps`): in the paper's recipes
        (16 updates per generation batch) about a quarter of the update's compute. TRL decides this from
        `args.gradient_accumulation_steps` alone (its only use there), so generation sees args in which the steps are
        aligned; everything else in them is the same object state.
        """
        args = self.args
        generate_every = args.steps_per_generation * self.num_iterations
        if (
            args.off_policy_correction not in ("alp", "bypass")
            or args.gradient_accumulation_steps % generate_every == 0
        ):
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
            self._rollout_logps_problem = self._rollout_logps_problem or f"the log-prob recorder: {mismatch}"
            return completion_ids, [[float("nan")] * len(ids) for ids in completion_ids]

    def _generate_and_score_completions(self, inputs):
        with self._unused_old_logps_skipped():
            output = super()._generate_and_score_completions(inputs)
        if not self._records_rollout_logps:
            return output
        args = self.args
        mask = output["completion_mask"]
        if "tool_mask" in output:
            mask = mask * output["tool_mask"]
        mode = "train" if self.model.training else "eval"
        missing = "sampling_per_token_logps" not in output
        # A forward pass is a collective under FSDP2 / ZeRO-3: if any rank recomputes, all of them run it.
        flag = torch.tensor(float(missing), device=self.accelerator.device)
        any_missing = self.accelerator.reduce(flag, reduction="sum").item() > 0
        self._metrics[mode]["alp/rollout_logps_recomputed"].append(float(missing))
        clean = output.get("old_per_token_logps")  # TRL's old-policy log-probs, when it computed them
        if any_missing:
            recomputed = self._clean_policy_logps(output)
            clean = recomputed if clean is None else clean
            if missing:
                self._warn_missing_rollout_logps(self._rollout_logps_problem)
                output["sampling_per_token_logps"] = recomputed
        rollout = output["sampling_per_token_logps"]
        nan_count = (torch.isnan(rollout) & mask.bool()).sum().float()
        totals = self.accelerator.reduce(torch.stack([nan_count, mask.sum().float()]), reduction="sum")
        self._metrics[mode]["alp/rollout_logp_nan_frac"].append((totals[0] / totals[1].clamp(min=1.0)).item())

        correction = args.off_policy_correction
        if correction in ROLLOUT_CORRECTIONS:
            # The auxiliary weight pi_old / pi_rollout is fixed for the whole generation batch (the old policy is the
            # one that generated it), so it is computed here, once, as verl does: a rejection can then leave the
            # loss's global denominator (`num_items_in_batch`) too.
            if clean is None:
                clean = self._clean_policy_logps(output)
            output["old_per_token_logps"] = clean
            self._apply_rollout_correction(output, clean, rollout, mask, mode)
        if args.rollout_mismatch != "none" or args.log_rollout_mismatch:
            # The engine's distance from the clean policy (the simulator's, or vLLM's / transformers generation's).
            if clean is None:
                clean = self._clean_policy_logps(output)
            stats = mismatch_statistics(clean, rollout, mask)
            named = {f"rollout_mismatch/{k}": (v, "max" if k.endswith("_max") else "mean") for k, v in stats.items()}
            for name, value in reduce_named_scalars(self.accelerator, named).items():
                self._metrics[mode][name].append(value)
        if correction == "none" and args.rollout_mismatch == "none" and not self.use_vllm:
            # metrics-only (`log_rollout_mismatch`): TRL's loss must not see log-probs it would not have had
            output.pop("sampling_per_token_logps", None)
        return output

    def _apply_rollout_correction(self, output, old_logps, rollout_logps, mask, mode) -> None:
        """The MIS / TIS weight and rejection of a generation batch (`objectives.rollout_correction`): stored in the
        batch for `_compute_loss`, rejected tokens dropped from `num_items_in_batch`, what fired logged."""
        args = self.args
        spec = args.rollout_correction_kwargs()
        corr = rollout_correction(old_logps, rollout_logps, mask, **spec)
        output["rollout_is_weight"], output["rollout_keep"] = corr.weight, corr.keep
        mask_f = mask.float()
        if args.mis_rejection == "drop":
            output["num_items_in_batch"] = self.accelerator.gather((mask_f * corr.keep).sum()).sum()
        seq_mask = (mask_f.sum(-1) > 0).float()
        sequence = spec["level"] == "sequence"
        rejected = _sequence_flag(corr.rejected, mask).squeeze(-1).float() if sequence else corr.rejected.float()
        truncated = _sequence_flag(corr.truncated, mask).squeeze(-1).float() if sequence else corr.truncated.float()
        denominator = seq_mask if sequence else mask_f
        local = torch.stack(
            [
                (rejected * denominator).sum(),
                (truncated * denominator).sum(),
                denominator.sum(),
                (corr.vetoed[:, 0].float() * seq_mask).sum(),
                seq_mask.sum(),
            ]
        )
        rej, trunc, count, vetoed, sequences = self.accelerator.reduce(local, reduction="sum").tolist()
        metrics = self._metrics[mode]
        if spec["mode"] == "truncate":
            metrics["alp/tis_truncated_frac"].append(trunc / max(count, 1.0))
        if spec["mode"] == "mask" or spec["veto"] is not None:
            metrics["alp/mis_masked_frac"].append(rej / max(count, 1.0))
        if spec["veto"] is not None:
            metrics["alp/mis_veto_frac"].append(vetoed / max(sequences, 1.0))

    def _warn_missing_rollout_logps(self, problem: str | None = None) -> None:
        if self._warned_missing_rollout_logps:
            logger.debug("Rollout log-probs recomputed: %s", problem or "the backend returned none")
            return
        logger.warning(
            "%s; off_policy_correction=%r uses the log-probs of the unperturbed policy recomputed after generation "
            "instead (one extra forward pass per generation batch; counted in alp/rollout_logps_recomputed). This "
            "ignores any train-inference mismatch of the backend%s. Shown once.",
            f"Rollout log-probs unusable ({problem})" if problem else "The generation backend returned no log-probs",
            self.args.off_policy_correction,
            " (and the simulated one of rollout_mismatch)" if self.args.rollout_mismatch != "none" else "",
        )
        self._warned_missing_rollout_logps = True

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
        batch_size = batch_size or input_ids.size(0)
        logps, entropies = [], []
        for start in range(0, input_ids.size(0), batch_size):
            ids, mask = input_ids[start : start + batch_size], attention_mask[start : start + batch_size]
            with self.accelerator.autocast():
                logits = model(input_ids=ids, attention_mask=mask, logits_to_keep=logits_to_keep + 1).logits
            chunk_logps, chunk_entropy = replayed_logprobs(
                logits[:, :-1], ids[:, -logits_to_keep:], self.temperature, self._replay, compute_entropy
            )
            logps.append(chunk_logps)
            entropies.append(chunk_entropy)
        return torch.cat(logps), torch.cat(entropies) if compute_entropy else None, None

    @torch.no_grad()
    def _clean_policy_logps(self, output) -> torch.Tensor:
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
        """Trainer's gradient norm of the step, then the non-finite guard, right before `optimizer.step()`."""
        grad_norm = super()._get_grad_norm(model, grad_norm=grad_norm)
        self._guard_optimizer_step(grad_norm)
        return grad_norm

    def _guard_optimizer_step(self, grad_norm) -> None:
        """Skip this optimizer step on every rank if its gradient norm or a micro-step loss is NaN/inf on any rank."""
        device = self.accelerator.device
        local_bad = self._nonfinite.local_loss_is_nonfinite(device)
        if not is_finite_number(grad_norm):
            local_bad = torch.ones((), device=device)
        skipped = bool(self.accelerator.reduce(local_bad, reduction="sum").item() > 0)
        if self.is_deepspeed_enabled:
            # DeepSpeed has already stepped inside `backward`. With bf16 it checks the gradients for overflow itself
            # (`bf16.check_grad_overflow`, on by default) and skips the step, which it reports here; a non-finite
            # loss whose gradients are finite is stepped.
            deepspeed_skipped = self.accelerator.optimizer_step_was_skipped
            if skipped and not deepspeed_skipped:
                logger.error(
                    "Optimizer step %d: non-finite loss or gradient norm, but DeepSpeed stepped anyway (its overflow "
                    "check saw finite gradients or is off: set `bf16.check_grad_overflow: true`).",
                    self.state.global_step + 1,
                )
            skipped = deepspeed_skipped
        else:
            self._drop_step(skipped)
        message = self._nonfinite.conclude(
            skipped, self.state.global_step + 1, grad_norm, rank=self.accelerator.process_index
        )
        if message:
            logger.warning(message)

    def _drop_step(self, skip: bool) -> None:
        """Make `optimizer.step()` and the LR scheduler a no-op for this step when `skip` (torch optimizers skip
        parameters without a gradient; accelerate's `step_was_skipped` keeps Trainer from stepping the scheduler).
        Under fp16 loss scaling the gradients are poisoned instead, so that the scaler skips (and reports) it."""
        optimizer = self.optimizer
        scaler = getattr(optimizer, "scaler", None)
        if scaler is not None:
            if skip:
                for group in optimizer.param_groups:
                    for param in group["params"]:
                        if param.grad is not None:
                            param.grad.fill_(float("nan"))
            return
        if not hasattr(optimizer, "_is_overflow"):
            raise RuntimeError(
                f"The non-finite step guard expects accelerate's AcceleratedOptimizer (`_is_overflow`), got "
                f"{type(optimizer).__name__}: accelerate changed; see alp_trl/trainer.py `_drop_step`."
            )
        if skip:
            for group in optimizer.param_groups:
                for param in group["params"]:
                    param.grad = None
        optimizer._is_overflow = skip

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
        correction = args.off_policy_correction
        if correction == "none":
            if self.model.training:
                self._micro_step_tokens = inputs["completion_mask"].sum()
            return super()._compute_loss(model, inputs)

        mode = "train" if self.model.training else "eval"
        if mode == "train":  # for the non-finite guard's description of a skipped step
            self._micro_step_tokens = inputs["completion_mask"].sum()
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

        advantages = inputs["advantages"]
        if advantages.dim() == 1:
            advantages = advantages.unsqueeze(1)
        rollout_logps = inputs["sampling_per_token_logps"]
        # Tokens the engine could not score: ratio 1 against the current policy, rather than NaN.
        rollout_logps = torch.where(torch.isnan(rollout_logps), per_token_logps.detach(), rollout_logps)

        level = self.importance_sampling_level
        weight = None
        if correction in ("alp", "bypass"):
            denominator = rollout_logps
        else:  # ppo and the MIS / TIS baselines: the PPO ratio against the old policy
            old_logps = inputs.get("old_per_token_logps")
            denominator = per_token_logps.detach() if old_logps is None else old_logps
            if correction in ROLLOUT_CORRECTIONS:
                if "rollout_is_weight" in inputs:  # computed once per generation batch
                    weight, keep = inputs["rollout_is_weight"], inputs["rollout_keep"]
                else:  # a batch built by hand: the same weight, from this micro-batch alone
                    corr = rollout_correction(denominator, rollout_logps, mask, **args.rollout_correction_kwargs())
                    weight, keep = corr.weight, corr.keep
                mask = mask * keep
        log_ratio = importance_log_ratio(
            per_token_logps, denominator, mask, level, args.sequence_ratio_aggregation, args.log_ratio_clamp
        )
        extra = {}
        if self.loss_type == "cispo":
            surrogate = cispo_surrogate(log_ratio, advantages, per_token_logps, self.epsilon_high)
        elif self.loss_type == "sapo":
            surrogate = sapo_surrogate(log_ratio, advantages, args.sapo_temperature_pos, args.sapo_temperature_neg)
        elif self.loss_type == "vespo":
            # the sequence weight of the token log-ratios (numerator over the rollout policy for ALP / Bypass)
            phi = vespo_gamma_weight(
                per_token_logps.detach() - denominator,
                advantages,
                mask,
                args.vespo_k_pos,
                args.vespo_lambda_pos,
                args.vespo_k_neg,
                args.vespo_lambda_neg,
            )
            surrogate = vespo_surrogate(phi, advantages, per_token_logps)
            extra["vespo/phi_seq_mean"] = phi
        else:
            surrogate = clipped_surrogate(
                log_ratio, advantages, self.epsilon_low, self.epsilon_high, args.dual_clip_c, args.delta
            )
        per_token_loss = surrogate.per_token_loss
        if weight is not None:
            per_token_loss = per_token_loss * weight
        if args.off_policy_mask_threshold is not None:
            per_token_loss = per_token_loss * off_policy_sequence_mask(
                advantages, per_token_logps, rollout_logps, mask, args.off_policy_mask_threshold
            )
        entropy_mask = None
        if self.top_entropy_quantile < 1.0:
            entropy_mask = self.get_high_entropy_mask(entropies, mask, 1 - self.top_entropy_quantile)
            per_token_loss = per_token_loss * entropy_mask

        if self.beta != 0.0:
            per_token_kl = low_variance_kl(per_token_logps, inputs["ref_per_token_logps"])
            if args.use_bias_correction_kl:
                per_token_kl = per_token_kl * kl_correction_weight(
                    per_token_logps, denominator, mask, level, args.sequence_ratio_aggregation, args.log_ratio_clamp
                )
            per_token_loss = per_token_loss + self.beta * per_token_kl
            extra["kl"] = per_token_kl

        accumulation = self.current_gradient_accumulation_steps if mode == "train" else 1.0
        aggregation = _LOSS_AGGREGATION.get(self.loss_type, self.loss_type)
        if aggregation == "dapo":
            # `num_items_in_batch` spans the generation batch: rescale it to one accumulation window, as TRL does.
            num_items = inputs["num_items_in_batch"].clamp(min=1.0) / self.accelerator.num_processes
            if mode == "train":
                num_items = num_items * self.current_gradient_accumulation_steps / args.steps_per_generation
            loss = aggregate_loss(per_token_loss, mask, "dapo", num_items=num_items)
            policy_loss = loss.detach()
        else:
            loss = aggregate_loss(per_token_loss, mask, aggregation, args.max_completion_length)
            policy_loss = loss.detach()
            loss = loss / accumulation
        if self._entropy_bonus_enabled:
            loss = loss - self._entropy_bonus(entropies, mask, entropy_mask, mode, accumulation, policy_loss)
        if self.aux_loss_enabled:
            loss = loss + self.router_aux_loss_coef * aux_loss / accumulation
            self._metrics[mode]["aux_loss"].append(self.accelerator.gather_for_metrics(aux_loss).mean().item())

        self._log_loss_metrics(mode, per_token_logps, rollout_logps, mask, entropies, surrogate, extra)
        return loss

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

    def _log_loss_metrics(self, mode, per_token_logps, rollout_logps, mask, entropies, surrogate, extra):
        """Log the loss metrics with one reduction and one gather (each extra GPU sync would stall the step)."""
        metrics, args = self._metrics[mode], self.args
        low, high, dual = surrogate.low_clipped, surrogate.high_clipped, surrogate.dual_clipped
        flags = {
            "clip_ratio/low_mean": low,
            "clip_ratio/high_mean": high,
            "clip_ratio/region_mean": low | high,
            "alp/dual_clip_frac": dual,
            "alp/clip_frac": low | high | dual,
        }
        if self.loss_type == "cispo":  # TRL's name for CISPO's truncated weights
            flags["cispo_clip_ratio"] = high
        if self.importance_sampling_level == "sequence":  # a sequence's flags are the same on all its tokens
            flags = {name: _sequence_flag(value, mask) for name, value in flags.items()}
        token_means = {"entropy": entropies, **flags, **extra}
        # A per-sequence value (shape (B, 1): sequence-level clipping / MIS flags) is a fraction of sequences, as in
        # TRL's GRPO; a per-token value a fraction of completion tokens.
        mask_f = mask.float()
        seq_mask = (mask_f.sum(-1, keepdim=True) > 0).float()
        sums, per_sequence = [], []
        for value in token_means.values():
            value = value.detach().float()
            per_sequence.append(value.dim() == 2 and value.size(-1) == 1 and mask_f.size(-1) > 1)
            sums.append((value * seq_mask).sum() if per_sequence[-1] else (value.expand_as(mask_f) * mask_f).sum())
        # the importance-weight diagnostics (train vs rollout, at the ratio's level), in the same reduction
        train_rollout = per_token_logps.detach() - rollout_logps
        weight_sums = importance_weight_sums(
            train_rollout, mask, self.importance_sampling_level, args.sequence_ratio_aggregation, args.log_ratio_clamp
        )
        summed = [k for k in weight_sums if k != "abs_max_preclamp"]
        totals = self.accelerator.reduce(
            torch.stack([*sums, *(weight_sums[k] for k in summed), mask_f.sum(), seq_mask.sum()]), reduction="sum"
        ).tolist()
        num_tokens, num_sequences = totals[-2], totals[-1]
        for name, total, sequence in zip(token_means, totals, per_sequence):
            metrics[name].append(total / max(num_sequences if sequence else num_tokens, 1.0))
        reduced_weights = dict(zip(summed, totals[len(sums) : len(sums) + len(summed)]))

        # Token-level train-vs-rollout statistics (the train side is the perturbed policy under ALP).
        stats = ratio_statistics(train_rollout, mask)
        stats["abs_max_preclamp"] = weight_sums["abs_max_preclamp"]
        survival = self.perturbation.survival_per_layer() if self.perturbation is not None and mode == "train" else {}
        # TRL's per-sequence extremes of the clip fractions: the least low-clipped and the most high-clipped sequence
        stats["low_min"] = _per_sequence_mean(low, mask_f).min()
        stats["high_max"] = _per_sequence_mean(high, mask_f).max()
        named = {
            "alp/ratio/p50": (stats["ratio_p50"], "mean"),
            "alp/ratio/p99": (stats["ratio_p99"], "mean"),
            "alp/ratio/max": (stats["ratio_max"], "max"),
            "alp/log_ratio_abs_max": (stats["log_ratio_abs_max"], "max"),
            "alp/train_rollout_kl": (stats["kl_k3"], "mean"),
            "clip_ratio/low_min": (stats["low_min"], "min"),
            "clip_ratio/high_max": (stats["high_max"], "max"),
            "abs_max_preclamp": (stats["abs_max_preclamp"], "max"),
        }
        for layer, value in survival.items():  # mean over ranks, per layer
            named[f"alp/noise_survival/layer_{layer:02d}"] = (value, "mean")
        reduced = reduce_named_scalars(self.accelerator, named)  # one gather for all of them
        for name, value in reduced.items():
            if name != "abs_max_preclamp":
                metrics[name].append(value)
        diagnostics = weight_diagnostics({**reduced_weights, "abs_max_preclamp": reduced["abs_max_preclamp"]})
        for name in ("is_weight_chi2", "is_weight_ess_frac", "ppl_ratio", "seq_clamped_frac"):
            metrics[f"alp/{name}"].append(diagnostics[name])
        metrics["alp/log_ratio_abs_max_preclamp"].append(diagnostics["abs_max_preclamp"])
        if survival:
            per_layer = [reduced[f"alp/noise_survival/layer_{layer:02d}"] for layer in survival]
            metrics["alp/noise_survival"].append(sum(per_layer) / len(per_layer))
        if self.perturbation is not None:
            per_layer = self.perturbation.sigma_per_layer()  # every rank: under ZeRO-3 this gathers sigma
            self._last_sigma_per_layer = per_layer
            metrics["alp/sigma_mean"].append(sum(per_layer.values()) / len(per_layer))
            for layer, value in per_layer.items():
                metrics[f"alp/sigma/layer_{layer:02d}"].append(value)

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
        a = self.args
        lines = [
            "",
            "## ALP settings",
            "",
            f"- off_policy_correction: `{a.off_policy_correction}`",
            f"- importance_sampling_level: `{a.importance_sampling_level}` "
            f"(sequence aggregation `{a.sequence_ratio_aggregation}`)",
            f"- clip: epsilon `{a.epsilon}`, epsilon_high `{a.epsilon_high}`, dual_clip_c `{a.dual_clip_c}`",
        ]
        if self.perturbation is not None:
            # the last logged values: reading the parameter here (rank 0 only) could need a collective gather
            per_layer = self._last_sigma_per_layer or self.perturbation.sigma_per_layer()
            sigma = ", ".join(f"{k}: {v:.4g}" for k, v in per_layer.items())
            lines += [
                f"- perturb_layers: `{a.perturb_layers}`, sigma shape `{a.perturb_sigma_shape}`, "
                f"noise scale `{a.perturb_noise_scale}`",
                f"- sigma per layer: {sigma}",
                "- sigma is stored in `alp_perturbation.safetensors` beside the weights and is not part of them.",
            ]
        recipe = self.recipe_text
        if recipe:
            lines += ["", "## Recipe", "", "```yaml", recipe.rstrip(), "```"]
        with open(path, "a") as f:
            f.write("\n".join(lines) + "\n")
