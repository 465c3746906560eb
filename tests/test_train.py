"""The entry point's parts (`alp_trl.train`): recipes parse into the config classes, bad keys and values are named,
the command line overrides the recipe, the data mixture, the newest complete checkpoint, the recipe text without
tokens. (End-to-end runs through `accelerate launch`: tests/test_train_entry.py.)"""

import glob
import os
from pathlib import Path

import pytest
import yaml

from alp_trl import ALPConfig
from alp_trl.train import ALPScriptArguments, last_checkpoint, make_parser, parse_args, recipe_text


REPO = Path(__file__).resolve().parents[1]
RECIPES = sorted(glob.glob(str(REPO / "recipes" / "**" / "*.yaml"), recursive=True))


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


def test_incomplete_checkpoints_are_skipped(tmp_path):
    for step, complete in ((2, True), (4, True), (6, False)):
        folder = tmp_path / f"checkpoint-{step}"
        folder.mkdir()
        if complete:
            (folder / "trainer_state.json").write_text("{}")
    (tmp_path / "checkpoint-x").mkdir()
    assert last_checkpoint(str(tmp_path)) == os.path.join(str(tmp_path), "checkpoint-4")
    assert last_checkpoint(str(tmp_path / "missing")) is None


def test_recipe_text_redacts_tokens(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model_name_or_path: x\nhub_token: hf_abc\n")
    text = recipe_text(["--config", str(recipe), "--hub_token", "hf_def", "--max_steps", "3", "--hub_token=hf_ghi"])
    assert "hf_abc" not in text and "hf_def" not in text and "hf_ghi" not in text
    assert "model_name_or_path: x" in text and "--max_steps 3" in text
