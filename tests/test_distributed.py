"""Two CPU processes (gloo) train ALP under torchrun and under `accelerate launch` with every accelerate config: sigma
stays identical across ranks, the noise differs per rank, sharded sigma is saved whole and resumes exactly."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from .helpers import accelerate_launch, launch_machines, tiny_recipe


REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_two_process_training_keeps_sigma_in_sync_and_noise_per_rank(tmp_path):
    # torchrun sets RANK / WORLD_SIZE; with use_cpu=True accelerate then runs data parallel over gloo
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        "29533",
        str(REPO / "tests" / "scripts" / "ddp_worker.py"),
        str(tmp_path),
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=900, cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world_size"] for r in ranks] == [2, 2] and [r["noise_rank"] for r in ranks] == [0, 1]
    assert ranks[0]["sigma_moved"] and ranks[0]["sigma"] == ranks[1]["sigma"], "sigma is synchronised"
    assert ranks[0]["weight_checksum"] == ranks[1]["weight_checksum"], "weights are synchronised"
    assert ranks[0]["eps"] != ranks[1]["eps"], "each rank draws its own noise"


LAUNCH_CONFIGS = {
    # config: (accelerate distributed type, how sigma's parameter is held on each of the 2 ranks, the wrapper the real
    # code put around the model (FSDP2 instead swaps the module's class for an FSDP subclass))
    "ddp.yaml": ("MULTI_CPU", "replicated", "DistributedDataParallel"),  # DDP over gloo: accelerate's multi-CPU type
    "fsdp.yaml": ("FSDP", "dtensor", "FSDP"),
    "zero2.yaml": ("DEEPSPEED", "replicated", "DeepSpeedEngine"),
    "zero3.yaml": ("DEEPSPEED", "zero3", "DeepSpeedEngine"),
}


def _launch_on_cpu(config: str, recipe: dict, tmp_path: Path) -> tuple[Path, list[dict], list[dict]]:
    """Run tests/scripts/launch_cpu_worker.py on 2 CPU processes with an accelerate config; returns the output
    folder, what each rank recorded, and the per-step metrics lines."""
    import yaml

    out = Path(recipe["output_dir"])
    path = tmp_path / f"recipe-{out.name}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    accelerate_launch(
        config, [str(REPO / "tests" / "scripts" / "launch_cpu_worker.py"), "--config", str(path)], tmp_path, 2
    )
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return out, ranks, [r for r in records if "alp/sigma_mean" in r]


@pytest.mark.slow
@pytest.mark.parametrize(
    "config, use_peft",
    [(config, False) for config in sorted(LAUNCH_CONFIGS)] + [("fsdp.yaml", True), ("zero3.yaml", True)],
    ids=lambda value: {True: "lora", False: "full"}.get(value, value),
)
def test_two_process_launch_of_each_accelerate_config(tmp_path, _base_models, tokenizer, config, use_peft):
    """`accelerate launch --config_file accelerate_configs/<config>` with 2 CPU processes runs accelerate's real DDP /
    FSDP2 / DeepSpeed path (sharding, bf16 mixed precision, gradient clipping, saving, resuming) around the `alp_trl.train`
    entry point: sigma is trained, partitioned as the config says, read whole and identical on every rank, saved whole
    in its side file and never in the weights; each rank draws its own noise; in-training avg@k runs on both ranks; a
    run resumed from its step-2 checkpoint ends exactly where the uninterrupted run does. With LoRA, the same with
    the adapter in place of the model."""
    import shutil

    from safetensors.torch import load_file

    if config.startswith("zero"):
        pytest.importorskip("deepspeed")
    distributed_type, kind, wrapper = LAUNCH_CONFIGS[config]
    model_dir = tmp_path / "tiny-qwen2"
    _base_models["qwen2"].save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    recipe = tiny_recipe(
        model_dir,
        tmp_path / "run",
        dataset_name="builtin:arithmetic",
        max_train_samples=64,
        max_steps=4,
        save_strategy="steps",
        save_steps=2,
        bf16=True,
        learning_rate=1e-2,
        perturb_sigma_init=0.05,
        perturb_lr=0.1,
        seed=0,
        # in-training avg@k: generation is a collective under FSDP2 / ZeRO-3, so every rank must take part
        avg_at_k_steps=1,
        avg_at_k_limit=3,
        avg_at_k_k=2,
        avg_at_k_max_new_tokens=4,
    )
    if use_peft:
        recipe.update(use_peft=True, lora_r=4, lora_alpha=8, lora_target_modules=["q_proj", "v_proj"])
    out, ranks, steps = _launch_on_cpu(config, recipe, tmp_path)
    assert [r["world_size"] for r in ranks] == [2, 2] and [r["noise_rank"] for r in ranks] == [0, 1]
    assert [r["distributed_type"] for r in ranks] == [distributed_type] * 2
    # not forced by the harness: the wrapping accelerate / DeepSpeed / FSDP2 really applied
    if wrapper == "FSDP":
        assert all(r["model_class"].startswith("FSDP") for r in ranks), [r["model_class"] for r in ranks]
    else:
        assert [r["wrapper"] for r in ranks] == [wrapper] * 2
    assert [r["partition"]["kind"] for r in ranks] == [kind] * 2
    local = sorted(r["partition"]["local_numel"] for r in ranks)
    # 3 layers: replicated, or split over the 2 ranks (FSDP2 shards unevenly, ZeRO-3 pads to equal partitions)
    assert local == {"replicated": [3, 3], "dtensor": [1, 2], "zero3": [2, 2]}[kind]
    assert ranks[0]["sigma"] == ranks[1]["sigma"], "every rank reads the same whole sigma"
    assert any(abs(s - 0.05) > 1e-3 for s in ranks[0]["sigma"]), "sigma was trained"
    assert ranks[0]["first_noise"] != ranks[1]["first_noise"], "each rank draws its own noise"
    # the final model is saved whole, without sigma; sigma is whole in its side file, equal to the trained values
    weights = load_file(out / ("adapter_model.safetensors" if use_peft else "model.safetensors"))
    assert not any("alp_perturbation" in key or "log_sigma" in key for key in weights)
    if use_peft:
        assert weights and all("lora_" in key for key in weights), "only the adapter is saved"
    else:
        assert weights["model.embed_tokens.weight"].shape[0] == len(tokenizer)
    saved_log_sigma = load_file(out / "alp_perturbation.safetensors")["log_sigma"]
    assert saved_log_sigma.exp().tolist() == pytest.approx(ranks[0]["sigma"], rel=1e-6)
    if config.startswith("zero"):  # DeepSpeed's float32 master copy, not the module's bf16 copy
        assert not torch.equal(saved_log_sigma, saved_log_sigma.bfloat16().float())
    assert (out / "checkpoint-2" / "alp_perturbation.safetensors").exists()
    assert [r["step"] for r in steps] == [1, 2, 3, 4], "one metrics line per step, written by the main process only"
    assert all(math.isfinite(r["grad_norm"]) for r in steps)
    assert all(0.0 <= r["eval/avg@2"] <= r["eval/pass@2"] <= 1.0 for r in steps), "avg@k evaluated on both ranks"
    assert steps[3]["alp/sigma_mean"] != steps[1]["alp/sigma_mean"], "steps 3-4 update sigma (resume is tested)"

    # interrupted after the step-2 checkpoint: the same recipe resumes from it and ends where the first run ended
    resumed_dir = tmp_path / "resumed"
    resumed_dir.mkdir()
    shutil.copytree(out / "checkpoint-2", resumed_dir / "checkpoint-2")
    shutil.copy(out / "metrics.jsonl", resumed_dir / "metrics.jsonl")
    _, resumed_ranks, resumed_steps = _launch_on_cpu(config, {**recipe, "output_dir": str(resumed_dir)}, tmp_path)
    assert [r["step"] for r in resumed_steps] == [1, 2, 3, 4]
    for key in ("loss", "alp/sigma_mean", "grad_norm"):
        assert [r[key] for r in resumed_steps[2:]] == pytest.approx([r[key] for r in steps[2:]], rel=1e-5), key
    assert resumed_ranks[0]["sigma"] == pytest.approx(ranks[0]["sigma"], rel=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize(("config", "kind"), [("ddp.yaml", "value"), ("zero2.yaml", "grad")])
def test_two_process_launch_skips_a_nonfinite_step_on_both_ranks(tmp_path, _base_models, tokenizer, config, kind):
    """Rank 0 alone gets a non-finite step 2. DDP: only its loss value is NaN (its gradients are finite, so only the
    guard's cross-rank reduction can tell rank 1); ZeRO-2: its gradients are NaN (DeepSpeed's own overflow check skips,
    the guard counts it). Both ranks skip step 2 together and stay identical; steps 3-4 train."""
    import yaml

    if config.startswith("zero"):
        pytest.importorskip("deepspeed")
    model_dir = tmp_path / "tiny-qwen2"
    _base_models["qwen2"].save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    out = tmp_path / "run"
    recipe = tiny_recipe(
        model_dir,
        out,
        dataset_name="builtin:arithmetic",
        max_train_samples=64,
        max_steps=4,
        save_strategy="no",
        bf16=True,
        learning_rate=1e-2,
        seed=0,
    )
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    os.environ["POISON_KIND"] = kind
    try:
        accelerate_launch(
            config, [str(REPO / "tests" / "scripts" / "nonfinite_worker.py"), "--config", str(path)], tmp_path, 2
        )
    finally:
        del os.environ["POISON_KIND"]
    ranks = [json.loads((out / f"guard_rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["skipped"] for r in ranks] == [1, 1], "both ranks skipped exactly one step"
    assert ranks[0]["checksums"] == ranks[1]["checksums"], "the ranks' weights never diverged"
    sums = ranks[0]["checksums"]
    assert len(sums) == 4 and sums[1] == sums[0], "step 2 changed nothing"
    assert sums[2] != sums[1] and sums[3] != sums[2] and all(math.isfinite(s) for s in sums), "steps 3-4 trained"
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["train/nonfinite_steps"] for r in records if "grad_norm" in r] == [0.0, 1.0, 1.0, 1.0]


@pytest.mark.slow
def test_two_machines_one_process_each(tmp_path, _base_models, tokenizer):
    """The multi-node launch of a GPU cluster (accelerate_configs/ddp.yaml with --num_machines 2, as slurm/train.slurm
    runs it) as two launchers on this host, machine ranks 0 and 1, one process each (DDP over gloo): one data-parallel
    run of world size 2 that trains ALP and saves once."""
    import yaml

    model_dir = tmp_path / "model"
    _base_models["qwen2"].save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    out = tmp_path / "out"
    recipe = tiny_recipe(model_dir, out, max_steps=2, save_strategy="steps", save_steps=2, perturb_sigma_init=0.05)
    recipe.update(dataset_name="builtin:arithmetic", perturb_lr=0.05, use_cpu=True)
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    launch_machines(
        "ddp.yaml",
        [str(REPO / "tests" / "scripts" / "launch_cpu_worker.py"), "--config", str(path)],
        tmp_path,
    )
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world_size"] for r in ranks] == [2, 2] and [r["distributed_type"] for r in ranks] == ["MULTI_CPU"] * 2
    assert ranks[0]["sigma"] == ranks[1]["sigma"] != [0.05] * len(ranks[0]["sigma"]), "sigma trained, in sync"
    assert ranks[0]["noise_rank"] != ranks[1]["noise_rank"]
    assert {"model.safetensors", "alp_perturbation.safetensors"} <= {p.name for p in out.iterdir()}
    assert (out / "checkpoint-2" / "alp_perturbation.safetensors").exists()
