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


def test_eval_refuses_the_tool_with_vllm(saved_model_dir, capsys):
    from alp_trl.evaluate import main as eval_main

    with pytest.raises(SystemExit):
        eval_main([saved_model_dir, "--code-tool", "python", "--backend", "vllm"])
    assert "--code-tool python runs with --backend transformers" in capsys.readouterr().err
