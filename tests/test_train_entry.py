"""The training entry point: recipes parse, bad keys and values are named, end-to-end runs through accelerate."""

import glob
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from alp_trl import ALPConfig
from alp_trl.train import ALPScriptArguments, make_parser, parse_args

from .conftest import accelerate_launch, tiny_recipe


REPO = Path(__file__).resolve().parents[1]
RECIPES = sorted(glob.glob(str(REPO / "recipes" / "**" / "*.yaml"), recursive=True))
ACCELERATE_CONFIGS = sorted(glob.glob(str(REPO / "accelerate_configs" / "*.yaml")))


def test_there_are_recipes_for_the_paper_and_the_demo():
    names = {Path(p).relative_to(REPO / "recipes").as_posix() for p in RECIPES}
    for expected in (
        "SmolLM2-135M-Instruct/alp/config_demo.yaml",
        "Qwen2.5-Math-1.5B/alp/config_token_alp.yaml",
        "Qwen2.5-Math-1.5B/alp/config_seq_alp.yaml",
        "Qwen2.5-Math-1.5B/alp/config_seq_alp_lora.yaml",
        "Qwen2.5-Math-1.5B/alp/config_seq_alp_vllm_server.yaml",
        "Qwen2.5-Math-1.5B/grpo/config_grpo.yaml",
        "Qwen2.5-Math-1.5B/bypass/config_seq_bypass.yaml",
        "Qwen2.5-Math-1.5B/mis/config_token_mis.yaml",
        "Qwen2.5-Math-1.5B/mis/config_seq_mis.yaml",
        "Qwen2.5-0.5B-Instruct/alp/config_gsm8k.yaml",
    ):
        assert expected in names


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: Path(p).relative_to(REPO / "recipes").as_posix())
def test_every_recipe_parses_into_the_config_classes(recipe):
    with open(recipe) as f:
        raw = yaml.safe_load(f)
    # GPU recipes ask for bf16, which TrainingArguments refuses on a CPU-only machine: validate them on the CPU.
    script_args, training_args, model_args = make_parser().parse_args_and_config(
        args=["--config", recipe, "--use_cpu", "true"]
    )
    assert isinstance(script_args, ALPScriptArguments) and isinstance(training_args, ALPConfig)
    assert model_args.model_name_or_path == raw["model_name_or_path"]
    assert training_args.off_policy_correction == raw.get("off_policy_correction", "alp")
    assert training_args.output_dir.endswith(Path(raw["output_dir"]).name)
    for key, value in raw.items():  # every key of the recipe landed in one of the three dataclasses
        holders = [a for a in (script_args, training_args, model_args) if hasattr(a, key)]
        assert holders, key
        if key in ("perturb_layers", "lora_target_modules", "report_to"):
            continue  # normalised on parsing
        if not isinstance(value, (dict, list)):
            assert getattr(holders[0], key) == value or str(getattr(holders[0], key)) == str(value), key


def test_unknown_recipe_key_is_an_error_naming_it(tmp_path, capsys):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text("model_name_or_path: x\ndataset_name: builtin:arithmetic\nperturb_sigmaa: 0.1\n")
    with pytest.raises(SystemExit) as exit_info:
        parse_args(["--config", str(recipe)])
    assert exit_info.value.code == 2
    assert "perturb_sigmaa" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("override", "named"),
    [
        (["--perturb_layers", "bottom"], "perturb_layers"),
        (["--off_policy_correction", "grpo"], "off_policy_correction"),
        (["--perturb_sigma_init", "-1"], "perturb_sigma_init"),
        (["--reward_funcs", "accuracy", "bleu"], "reward_funcs"),
        (["--not_a_field", "3"], "not_a_field"),
    ],
)
def test_bad_command_line_value_is_an_error_naming_the_field(override, named, capsys):
    recipe = REPO / "recipes" / "SmolLM2-135M-Instruct" / "alp" / "config_demo.yaml"
    with pytest.raises(SystemExit) as exit_info:
        parse_args(["--config", str(recipe), *override])
    assert exit_info.value.code != 0
    assert named in capsys.readouterr().err


def test_command_line_overrides_the_recipe():
    recipe = REPO / "recipes" / "SmolLM2-135M-Instruct" / "alp" / "config_demo.yaml"
    script_args, training_args, _ = parse_args(
        ["--config", str(recipe), "--perturb_sigma_init", "0.05", "--perturb_layers", "0,3", "--max_steps", "3"]
    )
    assert training_args.perturb_sigma_init == 0.05 and training_args.perturb_layers == [0, 3]
    assert training_args.max_steps == 3 and script_args.dataset_name == "builtin:arithmetic"


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


@pytest.fixture(scope="module")
def tiny_run_assets(tmp_path_factory, _base_models, tokenizer):
    root = tmp_path_factory.mktemp("entry")
    model_dir = root / "tiny-qwen2"
    _base_models["qwen2"].save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    data = root / "problems.jsonl"
    with open(data, "w") as f:
        for i in range(16):
            f.write(json.dumps({"question": f"What is {i} + 2?", "solution": f"#### {i + 2}"}) + "\n")
    return model_dir, data


