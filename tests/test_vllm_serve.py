"""`alp-trl vllm-serve` (`alp_trl.vllm_serve`): the server command. (The engine options, the errors raised before any
model loads, and the real engine: tests/test_vllm_engine.py.)"""

import argparse
import json

import pytest

from alp_trl.vllm_serve import serve_command


def _args(**overrides):
    values = dict(
        host="127.0.0.1",
        port=8123,
        dtype="float32",
        max_model_len=512,
        seed=3,
        weight_transfer="auto",
        vllm_args=["--max-num-seqs", "8"],
    )
    return argparse.Namespace(**{**values, **overrides})


def _flag(command, name):
    return command[command.index(name) + 1]


@pytest.mark.parametrize("has_cuda", [False, True])
def test_serve_command(monkeypatch, has_cuda):
    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE", raising=False)
    monkeypatch.setenv("VLLM_PLUGINS", "other")
    command, env = serve_command(_args(), "/models/m", has_cuda=has_cuda)
    assert command[1:3] == ["-m", "vllm.entrypoints.openai.api_server"] and _flag(command, "--model") == "/models/m"
    assert _flag(command, "--logprobs-mode") == "processed_logprobs" and env["VLLM_SERVER_DEV_MODE"] == "1"
    assert _flag(command, "--dtype") == "float32" and _flag(command, "--max-model-len") == "512"
    assert _flag(command, "--seed") == "3" and command[-2:] == ["--max-num-seqs", "8"]
    backend = json.loads(_flag(command, "--weight-transfer-config"))["backend"]
    if has_cuda:  # TRL's NCCL engine, vLLM's own defaults
        assert backend == "nccl" and "--enforce-eager" not in command and "VLLM_CPU_KVCACHE_SPACE" not in env
        assert env["VLLM_PLUGINS"] == "other"
    else:  # the file channel lives in this package's vLLM plugin, which must stay allowed
        assert backend == "alp_file" and "--enforce-eager" in command and env["VLLM_CPU_KVCACHE_SPACE"] == "2"
        assert env["VLLM_PLUGINS"] == "other,alp_trl"
    command, _ = serve_command(_args(weight_transfer="alp_file"), "/models/m", has_cuda=True)
    assert json.loads(_flag(command, "--weight-transfer-config"))["backend"] == "alp_file"
