"""Test doubles shared by the tests and the launched test workers (tests only, never part of the installed package):
a loss that turns non-finite, stand-ins for `model.generate`, a fake vLLM engine behind TRL's real `VLLMGeneration`,
and the switch that lets accelerate take its DDP / FSDP / DeepSpeed paths in CPU processes. The last two patch TRL /
accelerate process-wide.
"""

import torch
from transformers import AutoModelForCausalLM


class NaNBackward(torch.autograd.Function):
    """Identity forward, NaN backward: what cuDNN's faulty SDPA backward does (a finite loss, NaN gradients)."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * float("nan")


def poison_loss(loss: torch.Tensor, kind: str | None) -> torch.Tensor:
    """`"value"`: the loss value becomes NaN, its gradients stay finite; `"grad"`: the value stays finite, every
    gradient becomes NaN; `None`: unchanged."""
    if kind == "value":
        return loss + (float("nan") - loss.detach())
    if kind == "grad":
        return NaNBackward.apply(loss)
    return loss


class ScriptedGenerate:
    """Stands in for `model.generate`: what each row says is chosen by `script(row, prompt_text)`, and the tokens are
    teacher-forced through the model's own forward pass one step at a time, as `generate` calls it (a prefill call,
    then one call per new token with the cache, that token being `input_ids`), so forward hooks see what they see in
    `generate`. The returned ids are `generate`'s: prompt, then the completion, padded after EOS."""

    def __init__(self, model, tokenizer, script):
        self.model, self.tokenizer, self.script = model, tokenizer, script
        self.calls = 0

    @torch.no_grad()
    def __call__(self, input_ids, attention_mask, generation_config=None, **kwargs):
        self.calls += 1
        texts = self.tokenizer.batch_decode(input_ids, skip_special_tokens=False)
        limit = generation_config.max_new_tokens if generation_config is not None else 64
        targets = [
            self.tokenizer(self.script(row, text), add_special_tokens=False).input_ids[:limit]
            for row, text in enumerate(texts)
        ]
        pad = self.tokenizer.pad_token_id
        ids, mask = input_ids, attention_mask
        past = self.model(input_ids=ids, attention_mask=mask, use_cache=True).past_key_values
        for step in range(max(len(t) for t in targets)):
            column = torch.tensor([[t[step] if step < len(t) else pad] for t in targets], device=ids.device)
            ids = torch.cat([ids, column], dim=1)
            mask = torch.cat([mask, torch.ones_like(column)], dim=1)
            # like `generate` with a cache: only the new token goes in, the last in `input_ids`
            past = self.model(
                input_ids=column, attention_mask=mask, past_key_values=past, use_cache=True
            ).past_key_values
        return ids


class GenerateWithoutHookedForward:
    """A `generate` that samples from a separate copy of the model: the policy's own forward never runs (a custom or
    wrapped backend that forward hooks on the policy cannot see)."""

    def __init__(self, engine):
        self.engine = engine

    def __call__(self, **kwargs):
        return self.engine.generate(**kwargs)


