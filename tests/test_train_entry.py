"""The training entry point end to end: the accelerate configs, and runs through `accelerate launch` (trained, killed
and resumed, refused when the processes do not form one run). (Recipe parsing and the entry point's parts:
tests/test_train.py; `alp-trl compare` end to end: tests/test_compare.py.)"""

import glob
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from .helpers import accelerate_launch, write_tiny_recipe


REPO = Path(__file__).resolve().parents[1]
ACCELERATE_CONFIGS = sorted(glob.glob(str(REPO / "accelerate_configs" / "*.yaml")))


EXPECTED_ACCELERATE_STATE = {
    "cpu.yaml": ("NO", {"use_cpu": True, "num_processes": 1}),
    "ddp.yaml": ("MULTI_GPU", {"mixed_precision": "bf16"}),
    "zero2.yaml": ("DEEPSPEED", {"deepspeed_config": {"zero_stage": 2}}),
    "zero3.yaml": ("DEEPSPEED", {"deepspeed_config": {"zero_stage": 3, "zero3_init_flag": True}}),
    "fsdp.yaml": ("FSDP", {"fsdp_config": {"fsdp_version": 2, "fsdp_state_dict_type": "FULL_STATE_DICT"}}),
}


def test_every_accelerate_config_is_known():
    assert sorted(Path(p).name for p in ACCELERATE_CONFIGS) == sorted(EXPECTED_ACCELERATE_STATE)


@pytest.mark.parametrize("config", ACCELERATE_CONFIGS, ids=lambda p: Path(p).name)
def test_accelerate_configs_load_into_the_intended_state(config):
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.utils import DistributedType

    loaded = load_config_from_file(config)
    distributed_type, fields = EXPECTED_ACCELERATE_STATE[Path(config).name]
    assert loaded.distributed_type == DistributedType[distributed_type]
    for key, value in fields.items():
        actual = getattr(loaded, key)
        if isinstance(value, dict):
            assert {k: actual[k] for k in value} == value, key
        else:
            assert actual == value, key


def _run_entry(tmp_path, model_dir, data, extra: dict):
    path = write_tiny_recipe(
        tmp_path,
        model_dir,
        data,
        max_steps=2,
        save_strategy="steps",
        save_steps=1,
        bf16=False,
        use_cpu=True,
        perturb_sigma_init=0.05,
        **extra,
    )
    accelerate_launch("cpu.yaml", ["-m", "alp_trl.train", "--config", str(path)], tmp_path, timeout=600)
    return tmp_path / "run"


@pytest.mark.slow
@pytest.mark.parametrize("use_peft", [False, True])
def test_entry_point_trains_end_to_end_through_accelerate(tmp_path, tiny_run_assets, use_peft):
    model_dir, data = tiny_run_assets
    extra = (
        {"use_peft": True, "lora_r": 4, "lora_alpha": 8, "lora_target_modules": ["q_proj", "v_proj"]}
        if use_peft
        else {"avg_at_k_steps": 1, "avg_at_k_limit": 2, "avg_at_k_k": 2, "avg_at_k_max_new_tokens": 4}
    )
    out = _run_entry(tmp_path, model_dir, data, extra)
    weights = "adapter_model.safetensors" if use_peft else "model.safetensors"
    for name in (
        weights,
        "alp_perturbation.safetensors",
        "alp_perturbation.json",
        "metrics.jsonl",
        "plots/training_curves.png",
        "README.md",
        "checkpoint-2/alp_perturbation.safetensors",
    ):
        assert (out / name).exists(), name
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "alp/sigma_mean" in r]
    assert [r["step"] for r in steps] == [1, 2]
    assert "rewards/accuracy/mean" in steps[0] and "rewards/length/mean" in steps[0]
    if not use_peft:
        assert all(0 <= r["eval/avg@2"] <= r["eval/pass@2"] <= 1 for r in steps), "in-training avg@k every step"
    assert "ALP settings" in (out / "README.md").read_text()
    # the run trained: the saved weights differ from the model it started from (LoRA: B left its zero init)
    saved = load_file(str(out / weights))
    if use_peft:
        assert any(t.abs().sum() > 0 for name, t in saved.items() if "lora_B" in name)
    else:
        start = load_file(str(model_dir / "model.safetensors"))
        assert any(not torch.equal(saved[name], start[name]) for name in start if name in saved)


@pytest.mark.slow
def test_run_killed_with_sigkill_resumes_from_its_last_complete_checkpoint(tmp_path, tiny_run_assets):
    import signal
    import time

    model_dir, data = tiny_run_assets
    out = tmp_path / "run"
    recipe = {
        "model_name_or_path": str(model_dir),
        "dataset_name": str(data),
        "problem_column": "question",
        "answer_column": "solution",
        "output_dir": str(out),
        "per_device_train_batch_size": 4,
        "num_generations": 4,
        "max_completion_length": 8,
        "max_steps": 60,
        "save_strategy": "steps",
        "save_steps": 2,
        "logging_steps": 1,
        "report_to": "none",
        "bf16": False,
        "use_cpu": True,
        "perturb_sigma_init": 0.05,
        "plot": False,
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    command = [sys.executable, "-m", "alp_trl.train", "--config", str(path)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    process = subprocess.Popen(
        command, env=env, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    deadline = time.time() + 300
    while not (out / "checkpoint-4" / "trainer_state.json").exists():
        assert process.poll() is None and time.time() < deadline, "the run ended before it could be killed"
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert not (out / "model.safetensors").exists(), "killed before the end"

    resumed = subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "Resuming from the newest checkpoint" in resumed.stdout + resumed.stderr
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    train_steps = [s for s in steps if s <= 60]
    assert sorted(set(train_steps)) == list(range(1, 61)), "every step logged once across the kill"
    assert (out / "model.safetensors").exists() and (out / "alp_perturbation.safetensors").exists()


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU, ddp.yaml forms a real distributed run")
def test_processes_that_do_not_form_one_run_are_an_error(tmp_path, tiny_run_assets):
    """ddp.yaml with 2 processes on a machine without a GPU: two lone runs would overwrite each other; the entry point
    stops before loading a model and says how to run on CPUs. With `--use_cpu true` the same launch trains as DDP."""
    model_dir, data = tiny_run_assets
    recipe = write_tiny_recipe(tmp_path, model_dir, data, max_completion_length=4, max_steps=1, bf16=False)
    command = ["-m", "alp_trl.train", "--config", str(recipe)]
    result = accelerate_launch("ddp.yaml", command, tmp_path, 2, expect_success=False)
    assert result.returncode != 0
    assert "do not form one distributed run" in result.stderr and "--use_cpu true" in result.stderr
    assert not (tmp_path / "run" / "metrics.jsonl").exists(), "stopped before training"
    accelerate_launch("ddp.yaml", [*command, "--use_cpu", "true"], tmp_path, 2)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert records[0]["num_tokens"] > 0 and len([r for r in records if "loss" in r]) == 1
