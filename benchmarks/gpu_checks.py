"""Checks that need a GPU, run on a lent machine; results go to one JSON file (see docs/benchmarks.md).

1. `smoke`: ALPGRPOTrainer on a randomly initialised ~0.4B Qwen2-architecture model in bf16 with transformers
   generation: a few steps, sigma and weights must move; and the measured gap between the sampling log-probs
   recorded during `generate` (the ALP denominator) and the trainer's own forward on the same tokens.
2. `launch`: the training entry point under `accelerate launch` with each of
   accelerate_configs/{ddp,zero2,zero3,fsdp}.yaml (`--num-processes`, default 1; use every GPU of a multi-GPU
   machine), on a tiny Qwen2 model: it must train, save sigma's side file, and move sigma; the grad norms are kept.

    python benchmarks/gpu_checks.py --out $OUT/gpu_checks.json
    python benchmarks/gpu_checks.py --only ddp zero2 zero3 fsdp --num-processes 8 --out $OUT/gpu_multi.json
    # the H100 FSDP2 NaN (plain GRPO too): vary one thing at a time
    python benchmarks/gpu_checks.py --only fsdp --extra '{"off_policy_correction": "none", "max_steps": 6}' \
        --tag=-none --out $OUT/fsdp_nan.json
    python benchmarks/gpu_checks.py --only fsdp --extra '{"attn_implementation": "eager"}' --tag=-eager ...
    python benchmarks/gpu_checks.py --only fsdp --launch-args="--fsdp_cpu_ram_efficient_loading false" --tag=-noeff ...
"""

import argparse
import json
import os
import subprocess
import sys
import time


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def smoke(steps: int = 3) -> dict:
    import torch
    from datasets import Dataset

    from alp_trl import ALPConfig, ALPGRPOTrainer

    sys.path.insert(0, os.path.join(REPO, "benchmarks"))
    from bench import build_model

    model, tokenizer = build_model("qwen2-0.5b-random", "cuda", torch.bfloat16)
    prompts = [[{"role": "user", "content": f"What is {i} + {i + 3}?"}] for i in range(32)]
    dataset = Dataset.from_dict({"prompt": prompts})

    def reward(completions, **kwargs):
        return [float(len(c[0]["content"]) % 5) for c in completions]

    args = ALPConfig(
        output_dir="/tmp/gpu_smoke",
        per_device_train_batch_size=16,
        num_generations=8,
        max_completion_length=64,
        max_steps=steps,
        learning_rate=1e-5,
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        bf16=True,
        perturb_sigma_init=0.02,
        perturb_lr=0.05,
    )
    trainer = ALPGRPOTrainer(
        model=model, reward_funcs=reward, args=args, train_dataset=dataset, processing_class=tokenizer
    )
    sigma0 = trainer.perturbation.sigma.clone()
    weight0 = trainer.model.model.layers[0].mlp.down_proj.weight.detach().clone()
    start = time.time()
    trainer.train()
    seconds = time.time() - start

    trainer.model.train()
    output = trainer._generate_and_score_completions([dataset[0]] * 16)
    ids = torch.cat([output["prompt_ids"], output["completion_ids"]], 1)
    mask = torch.cat([output["prompt_mask"], output["completion_mask"]], 1)
    with torch.no_grad():
        train_logps = trainer._get_per_token_logps_and_entropies(
            trainer.model, ids, mask, output["completion_ids"].size(1)
        )[0]
    keep = output["completion_mask"].bool()
    diff = (train_logps - output["sampling_per_token_logps"])[keep].float()
    prob_diff = (train_logps.exp() - output["sampling_per_token_logps"].exp())[keep].float()
    logs = [r for r in trainer.state.log_history if "alp/sigma_mean" in r]
    return {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "num_parameters": sum(p.numel() for p in model.parameters()),
        "steps": steps,
        "train_seconds": round(seconds, 1),
        "sigma_moved": bool(not torch.equal(trainer.perturbation.sigma, sigma0)),
        "weights_moved": bool(not torch.equal(trainer.model.model.layers[0].mlp.down_proj.weight, weight0)),
        "sigma_mean_final": trainer.perturbation.sigma.mean().item(),
        "peak_memory_mib": torch.cuda.max_memory_allocated() / 2**20,
        "generate_vs_train_logp_abs_diff_mean": diff.abs().mean().item(),
        "generate_vs_train_logp_abs_diff_max": diff.abs().max().item(),
        "generate_vs_train_prob_abs_diff_max": prob_diff.abs().max().item(),
        "tokens_compared": int(keep.sum()),
        "last_logged": {k: logs[-1][k] for k in ("alp/ratio/p99", "alp/ratio/max", "alp/train_rollout_kl", "loss")},
    }


