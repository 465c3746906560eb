"""`alp-trl vllm-serve MODEL`: a vLLM server that `vllm_mode: server` training can generate from and sync weights to.

It runs `vllm serve` with what TRL's server mode needs (`VLLM_SERVER_DEV_MODE=1` for the weight-update endpoints,
`--logprobs-mode processed_logprobs` so the returned log-probs are those of the distribution actually sampled) and a
weight-transfer backend: `nccl` (TRL's, CUDA trainers) or `alp_file` (this package's, for trainers without CUDA:
`alp_trl.vllm_weight_transfer`). On a machine without CUDA it runs vLLM's CPU build eagerly with
`VLLM_CPU_KVCACHE_SPACE` GiB of KV cache (2 unless set).

    alp-trl vllm-serve embedded:smollm2-135m-instruct --port 8000 --dtype float32
    alp-trl vllm-serve Qwen/Qwen2.5-Math-1.5B --weight-transfer nccl -- --data-parallel-size 2

Arguments after `--` go to `vllm serve` unchanged.
"""

import argparse
import json
import os
import sys


WEIGHT_TRANSFERS = ("auto", "alp_file", "nccl")


def serve_command(args: argparse.Namespace, model_path: str, has_cuda: bool) -> tuple[list[str], dict[str, str]]:
    """The `vllm serve` command line and environment for these arguments."""
    from .vllm_engine import DEFAULT_CPU_KVCACHE_GIB
    from .vllm_weight_transfer import BACKEND

    transfer = args.weight_transfer if args.weight_transfer != "auto" else ("nccl" if has_cuda else BACKEND)
    # vLLM's OpenAI server entry point; not the `vllm serve` CLI, which looks up the version of a distribution named
    # `vllm` and so fails under the CPU build (distributed as `vllm-cpu`)
    command = [
        sys.executable,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        model_path,
        "--host",
        args.host,
        "--port",
        str(args.port),
        "--dtype",
        args.dtype,
        "--logprobs-mode",
        "processed_logprobs",
        "--weight-transfer-config",
        json.dumps({"backend": transfer}),
        "--seed",
        str(args.seed),
    ]
    if args.max_model_len is not None:
        command += ["--max-model-len", str(args.max_model_len)]
    env = dict(os.environ, VLLM_SERVER_DEV_MODE="1")
    if not has_cuda:
        command.append("--enforce-eager")
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", str(DEFAULT_CPU_KVCACHE_GIB))
    plugins = env.get("VLLM_PLUGINS")
    if transfer == BACKEND and plugins is not None and "alp_trl" not in plugins.split(","):
        env["VLLM_PLUGINS"] = ",".join(p for p in (plugins, "alp_trl") if p)  # the backend lives in our plugin
    return command + list(args.vllm_args), env


def main(argv=None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = []
    if "--" in argv:
        extra = argv[argv.index("--") + 1 :]
        argv = argv[: argv.index("--")]
    parser = argparse.ArgumentParser(
        prog="alp-trl vllm-serve", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("model", help="model folder, Hub id, or embedded:smollm2-135m-instruct")
    parser.add_argument("--host", default="0.0.0.0")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    parser.add_argument("--max-model-len", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--weight-transfer",
        default="auto",
        choices=list(WEIGHT_TRANSFERS),
        help="auto: nccl where CUDA is available (TRL's), alp_file elsewhere (files in a shared directory)",
    )
    args = parser.parse_args(argv)
    args.vllm_args = extra

    from .vllm_engine import vllm_unavailable_reason

    reason = vllm_unavailable_reason()
    if reason is not None:
        parser.error(reason)
    import torch

    from .model_loading import resolve_model_path

    command, env = serve_command(args, resolve_model_path(args.model), torch.cuda.is_available())
    print("running:", " ".join(command[1:]), flush=True)
    os.execve(sys.executable, command, env)


if __name__ == "__main__":
    main()
