"""`alp-trl eval`: the pass@k estimator by hand, and an offline end-to-end evaluation on a tiny model."""

import json
import math

import pytest

from alp_trl.evaluate import load_problems, pass_at_k, summarize
from alp_trl.evaluate import main as eval_main


def test_pass_at_k_hand_values():
    assert pass_at_k(4, 0, 1) == 0.0
    assert pass_at_k(4, 4, 4) == 1.0
    assert pass_at_k(4, 1, 1) == pytest.approx(0.25)
    assert pass_at_k(4, 1, 2) == pytest.approx(1 - math.comb(3, 2) / math.comb(4, 2))  # 0.5
    assert pass_at_k(5, 2, 3) == pytest.approx(1 - 1 / 10)  # 1 - C(3,3)/C(5,3)
    assert pass_at_k(3, 2, 2) == 1.0  # any 2 of 3 contain a correct one
    with pytest.raises(ValueError, match="pass@5"):
        pass_at_k(4, 1, 5)


def test_summary_avg_and_pass():
    summary = summarize([[True, False, False, False], [True, True, False, False]], k=4)
    assert summary["problems"] == 2
    assert summary["avg@4"] == pytest.approx((0.25 + 0.5) / 2)
    assert summary["pass@1"] == pytest.approx(summary["avg@4"])  # pass@1 is the mean accuracy
    assert summary["pass@2"] == pytest.approx((0.5 + (1 - 1 / 6)) / 2)
    assert summary["pass@4"] == 1.0


def test_problems_from_builtin_and_local_files(tmp_path):
    gsm8k = load_problems("gsm8k", limit=3)
    assert len(gsm8k) == 3 and all(p["answer"].replace("-", "").isdigit() for p in gsm8k)  # '#### N' cleaned
    local = tmp_path / "mine.jsonl"
    local.write_text(json.dumps({"problem": "1+1?", "answer": "2"}) + "\n")
    assert load_problems(str(local), None)[0]["answer"] == "2"
    with pytest.raises(ValueError, match="math500"):
        load_problems("nonexistent-bench", None)


def test_eval_end_to_end_offline_and_reproducible(tmp_path, saved_model_dir):
    argv = [
        saved_model_dir,
        "--benchmarks",
        "arithmetic",
        "aime2025",
        "--limit",
        "3",
        "--k",
        "2",
        "--max-new-tokens",
        "4",
        "--temperature",
        "1.0",
        "--batch-size",
        "4",
        "--save-completions",
    ]
    first = eval_main([*argv, "--out", str(tmp_path / "a")])
    second = eval_main([*argv, "--out", str(tmp_path / "b")])
    assert first["results"] == second["results"], "same seed, same numbers"
    assert [p["correct"] for p in first["problems"]] == [p["correct"] for p in second["problems"]]
    results = first["results"]
    assert set(results) == {"arithmetic", "aime2025", "overall", "overall_macro", "overall_pooled"}
    assert results["overall"] == results["overall_macro"] and results["overall"]["problems"] == 6
    for key in ("avg@2", "pass@1", "pass@2"):  # macro: each benchmark weighs the same
        assert results["overall_macro"][key] == pytest.approx(
            (results["arithmetic"][key] + results["aime2025"][key]) / 2
        )
    pooled = [c for p in first["problems"] for c in p["correct"]]
    assert results["overall_pooled"]["avg@2"] == pytest.approx(sum(pooled) / len(pooled))
    saved = json.loads((tmp_path / "a" / "eval_results.json").read_text())
    assert len(saved["problems"]) == 6 and all(
        len(p["correct"]) == 2 and len(p["completions"]) == 2 for p in saved["problems"]
    )
    assert "| arithmetic | 3 |" in (tmp_path / "a" / "eval_summary.md").read_text()
    for summary in first["results"].values():
        assert 0.0 <= summary["avg@2"] <= summary["pass@2"] <= 1.0


def test_macro_and_pooled_overall_by_hand():
    from alp_trl.evaluate import macro_summary, summarize

    big = summarize([[True, True]] * 9 + [[False, False]], k=2)  # 90 %
    small = summarize([[False, False]], k=2)  # 0 %
    macro = macro_summary({"big": big, "small": small})
    assert macro["avg@2"] == pytest.approx(0.45) and macro["problems"] == 11
    pooled = summarize([[True, True]] * 9 + [[False, False]] * 2, k=2)
    assert pooled["avg@2"] == pytest.approx(9 / 11)


def test_prompt_from_the_training_recipe(tmp_path):
    import yaml

    from alp_trl.evaluate import recipe_prompt

    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump({"prompt_template": "Q: {problem}\nA:", "system_prompt": "Be brief."}))
    assert recipe_prompt(str(path)) == ("Q: {problem}\nA:", "Be brief.")
    (tmp_path / "bare.yaml").write_text("dataset_name: builtin:arithmetic\n")
    template, system = recipe_prompt(str(tmp_path / "bare.yaml"))
    assert template == "{problem}\nPut your final answer within \\boxed{}." and system is None


def test_bad_arguments_are_named(saved_model_dir, capsys):
    with pytest.raises(SystemExit):
        eval_main([saved_model_dir, "--benchmarks", "math501"])
    assert "math501" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        eval_main([saved_model_dir, "--temperature", "0", "--k", "4"])


def test_in_training_avg_at_k_is_logged(make_model, tokenizer, prompt_dataset, train_args):
    from alp_trl import ALPConfig
    from alp_trl.callbacks import AvgAtKCallback

    from .conftest import alp_trainer

    trainer = alp_trainer(make_model(), tokenizer, prompt_dataset, ALPConfig(**train_args))
    problems = [{**p, "prompt_text": p["problem"]} for p in load_problems("arithmetic", 2)]
    callback = AvgAtKCallback(trainer, problems, k=2, temperature=1.0, max_new_tokens=4, every=1, batch_size=4)
    trainer.add_callback(callback)
    noise_calls = trainer.perturbation.num_noise_calls
    summary = callback.evaluate()
    assert summary["problems"] == 2 and 0.0 <= summary["avg@2"] <= 1.0
    assert trainer.perturbation.num_noise_calls == noise_calls, "evaluated without the perturbation"
    trainer.train()
    logged = [r for r in trainer.state.log_history if "eval/avg@2" in r]
    assert len(logged) == 2 and all(0.0 <= r["eval/pass@2"] <= 1.0 for r in logged)
    # evaluating does not change training: the same run without the callback logs the same losses
    plain = alp_trainer(make_model(), tokenizer, prompt_dataset, ALPConfig(**train_args))
    plain.train()
    losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
    assert losses == [r["loss"] for r in plain.state.log_history if "loss" in r] and len(losses) == 2


@pytest.mark.parametrize("num_items, world_size", [(3, 2), (4, 2), (5, 3), (2, 4), (7, 1)])
def test_problems_are_dealt_out_evenly_over_ranks(num_items, world_size):
    from alp_trl.callbacks import rank_share

    shares = [rank_share(num_items, rank, world_size) for rank in range(world_size)]
    assert len({len(share) for share in shares}) == 1, "every rank runs the same number of generations"
    real = sorted(i for share in shares for i in share if i < num_items)
    assert real == list(range(num_items)), "each problem is graded exactly once"
