"""`ALPConfig`: the configuration of `ALPGRPOTrainer`, a `trl.GRPOConfig` with the ALP fields."""

import logging
import math
from dataclasses import dataclass, field

from trl import GRPOConfig

from .attention_backend import CUDNN_SDPA_SETTINGS
from .corrections import OFF_POLICY_CORRECTIONS, ROLLOUT_CORRECTIONS, Correction, correction  # noqa: F401
from .perturbation import LAYER_SPECS, NOISE_SCALES, SIGMA_SHAPES, parse_layer_spec  # noqa: F401 (re-exported)


logger = logging.getLogger(__name__)

MIS_REJECTIONS = ("drop", "zero")
MIS_AGGREGATIONS = ("sum", "mean")
CODE_TOOLS = ("none", "python")
SEQUENCE_RATIO_AGGREGATIONS = ("mean", "sum")
MISMATCH_KINDS = ("none", "bf16", "fp16", "bf16_activations", "logit_noise", "hidden_noise")
VLLM_DTYPES = ("auto", "float32", "bfloat16", "float16")


def _check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"`{name}` got {value!r}; allowed values are {list(choices)}.")


@dataclass
class ALPConfig(GRPOConfig):
    r"""
    Configuration class for [`ALPGRPOTrainer`]: every field of [`~trl.GRPOConfig`] plus the fields of Adaptive
    Layerwise Perturbation (ALP) and of the off-policy baselines it is compared with.

    ALP adds learnable Gaussian noise `sigma_l * eps` to the input hidden state of the selected decoder layers during
    the policy-update forward pass only, and uses a single importance ratio: the perturbed training policy over the
    unperturbed policy that sampled the rollout (vLLM's log-probs when vLLM generates, the transformers generation's
    otherwise).

    Parameters:
        > ALP and off-policy correction

        off_policy_correction (`str`, *optional*, defaults to `"alp"`):
            How the policy update corrects for the gap between the rollout (inference) policy and the trained policy.
            `"alp"`: ratio perturbed-policy / rollout-policy. `"bypass"`: ratio policy / rollout-policy, no noise.
            `"token_mis"` / `"seq_mis"`: PPO ratio policy / old-policy times the weight old / rollout, rejected outside
            `[mis_threshold_low, mis_threshold_high]` per token / per sequence. `"tis"` / `"seq_tis"`: the same weight
            per token / per sequence, truncated at the upper bound. `"ppo"`: the PPO ratio policy / old-policy alone
            (the GRPO baseline through this package's objective: same clamp, dual clip, aggregation and metrics as
            the others). `"none"`: plain `GRPOTrainer` behaviour. Token vs sequence ratio follows
            `importance_sampling_level`.
        perturb_layers (`str` or `list[int]`, *optional*, defaults to `"all"`):
            Which decoder layers get noise on their input hidden state: `"all"`, `"early"`, `"middle"`, `"late"`
            (thirds of the decoder stack), `"final_hidden"` (the final hidden state only: the LM head's input, not
            the logits; `"logits"` is accepted as its old name), `"none"`, or a
            list of layer indices (negative indices count from the end).
        perturb_sigma_init (`float`, *optional*, defaults to `0.02`):
            Initial noise standard deviation of every perturbed layer.
        perturb_sigma_learnable (`bool`, *optional*, defaults to `True`):
            Whether sigma is trained by the RL loss (through the reparameterised noise) or kept fixed.
        perturb_lr (`float`, *optional*, defaults to `1e-2`):
            Learning rate of the sigma parameters, which live in their own optimizer group without weight decay.
        perturb_sigma_shape (`str`, *optional*, defaults to `"scalar"`):
            `"scalar"`: one sigma per layer. `"channel"`: one sigma per hidden unit per layer.
        perturb_noise_scale (`str`, *optional*, defaults to `"absolute"`):
            `"absolute"`: the noise is `sigma * eps` (the paper's form). `"rms"`: the noise is scaled by each token's
            (detached) hidden-state RMS, so that a given sigma perturbs early and late layers alike.
        perturb_seed (`int` or `None`, *optional*, defaults to `None`):
            Base seed of the noise; `None` uses `seed`. The noise of a layer is a function of (seed, step, micro-step,
            process rank, layer index), so gradient-checkpoint recomputation sees the same noise.
        sequence_ratio_aggregation (`str`, *optional*, defaults to `"mean"`):
            How sequence-level ratios (ALP, bypass) combine the token log-ratios: `"mean"` (geometric mean, GSPO
            style) or `"sum"` (the full sequence likelihood ratio).
        dual_clip_c (`float` or `None`, *optional*, defaults to `10.0`):
            Dual-clip bound on negative advantages: the loss of a token with advantage `A < 0` is capped at `-c * A`.
            `None` disables it. Must be > 1.
        log_ratio_clamp (`float`, *optional*, defaults to `20.0`):
            Log-ratios are clamped to `[-log_ratio_clamp, log_ratio_clamp]` before the exponential.
        mis_threshold (`float`, *optional*, defaults to `3.0`):
            `C` of the MIS / TIS baselines when `mis_threshold_low` and `mis_threshold_high` are both unset: MIS
            rejects weights outside `[1/C, C]`, TIS truncates at `C`.
        mis_threshold_low (`float` or `None`, *optional*, defaults to `None`):
            Lower bound of the auxiliary weight (MIS: reject below; TIS: raise to it). When only one of the two bounds
            is set, the other side is unbounded.
        mis_threshold_high (`float` or `None`, *optional*, defaults to `None`):
            Upper bound of the auxiliary weight (MIS: reject above; TIS: truncate at it; TIS needs one).
        mis_rejection (`str`, *optional*, defaults to `"drop"`):
            `"drop"`: rejected tokens / sequences leave the loss mask and the loss's denominator (verl, slime, the
            paper's reference code). `"zero"`: their weight is 0 but they still count in the denominator (TRL).
        mis_aggregation (`str`, *optional*, defaults to `"sum"`):
            Sequence-level auxiliary weight (`seq_mis`, `seq_tis`): product of the token ratios (`"sum"` of the
            log-ratios) or their geometric mean (`"mean"`).
        mis_veto_threshold (`float` or `None`, *optional*, defaults to `None`):
            Reject a whole sequence when any of its token ratios old / rollout is below this (verl / slime "veto").
            Only with a MIS / TIS correction.
        log_rollout_mismatch (`bool`, *optional*, defaults to `False`):
            Log the rollout engine's distance from the unperturbed training policy (`rollout_mismatch/*`) at every
            generation, with any correction. With `"none"` this is a metrics-only mode: the loss stays TRL's.
        log_unperturbed_ratio (`bool`, *optional*, defaults to `False`):
            ALP only: also log the ratio of the unperturbed policy to the rollout (`alp/unperturbed_ratio/*`,
            `alp/unperturbed_train_rollout_kl`) beside the perturbed one ALP optimises, at the cost of one no-grad
            forward pass per micro-batch. Shows whether the policy itself drifts from the engine under ALP.
        rollout_mismatch (`str`, *optional*, defaults to `"none"`):
            Rollout-mismatch simulator for CPU / transformers generation (see `alp_trl.simulated_engine`): sample the
            completions from a deliberately different copy of the policy, `"bf16"` / `"fp16"` (weights rounded),
            `"bf16_activations"` (the whole forward in bf16), `"logit_noise"` or `"hidden_noise"` (Gaussian noise of
            std `rollout_mismatch_std`), and use its log-probs as the rollout log-probs. The measured mismatch is
            logged under `rollout_mismatch/*`.
        rollout_mismatch_std (`float`, *optional*, defaults to `0.0`):
            Noise std of the `*_noise` kinds.
        vllm_importance_sampling_correction (`bool` or `None`, *optional*, defaults to `None`):
            TRL's own vLLM importance-sampling correction. `None` means: on for `off_policy_correction="none"`, off
            otherwise, because ALP and the baselines replace it. Setting it to `True` together with another correction
            is refused, so that two corrections never stack.
        vllm_dtype (`str`, *optional*, defaults to `"auto"`):
            Precision of the colocated vLLM engine (`use_vllm=True`, `vllm_mode="colocate"`): `"auto"` (TRL's
            engine: vLLM's choice, which runs a float32 checkpoint in bfloat16 or float16), `"float32"`, `"bfloat16"`
            or `"float16"`. ALP's denominator is this engine's log-prob, so this sets the train-inference mismatch.
        vllm_enforce_eager (`bool` or `None`, *optional*, defaults to `None`):
            Run the colocated engine without torch.compile / CUDA graphs. `None`: eager on a CPU (compilation there
            costs minutes and gains little for small models), vLLM's default on a GPU.
        vllm_weight_sync_dir (`str` or `None`, *optional*, defaults to `None`):
            Server mode (`vllm_mode="server"`) on a trainer without CUDA: the weights of each sync are written there
            as one safetensors file that the server (`alp-trl vllm-serve`) loads, so it must be visible to both (the
            same machine or a shared filesystem). `None`: `<output_dir>/.vllm_weight_sync`.
        sampling_mask_replay (`bool`, *optional*, defaults to `True`):
            With truncated sampling (`top_p < 1`, `top_k > 0` or `min_p > 0`), compute the trainer's log-probs over
            the tokens the sampler kept at each position (the same top-k / top-p / min-p rule as vLLM and
            transformers, on the policy's own temperature-scaled logits, always keeping the sampled token), so the
            ratio compares the two sampling distributions. vLLM's `processed_logprobs` and the transformers
            recorder are normalised over the same kept set. `False`: TRL's behaviour (the full distribution in the
            numerator, a biased ratio on the tokens the truncation changed).

        > Multi-turn tool-integrated reasoning (SimpleTIR style)

        code_tool (`str`, *optional*, defaults to `"none"`):
            `"python"`: the model may write a fenced ```python block; the trainer runs it in the sandbox
            (`alp_trl.sandbox`), appends its output as a fenced ```output block (tool tokens: context, never trained)
            and lets the model continue, up to `max_turns` turns (see `alp_trl.tool_rollout`).
        max_turns (`int`, *optional*, defaults to `5`):
            Model turns per completion (>= 1).
        code_timeout (`float`, *optional*, defaults to `5.0`):
            Wall-clock and CPU seconds of one code execution (> 0).
        code_memory_mb (`int`, *optional*, defaults to `1024`):
            Address-space limit of one code execution in MiB (> 0).
        void_turn_filter (`bool`, *optional*, defaults to `True`):
            A turn with neither a code block nor a final answer (`\boxed{}`) ends the trajectory; with `True` the
            trajectory is also left out of the loss (SimpleTIR's void-turn filtering), with `False` it is kept.

        > Numerical safety

        cudnn_sdpa_backward (`str`, *optional*, defaults to `"auto"`):
            Whether the policy-update step (forward, backward, gradient-checkpoint recomputation) may use PyTorch's
            cuDNN scaled-dot-product-attention kernel. `"auto"`: not where its backward is known to return NaN
            gradients for padded batches (CUDA compute capability 9.x, i.e. H100/H200, torch >= 2.11, `sdpa`
            attention; pytorch/pytorch#196678), PyTorch's choice elsewhere. `"off"`: never. `"on"`: PyTorch's
            choice always. Generation is never affected. The decision is logged once.
        max_consecutive_nonfinite_steps (`int`, *optional*, defaults to `3`):
            An optimizer step whose gradient norm or micro-step loss is NaN/inf (on any rank) is skipped: gradients
            dropped, optimizer, LR scheduler and sigma untouched, counted in `train/nonfinite_steps`. After this many
            skipped steps in a row, training stops with an error naming the likely causes.
    """

    off_policy_correction: str = field(
        default="alp",
        metadata={
            "help": "Off-policy correction of the policy update.",
            "choices": list(OFF_POLICY_CORRECTIONS),
        },
    )
    perturb_layers: str = field(
        default="all",
        metadata={
            "help": "Decoder layers whose input hidden state gets noise: 'all', 'early', 'middle', 'late' (thirds of "
            "the stack), 'final_hidden' (the LM head's input only; old name 'logits'), 'none', or a list of layer "
            "indices such as '0,5,11'."
        },
    )
    perturb_sigma_init: float = field(
        default=0.02, metadata={"help": "Initial noise standard deviation of every perturbed layer (>= 0)."}
    )
    perturb_sigma_learnable: bool = field(
        default=True, metadata={"help": "Train sigma with the RL loss (True) or keep it at its initial value."}
    )
    perturb_lr: float = field(
        default=1e-2,
        metadata={"help": "Learning rate of the sigma parameters (own optimizer group, no weight decay)."},
    )
    perturb_sigma_shape: str = field(
        default="scalar",
        metadata={
            "help": "'scalar': one sigma per layer; 'channel': one sigma per hidden unit per layer.",
            "choices": list(SIGMA_SHAPES),
        },
    )
    perturb_noise_scale: str = field(
        default="absolute",
        metadata={
            "help": "'absolute': noise = sigma * eps (the paper). 'rms': noise also scaled by each token's detached "
            "hidden-state RMS, so one sigma means the same relative noise in every layer.",
            "choices": list(NOISE_SCALES),
        },
    )
    perturb_seed: int | None = field(
        default=None, metadata={"help": "Base seed of the perturbation noise. None uses `seed`."}
    )
    sequence_ratio_aggregation: str = field(
        default="mean",
        metadata={
            "help": "Sequence-level ratio from the token log-ratios: 'mean' (geometric, GSPO-style) or 'sum'.",
            "choices": list(SEQUENCE_RATIO_AGGREGATIONS),
        },
    )
    dual_clip_c: float | None = field(
        default=10.0,
        metadata={"help": "Dual-clip bound c (> 1) on negative advantages; None disables dual clipping."},
    )
    log_ratio_clamp: float = field(
        default=20.0, metadata={"help": "Clamp log-ratios to [-value, value] before exponentiating (> 0)."}
    )
    mis_threshold: float = field(
        default=3.0,
        metadata={"help": "C of the MIS/TIS baselines: weights outside [1/C, C] are masked (MIS) or truncated (TIS)."},
    )
    mis_threshold_low: float | None = field(
        default=None,
        metadata={
            "help": "Lower bound of the MIS/TIS weight (None: 1/mis_threshold, or none if only the upper is set)."
        },
    )
    mis_threshold_high: float | None = field(
        default=None,
        metadata={
            "help": "Upper bound of the MIS/TIS weight (None: mis_threshold, or none if only the lower is set)."
        },
    )
    mis_rejection: str = field(
        default="drop",
        metadata={
            "help": "'drop': rejected tokens/sequences leave the loss and its denominator (verl, slime); 'zero': "
            "weight 0, still counted in the denominator (TRL).",
            "choices": list(MIS_REJECTIONS),
        },
    )
    mis_aggregation: str = field(
        default="sum",
        metadata={
            "help": "Sequence-level MIS/TIS weight: product ('sum' of log-ratios) or geometric mean ('mean').",
            "choices": list(MIS_AGGREGATIONS),
        },
    )
    mis_veto_threshold: float | None = field(
        default=None,
        metadata={"help": "Reject a sequence when any token's old/rollout ratio is below this (MIS/TIS only)."},
    )
    log_rollout_mismatch: bool = field(
        default=False,
        metadata={
            "help": "Log the rollout engine's mismatch to the unperturbed policy (rollout_mismatch/*); with "
            "off_policy_correction='none' a metrics-only mode."
        },
    )
    log_unperturbed_ratio: bool = field(
        default=False,
        metadata={
            "help": "ALP only: also log the unperturbed policy's ratio to the rollout (alp/unperturbed_ratio/*), one "
            "extra no-grad forward per micro-batch."
        },
    )
    rollout_mismatch: str = field(
        default="none",
        metadata={
            "help": "Simulate a train-inference mismatch without vLLM: sample from the policy with weights rounded "
            "('bf16', 'fp16'), the whole forward in bf16 ('bf16_activations') or with Gaussian noise on its logits / "
            "hidden states ('logit_noise', 'hidden_noise').",
            "choices": list(MISMATCH_KINDS),
        },
    )
    rollout_mismatch_std: float = field(
        default=0.0, metadata={"help": "Noise std of rollout_mismatch='logit_noise' / 'hidden_noise' (> 0)."}
    )
    vllm_importance_sampling_correction: bool | None = field(
        default=None,
        metadata={
            "help": "TRL's vLLM importance-sampling correction. None: on only when off_policy_correction='none' "
            "(ALP and the baselines replace it); True together with another correction is refused."
        },
    )

    vllm_dtype: str = field(
        default="auto",
        metadata={
            "help": "Precision of the colocated vLLM engine: 'auto' (vLLM's choice, as TRL: a float32 checkpoint runs "
            "in bfloat16/float16), 'float32', 'bfloat16' or 'float16'.",
            "choices": list(VLLM_DTYPES),
        },
    )
    vllm_enforce_eager: bool | None = field(
        default=None,
        metadata={"help": "Run the colocated vLLM engine eagerly (no torch.compile). None: eager on CPU only."},
    )
    vllm_weight_sync_dir: str | None = field(
        default=None,
        metadata={
            "help": "Server mode without CUDA: directory through which weights reach the server (alp-trl vllm-serve); "
            "shared by trainer and server. None: <output_dir>/.vllm_weight_sync."
        },
    )
    sampling_mask_replay: bool = field(
        default=True,
        metadata={
            "help": "With top_p < 1, top_k > 0 or min_p > 0, renormalise the trainer's log-probs over the tokens the "
            "sampler kept (same rule as vLLM), so the ratio is between the two sampling distributions."
        },
    )

    code_tool: str = field(
        default="none",
        metadata={
            "help": "'python': multi-turn tool-integrated reasoning; the model's ```python blocks run in a sandbox and "
            "their output is appended as context (SimpleTIR style).",
            "choices": list(CODE_TOOLS),
        },
    )
    max_turns: int = field(default=5, metadata={"help": "Model turns per completion with code_tool (>= 1)."})
    code_timeout: float = field(default=5.0, metadata={"help": "Seconds one code execution may take (> 0)."})
    code_memory_mb: int = field(default=1024, metadata={"help": "Memory limit of one code execution, MiB (> 0)."})
    void_turn_filter: bool = field(
        default=True,
        metadata={
            "help": "A turn with neither code nor a final answer ends the trajectory; True also leaves the "
            "trajectory out of the loss (SimpleTIR)."
        },
    )
    cudnn_sdpa_backward: str = field(
        default="auto",
        metadata={
            "help": "May the policy update use PyTorch's cuDNN SDPA kernel? 'auto': not on H100/H200 with torch >= "
            "2.11 (its backward returns NaN for padded batches, pytorch/pytorch#196678), yes elsewhere; 'off': never; "
            "'on': PyTorch's choice.",
            "choices": list(CUDNN_SDPA_SETTINGS),
        },
    )
    max_consecutive_nonfinite_steps: int = field(
        default=3,
        metadata={
            "help": "Optimizer steps with a NaN/inf loss or gradient norm are skipped and counted; stop training "
            "after this many in a row (>= 1)."
        },
    )

    def __post_init__(self):
        self._validate_alp_fields()
        super().__post_init__()  # parses `generation_kwargs` given as JSON text
        self._validate_generation_kwargs()
        self._validate_vllm_fields()

    def __getstate__(self):
        # `training_args.bin` (a pickle of these arguments) is saved with every checkpoint and uploaded with the model:
        # the Hub token must never be inside it. The trainer reads the token from the live object when it pushes.
        state = self.__dict__.copy()
        if state.get("hub_token") is not None:
            state["hub_token"] = None
        return state

    @property
    def correction(self) -> Correction:
        """What `off_policy_correction` is (`alp_trl.corrections`): every rule that depends on it asks this."""
        return correction(self.off_policy_correction)

    @property
    def uses_perturbation(self) -> bool:
        """Whether the policy-update forward runs through the layerwise noise modules."""
        return self.correction.perturbed and self.perturb_layers != "none"

    @property
    def uses_rollout_logps(self) -> bool:
        """Whether the trainer needs the log-probs of the policy that sampled the rollout (objective or metrics)."""
        return not self.correction.is_trl_loss or self.log_rollout_mismatch

    @property
    def rejection_drops_tokens(self) -> bool:
        """A MIS / TIS rejection (MIS's bounds, or the veto) can remove tokens from the loss mask (`mis_rejection`
        `"drop"`), so the update's ratio statistics are over the kept tokens only."""
        return self.correction.has_rollout_weight and self.mis_rejection == "drop"

    @property
    def mis_bounds(self) -> tuple[float | None, float | None]:
        """`(low, high)` of the MIS / TIS weight: the explicit bounds, else `[1/C, C]` (MIS) or `C` (TIS)."""
        if self.mis_threshold_low is None and self.mis_threshold_high is None:
            truncate = self.correction.truncates
            return (None if truncate else 1.0 / self.mis_threshold), self.mis_threshold
        return self.mis_threshold_low, self.mis_threshold_high

    def rollout_correction_kwargs(self) -> dict:
        """Keyword arguments of `objectives.rollout_correction` for this config's MIS / TIS correction."""
        low, high = self.mis_bounds
        return {
            "level": self.correction.weight_level or "token",
            "mode": self.correction.rollout_weight or "mask",
            "low": low,
            "high": high,
            "aggregation": self.mis_aggregation,
            "veto": self.mis_veto_threshold,
            "rejection": self.mis_rejection,
            "clamp": self.log_ratio_clamp,
        }

    def _validate_generation_kwargs(self) -> None:
        """Refuse decoding that does not sample from the policy when the objective needs rollout log-probs: beam search,
        greedy and contrastive search pick completions by score, so no importance ratio against them is meaningful."""
        if not self.uses_rollout_logps or not isinstance(self.generation_kwargs, dict):
            return
        kwargs = self.generation_kwargs
        not_sampling = {
            "num_beams": (kwargs.get("num_beams") or 1) > 1,
            "num_beam_groups": (kwargs.get("num_beam_groups") or 1) > 1,
            "use_beam_search": bool(kwargs.get("use_beam_search")),
            "do_sample": kwargs.get("do_sample", True) is False,
            "penalty_alpha": kwargs.get("penalty_alpha") is not None,
        }
        for key, refused in not_sampling.items():
            if refused:
                raise ValueError(
                    f"`generation_kwargs` sets {key}={kwargs[key]!r}: beam search, greedy and contrastive decoding "
                    "choose completions by score instead of sampling them from the policy, so the importance ratio of "
                    f"off_policy_correction={self.off_policy_correction!r} has no rollout probability to divide by. "
                    "Sample instead (remove the key), or use off_policy_correction='none'."
                )

    def _validate_vllm_fields(self) -> None:
        """vLLM's fields, and whether vLLM can run here at all: before any model loads."""
        _check_choice("vllm_dtype", self.vllm_dtype, VLLM_DTYPES)
        if not self.use_vllm:
            return
        from .vllm_engine import vllm_unavailable_reason

        reason = vllm_unavailable_reason()
        if reason is not None:
            raise ImportError(f"use_vllm=True: {reason}")

    def _validate_rollout_correction_fields(self) -> None:
        _check_choice("mis_rejection", self.mis_rejection, MIS_REJECTIONS)
        _check_choice("mis_aggregation", self.mis_aggregation, MIS_AGGREGATIONS)
        for name in ("mis_threshold_low", "mis_threshold_high", "mis_veto_threshold"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(f"`{name}` must be a finite number > 0 or None, got {value!r}.")
        low, high = self.mis_threshold_low, self.mis_threshold_high
        if low is not None and high is not None and low >= high:
            raise ValueError(f"`mis_threshold_low` ({low}) must be below `mis_threshold_high` ({high}).")
        correction = self.off_policy_correction
        explicit = [n for n in ("mis_threshold_low", "mis_threshold_high", "mis_veto_threshold") if getattr(self, n)]
        if explicit and not self.correction.has_rollout_weight:
            raise ValueError(
                f"`{explicit[0]}` applies to the MIS / TIS corrections {list(ROLLOUT_CORRECTIONS)}, but "
                f"off_policy_correction={correction!r} has no auxiliary rollout weight: unset it or pick one of them."
            )
        if self.correction.truncates and low is not None and high is None:
            raise ValueError(
                f"off_policy_correction={correction!r} truncates at an upper bound: set `mis_threshold_high` (or "
                "unset `mis_threshold_low` to use `mis_threshold`)."
            )

    def _validate_alp_fields(self) -> None:
        _check_choice("off_policy_correction", self.off_policy_correction, OFF_POLICY_CORRECTIONS)
        _check_choice("perturb_sigma_shape", self.perturb_sigma_shape, SIGMA_SHAPES)
        _check_choice("perturb_noise_scale", self.perturb_noise_scale, NOISE_SCALES)
        _check_choice("sequence_ratio_aggregation", self.sequence_ratio_aggregation, SEQUENCE_RATIO_AGGREGATIONS)
        self.perturb_layers = parse_layer_spec(self.perturb_layers)
        _check_choice("cudnn_sdpa_backward", self.cudnn_sdpa_backward, CUDNN_SDPA_SETTINGS)
        _check_choice("code_tool", self.code_tool, CODE_TOOLS)
        for name, kind in (("max_turns", int), ("code_memory_mb", int), ("code_timeout", (int, float))):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, kind) or not value > 0 or not math.isfinite(value):
                raise ValueError(
                    f"`{name}` must be {'an integer >= 1' if kind is int else 'a number > 0'}, got {value!r}."
                )
        if (
            not isinstance(self.max_consecutive_nonfinite_steps, int)
            or isinstance(self.max_consecutive_nonfinite_steps, bool)
            or self.max_consecutive_nonfinite_steps < 1
        ):
            raise ValueError(
                f"`max_consecutive_nonfinite_steps` must be an integer >= 1, got {self.max_consecutive_nonfinite_steps!r}."
            )
        _check_choice("rollout_mismatch", self.rollout_mismatch, MISMATCH_KINDS)
        if self.rollout_mismatch.endswith("_noise") and not self.rollout_mismatch_std > 0:
            raise ValueError(
                f"`rollout_mismatch={self.rollout_mismatch!r}` needs `rollout_mismatch_std` > 0, got "
                f"{self.rollout_mismatch_std}."
            )
        if self.rollout_mismatch != "none" and self.use_vllm:
            raise ValueError(
                "`rollout_mismatch` simulates an inference engine for transformers generation; with `use_vllm=True` "
                "the mismatch is real. Set rollout_mismatch='none' or use_vllm=False."
            )

        if not isinstance(self.perturb_sigma_init, (int, float)) or not math.isfinite(self.perturb_sigma_init):
            raise ValueError(f"`perturb_sigma_init` must be a finite number >= 0, got {self.perturb_sigma_init!r}.")
        if self.perturb_sigma_init < 0:
            raise ValueError(
                f"`perturb_sigma_init` is a standard deviation and must be >= 0, got {self.perturb_sigma_init}."
            )
        if self.perturb_lr <= 0:
            raise ValueError(f"`perturb_lr` must be > 0, got {self.perturb_lr}.")
        if self.dual_clip_c is not None and self.dual_clip_c <= 1.0:
            raise ValueError(
                f"`dual_clip_c` must be > 1 (it caps the ratio of negative-advantage tokens at c), or None to "
                f"disable dual clipping; got {self.dual_clip_c}."
            )
        if self.log_ratio_clamp <= 0:
            raise ValueError(f"`log_ratio_clamp` must be > 0, got {self.log_ratio_clamp}.")
        if self.mis_threshold <= 1.0:
            raise ValueError(
                f"`mis_threshold` must be > 1 (weights outside [1/C, C] are masked or truncated), got "
                f"{self.mis_threshold}."
            )
        self._validate_rollout_correction_fields()
        if self.correction.perturbed and self.perturb_sigma_learnable and self.perturb_sigma_init == 0:
            logger.warning(
                "perturb_sigma_init=0 with perturb_sigma_learnable=True: sigma = exp(log_sigma) = 0 has zero "
                "gradient and will stay 0. Use a small positive value (the paper's multi-turn setting uses 1e-6)."
            )

        correction = self.off_policy_correction
        if self.correction.is_trl_loss:
            if self.vllm_importance_sampling_correction is None:
                self.vllm_importance_sampling_correction = True  # TRL's default
            return

        # From here on, a correction of this package replaces TRL's.
        if self.vllm_importance_sampling_correction:
            raise ValueError(
                f"`vllm_importance_sampling_correction=True` would stack TRL's vLLM importance-sampling weight on top "
                f"of `off_policy_correction={correction!r}`, which already corrects for the rollout policy. Leave it "
                "unset (or False), or set `off_policy_correction='none'` to use TRL's correction alone."
            )
        if self.vllm_importance_sampling_correction is None:
            logger.info(
                "off_policy_correction=%r replaces TRL's vLLM importance-sampling correction: "
                "vllm_importance_sampling_correction is set to False.",
                correction,
            )
        self.vllm_importance_sampling_correction = False

        if not self.correction.allows_loss_type(self.loss_type):
            raise ValueError(
                f"`loss_type='vespo'` with `off_policy_correction={correction!r}` is not defined: VESPO's gamma weight "
                "of the sequence ratio is itself its off-policy correction, and a MIS/TIS weight on top would count the "
                "rollout mismatch twice. Use vespo with 'alp', 'bypass', 'ppo' or 'none'."
            )