def _write_recipe(tmp_path, model_dir, data, **overrides) -> Path:
    """`tmp_path/recipe.yaml`: the tiny model on the `tiny_run_assets` problems, output in `tmp_path/run`."""
    recipe = tiny_recipe(
        model_dir, tmp_path / "run", dataset_name=str(data), problem_column="question", answer_column="solution"
    )
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump({**recipe, **overrides}))
    return path


def _run_entry(tmp_path, model_dir, data, extra: dict):
    path = _write_recipe(
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
        assert all("eval/avg@2" in r for r in steps), "in-training avg@k logged every step"
    assert "ALP settings" in (out / "README.md").read_text()


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
    recipe = _write_recipe(tmp_path, model_dir, data, max_completion_length=4, max_steps=1, bf16=False)
    command = ["-m", "alp_trl.train", "--config", str(recipe)]
    result = accelerate_launch("ddp.yaml", command, tmp_path, 2, expect_success=False)
    assert result.returncode != 0
    assert "do not form one distributed run" in result.stderr and "--use_cpu true" in result.stderr
    assert not (tmp_path / "run" / "metrics.jsonl").exists(), "stopped before training"
    accelerate_launch("ddp.yaml", [*command, "--use_cpu", "true"], tmp_path, 2)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert records[0]["num_tokens"] > 0 and len([r for r in records if "loss" in r]) == 1


@pytest.mark.slow
def test_compare_runs_the_new_modes_and_tabulates_every_method(tmp_path, tiny_run_assets, monkeypatch):
    """`alp-trl compare` with the new correction modes: one run per method through the entry point, a table row per
    method with the reward and the train-rollout KL read from its metrics."""
    from alp_trl import compare

    model_dir, data = tiny_run_assets
    path = _write_recipe(tmp_path, model_dir, data, bf16=False, use_cpu=True, logging_steps=1)
    monkeypatch.setenv("PYTHONPATH", str(REPO))
    histories = compare.main(
        [
            "--recipe",
            str(path),
            "--out",
            str(tmp_path / "compare"),
            "--methods",
            "Seq-TIS",
            "GRPO",
            "GRPO (TRL)",
            "--max-steps",
            "1",
        ]
    )
    assert set(histories) == {"Seq-TIS", "GRPO", "GRPO (TRL)"}
    assert {p.name for p in (tmp_path / "compare").iterdir() if p.is_dir()} == {"seq_tis", "grpo", "grpo_trl"}
    table = (tmp_path / "compare" / "compare.md").read_text().splitlines()
    rows = {line.split("|")[1].strip(): line for line in table[2:]}
    assert set(rows) == set(histories)
    assert "n/a" not in rows["Seq-TIS"].split("|")[5], "the train-rollout KL column is filled"
    assert histories["Seq-TIS"][0]["alp/tis_truncated_frac"] >= 0.0
    assert "rollout_mismatch/kl_k3" in histories["GRPO (TRL)"][0], "metrics-only mode of plain GRPO"


def test_paper_recipes_train_on_the_guru_and_openr1_mixture():
    for path in RECIPES:
        if "Qwen2.5-Math-1.5B" not in path:
            continue
        script_args, _, _ = parse_args(["--config", path, "--use_cpu", "true"])
        ids = [d["id"] for d in script_args.dataset_mixture["datasets"]]
        assert ids == ["LLM360/guru-RL-92k", "weqweasdas/from_default_filtered_openr1_with_scores"], path
        assert script_args.dataset_name is None


def test_dataset_mixture_from_a_recipe_and_the_command_line(tmp_path, capsys):
    from alp_trl.train import load_datasets

    recipe = tmp_path / "mix.yaml"
    recipe.write_text(
        yaml.safe_dump(
            {
                "model_name_or_path": "unused",
                "output_dir": str(tmp_path / "out"),
                "use_cpu": True,
                "bf16": False,
                "dataset_mixture": {
                    "datasets": [
                        {"id": "builtin:arithmetic", "samples": 6},
                        {"id": "builtin:arithmetic", "split": "test", "samples": 4},
                    ],
                    "seed": 3,
                },
            }
        )
    )
    script_args, training_args, _ = parse_args(["--config", str(recipe)])
    train, evaluation = load_datasets(script_args, training_args, conversational=True)
    assert len(train) == 10 and evaluation is None and set(train["source"]) == {"builtin:arithmetic"}
    assert script_args.dataset_label == "builtin:arithmetic + builtin:arithmetic"
    with pytest.raises(SystemExit) as exit_info:
        parse_args(["--config", str(recipe), "--dataset_mixture", '{"datasets": [{"id": "a", "weight": 3}]}'])
    assert exit_info.value.code == 2 and "dataset_mixture.datasets[0].weight" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_args(["--config", str(recipe), "--dataset_name", "builtin:arithmetic"])
    assert "either `dataset_name` or `dataset_mixture`" in capsys.readouterr().err