class GenerateThenAlter:
    """Runs the real `generate`, then alters its output the way a wrapper could: `"batch"` generates for every prompt
    twice and returns the first copy; `"longer"` appends a token that was never decoded; `"tokens"` replaces the first
    completion token of row 0."""

    def __init__(self, generate, how: str, prompt_length_of=lambda kwargs: kwargs["input_ids"].size(1)):
        self.generate, self.how, self.prompt_length_of = generate, how, prompt_length_of

    def __call__(self, **kwargs):
        if self.how == "batch":
            doubled = {k: torch.cat([v, v]) if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
            return self.generate(**doubled)[: kwargs["input_ids"].size(0)]
        out = self.generate(**kwargs)
        if self.how == "longer":
            return torch.cat([out, out[:, -1:]], dim=1)
        if self.how == "tokens":
            out = out.clone()
            start = self.prompt_length_of(kwargs)
            out[0, start] = (out[0, start] + 1) % 50 + 5
            return out
        raise ValueError(f"`how` got {self.how!r}; allowed values are ['batch', 'longer', 'tokens'].")


class FakeVLLMEngine:
    """Stands in for vLLM's colocated `LLM` in `trl.generation.vllm_generation.VLLMGeneration` on a CPU.

    It holds its own copy of the policy ("the engine's weights"), receives weights through the same
    `llm_engine.model_executor.driver_worker.model_runner.model.load_weights([(name, tensor)])` call TRL's
    `sync_weights` makes (an unknown name raises, as in vLLM), and samples with Gaussian noise of std `logit_noise` on
    its logits, so that its log-probs differ from the trainer's as a real engine's do.
    """

    def __init__(self, model, logit_noise: float = 0.5, nan_every: int = 0):
        # A fresh model of the same architecture with the policy's (base) weights: no hooks, no LoRA, no sigma, and
        # none of TRL's patches of the trainer's model.
        state = {
            key.replace(".base_layer", ""): value
            for key, value in model.state_dict().items()
            if "lora_" not in key and "alp_perturbation" not in key
        }
        self.engine_model = AutoModelForCausalLM.from_config(model.config, dtype=torch.float32).eval()
        missing, unexpected = self.engine_model.load_state_dict(state, strict=False)
        if unexpected or [k for k in missing if "lm_head" not in k]:
            raise ValueError(f"engine weights do not match the policy: missing {missing}, unexpected {unexpected}")
        self.logit_noise = logit_noise
        self.nan_every = nan_every  # report every n-th log-prob as None (vLLM's NaN)
        self.loaded_names: list[str] = []
        self.returned_logprobs: list[list[float | None]] = []
        self.llm_engine = self  # llm_engine.model_executor.driver_worker.model_runner.model.load_weights
        self.model_executor = self.driver_worker = self.model_runner = self.model = self

    def load_weights(self, weights):
        params = dict(self.engine_model.named_parameters())
        for name, tensor in weights:
            if name not in params:
                raise KeyError(f"vLLM engine has no weight named {name!r}")
            with torch.no_grad():
                params[name].copy_(tensor)
            self.loaded_names.append(name)

    def reset_prefix_cache(self):
        pass

    def generate(
        self,
        prompts,
        images=None,
        num_generations=1,
        profiler=None,
        *,
        temperature=1.0,
        max_completion_length=8,
        pad_token_id=0,
        eos_token_id=None,
    ):
        """One completion per prompt (TRL's colocate contract): (prompt_ids, completion_ids, logprobs, token_ids)."""
        from alp_trl.rollout_logprobs import sample_with_logprobs

        width = max(len(p) for p in prompts)
        ids = torch.tensor([[pad_token_id] * (width - len(p)) + list(p) for p in prompts])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
        completions, logprobs = sample_with_logprobs(
            self.engine_model,
            ids,
            mask,
            max_completion_length,
            temperature,
            eos_token_id,
            pad_token_id,
            "logit_noise",
            self.logit_noise,
            seed=len(self.loaded_names),
        )
        if self.nan_every:
            logprobs = [
                [None if (i + j) % self.nan_every == 0 else v for j, v in enumerate(seq)]
                for i, seq in enumerate(logprobs)
            ]
        self.returned_logprobs = logprobs
        return [list(p) for p in prompts], completions, [[[v] for v in seq] for seq in logprobs], None


def attach_fake_vllm(trainer, logit_noise: float = 0.5, nan_every: int = 0) -> FakeVLLMEngine:
    """Make a trainer built with `use_vllm=False` generate through TRL's real `VLLMGeneration` (colocate mode, its
    own `sync_weights`) backed by a `FakeVLLMEngine`; returns the engine."""
    import types

    from trl.generation.vllm_generation import VLLMGeneration

    engine = FakeVLLMEngine(
        trainer.model.get_base_model() if hasattr(trainer.model, "get_base_model") else trainer.model,
        logit_noise,
        nan_every,
    )
    generation = object.__new__(VLLMGeneration)  # TRL's class without its vLLM-importing __init__
    generation.__dict__.update(
        mode="colocate",
        enable_sleep_mode=False,
        accelerator=trainer.accelerator,
        model=trainer.model,
        _dist=trainer._dist,
        llm=engine,
        _weight_metadata=None,
    )
    tokenizer = trainer.processing_class

    def generate(self, prompts, images, num_generations, profiler=None):
        return engine.generate(
            prompts,
            images,
            num_generations,
            temperature=trainer.temperature,
            max_completion_length=trainer.args.max_completion_length,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )

    generation.generate = types.MethodType(generate, generation)
    trainer.vllm_generation = generation
    trainer.use_vllm = True
    trainer._last_loaded_step = -1
    return engine


def emulate_gpu_launch_on_cpu() -> str:
    """Tests only: let accelerate take its DDP, FSDP2 or DeepSpeed code path in CPU processes (gloo).

    Call this first thing in a process started by `accelerate launch --config_file accelerate_configs/{fsdp,zero2,
    zero3,ddp}.yaml` on a machine without a GPU; it returns `"fsdp"`, `"deepspeed"` or `"ddp"` (from the launcher's
    environment). accelerate enables FSDP and DeepSpeed only where it finds an accelerator device, while FSDP2's
    `fully_shard` and DeepSpeed's ZeRO (with its CPU accelerator) run on CPU over gloo. So:

    - DDP: the processes run as accelerate's multi-CPU data parallel (DDP over gloo) instead of finding no GPU and
      training alone;
    - FSDP: the same, and the accelerator state is switched to FSDP with the plugin accelerate built from the
      launcher's environment;
    - DeepSpeed: where accelerate finds no device backend for a launched process, it is given gloo, so that it counts
      the ranks and DeepSpeed initialises its own process group on it;
    - all: transformers' "bf16 needs a GPU" check is lifted, so that the configs' bf16 mixed precision is used.

    Nothing here touches a model class: the real `fsdp2_prepare_model` / `deepspeed.initialize`, mixed precision,
    gradient clipping, ZeRO-3 parameter gathering and the configs' saving paths all run.
    """
    import os

    import accelerate.state
    import torch.distributed as dist
    import transformers.training_args
    from accelerate.utils import DistributedType

    transformers.training_args.is_torch_bf16_gpu_available = lambda *args, **kwargs: True
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        partial_state = accelerate.state.PartialState
        if not getattr(partial_state, "_alp_on_cpu", False):
            original_prepare_backend = partial_state._prepare_backend

            def prepare_backend(self, cpu=False, sagemaker_dp=False, backend=None):
                backend, distributed_type = original_prepare_backend(self, cpu, sagemaker_dp, backend)
                if backend is None and not cpu and int(os.environ.get("LOCAL_RANK", -1)) != -1:
                    return "gloo", DistributedType.MULTI_CPU  # DeepSpeed takes over the type once it is initialised
                return backend, distributed_type

            partial_state._prepare_backend = prepare_backend
            partial_state._alp_on_cpu = True
        return "deepspeed"
    os.environ["ACCELERATE_USE_CPU"] = "true"  # rank / world size from the launcher, gloo collectives
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() != "true":
        return "ddp"  # a multi-GPU config: accelerate's multi-CPU data parallel is the same DDP wrapper over gloo
    if not dist.is_initialized():
        dist.init_process_group("gloo", rank=int(os.environ["RANK"]), world_size=int(os.environ["WORLD_SIZE"]))
    state_class = accelerate.state.AcceleratorState
    if getattr(state_class, "_alp_on_cpu", False):
        return "fsdp"
    original_init = state_class.__init__
    plugin_holder = {}

    def init(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        plugin = kwargs.get("fsdp_plugin") or plugin_holder.get("plugin")
        if plugin is None:
            return
        if "plugin" not in plugin_holder:
            plugin_holder["plugin"] = plugin
            if self._mixed_precision != "no":
                plugin.set_mixed_precision(self._mixed_precision)
        # AcceleratorState re-reads PartialState's fields on every construction: re-apply each time
        self.distributed_type = DistributedType.FSDP
        self.fsdp_plugin = plugin

    state_class.__init__ = init
    state_class._alp_on_cpu = True
    return "fsdp"