def launch(
    config: str,
    workdir: str,
    extra: dict | None = None,
    tag: str = "",
    num_processes: int = 1,
    launch_args: list[str] | None = None,
) -> dict:
    import yaml

    from alp_trl.testing_utils import build_tiny_causal_lm, build_tiny_tokenizer

    model_dir = os.path.join(workdir, "tiny-qwen2")
    if not os.path.exists(model_dir):
        tokenizer = build_tiny_tokenizer()
        build_tiny_causal_lm("qwen2", vocab_size=len(tokenizer), num_layers=4, hidden_size=64).save_pretrained(
            model_dir
        )
        tokenizer.save_pretrained(model_dir)
    out = os.path.join(workdir, f"run-{os.path.basename(config).split('.')[0]}{tag}")
    recipe = {
        "model_name_or_path": model_dir,
        "dtype": "bfloat16",
        "dataset_name": "builtin:arithmetic",
        "reward_funcs": ["accuracy", "format", "length"],
        "length_target_chars": 10,
        "output_dir": out,
        "per_device_train_batch_size": 8,
        "num_generations": 4,
        "max_completion_length": 16,
        "max_steps": 3,
        "save_strategy": "steps",
        "save_steps": 3,
        "logging_steps": 1,
        "report_to": "none",
        "bf16": True,
        "perturb_sigma_init": 0.05,
        "perturb_lr": 0.1,
        "learning_rate": 1e-3,
        "auto_resume": False,
        **(extra or {}),
    }
    path = os.path.join(workdir, f"recipe{tag}-{os.path.basename(config)}")
    with open(path, "w") as f:
        yaml.safe_dump(recipe, f)
    command = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        os.path.join(REPO, config),
        "--num_processes",
        str(num_processes),
        *(launch_args or []),
        "-m",
        "alp_trl.train",
        "--config",
        path,
    ]
    start = time.time()
    proc = subprocess.run(command, capture_output=True, text=True, timeout=900, cwd=REPO)
    result = {
        "config": config,
        "num_processes": num_processes,
        "returncode": proc.returncode,
        "seconds": round(time.time() - start, 1),
    }
    metrics_file = os.path.join(out, "metrics.jsonl")
    if os.path.exists(metrics_file):
        with open(metrics_file) as f:
            result["grad_norms"] = [json.loads(line).get("grad_norm") for line in f if "grad_norm" in line]
    side = os.path.join(out, "alp_perturbation.json")
    if proc.returncode == 0 and os.path.exists(side):
        with open(side) as f:
            sigma = json.load(f)["sigma_per_layer"]
        result["sigma_per_layer"] = sigma
        result["sigma_moved"] = any(abs(v - 0.05) > 1e-6 for v in sigma.values())
        result["checkpoint_side_file"] = os.path.exists(
            os.path.join(out, "checkpoint-3", "alp_perturbation.safetensors")
        )
        weights = [n for n in os.listdir(out) if n.endswith(".safetensors") and n != "alp_perturbation.safetensors"]
        result["weights_files"] = weights
    else:
        result["tail"] = proc.stdout[-1500:] + "\n" + proc.stderr[-3500:]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--only", nargs="*", default=["smoke", "zero2", "zero3", "fsdp"])
    parser.add_argument("--workdir", default="/tmp/alp_gpu_checks")
    parser.add_argument("--extra", default=None, help="JSON dict of recipe overrides for the launch checks")
    parser.add_argument("--tag", default="")
    parser.add_argument("--num-processes", type=int, default=1, help="processes (GPUs) of each launch check")
    parser.add_argument("--launch-args", default="", help="more `accelerate launch` options, e.g. FSDP overrides")
    args = parser.parse_args()
    os.makedirs(args.workdir, exist_ok=True)
    results = {}
    for check in args.only:
        start = time.time()
        try:
            if check == "smoke":
                results[check] = smoke()
            else:
                extra = json.loads(args.extra) if args.extra else None
                results[check] = launch(
                    f"accelerate_configs/{check}.yaml",
                    args.workdir,
                    extra,
                    args.tag,
                    args.num_processes,
                    args.launch_args.split(),
                )
        except Exception as error:  # keep going: each check is reported on its own
            import traceback

            results[check] = {"error": f"{type(error).__name__}: {error}", "traceback": traceback.format_exc()[-3000:]}
        print(f"[gpu_checks] {check}: {time.time() - start:.1f}s {json.dumps(results[check])[:600]}", flush=True)
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
