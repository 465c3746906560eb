"""Checks that need a GPU, run on a lent machine; results go to one JSON file (see docs/benchmarks.md).

1. `smoke`: ALPGRPOTrainer on a randomly initialised ~0.4B Qwen2-architecture model in bf16 with transformers
   generation: a few steps, sigma and weights must move; and the measured gap between the sampling log-probs
   recorded during `generate` (the ALP denominator) and the trainer's own forward on the same tokens.
2. `launch`: the training entry point under `accelerate launch` with each of
   accelerate_configs/{ddp,zero2,zero3,fsdp}.yaml (`--num-processes`, default 1; use every GPU of a multi-GPU
   machine), on a tiny Qwen2 model: it must train, save sigma's side file, and move sigma; the grad norms are kept.

    python benchmarks/gpu_checks.py --out $OUT/gpu_checks.json
    python benchmarks/gpu_checks.py --only ddp zero2 zero3 fsdp --num-processes 8 --out $OUT/gpu_multi.json
    # one change at a time: recipe overrides and accelerate options
    python benchmarks/gpu_checks.py --only fsdp --extra '{"attn_implementation": "eager"}' --tag=-eager ...
    python benchmarks/gpu_checks.py --only fsdp --launch-args="--fsdp_cpu_ram_efficient_loading false" --tag=-noeff ...
3. `cudnn_nan`: the table of alp_trl issue 12 (the NaN gradient at step 3 on H100/H200 that was blamed on FSDP2; it
   is PyTorch's cuDNN SDPA backward, pytorch/pytorch#196678) as one command, <= 3 minutes: 4-step runs of the entry
   point (plain GRPO and ALP; ddp / fsdp configs; bf16 and fp32; head_dim 16 and 128; sdpa, eager, cuDNN off
   globally; completions of 16 and 8 tokens), `--parallel` at a time on the one GPU, each with the fix at its default
   (`cudnn_sdpa_backward: auto`): every grad norm must be finite and no step skipped. One more run switches the fix off
   (`cudnn_sdpa_backward: on`): there the non-finite guard must skip the NaN steps instead of the run crashing in
   generation. A kernel-level check (`sdpa_kernel`) counts non-finite `grad_q` of cuDNN vs the memory-efficient kernel
   on a GRPO-shaped mask (left-padded rows fully masked) at sequence lengths 64, 128, 192.

    python benchmarks/gpu_checks.py --only cudnn_nan --out $OUT/cudnn_nan.json
"""

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor


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
    model: str = "h64",
    target: list[str] | None = None,
) -> dict:
    import yaml

    model_dir = tiny_model(workdir, model)
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
        *(target or ["-m", "alp_trl.train"]),
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
            steps = [json.loads(line) for line in f if "grad_norm" in line]
        result["grad_norms"] = [r.get("grad_norm") for r in steps]
        result["nonfinite_steps"] = steps[-1].get("train/nonfinite_steps") if steps else None
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


def tiny_model(workdir: str, model: str = "h64") -> str:
    """The random tiny Qwen2 of the launch checks, saved once: `h64` (4 layers, hidden 64, head_dim 16) or `hd128`
    (hidden 256, 2 heads: head_dim 128)."""
    from alp_trl.tiny_models import build_tiny_causal_lm, build_tiny_tokenizer

    model_dir = os.path.join(workdir, "tiny-qwen2" if model == "h64" else f"tiny-qwen2-{model}")
    if not os.path.exists(model_dir):
        tokenizer = build_tiny_tokenizer()
        if model == "h64":
            built = build_tiny_causal_lm("qwen2", vocab_size=len(tokenizer), num_layers=4, hidden_size=64)
        elif model == "hd128":
            from transformers import AutoModelForCausalLM

            from alp_trl.tiny_models import tiny_config

            config = tiny_config("qwen2", len(tokenizer), num_layers=4, hidden_size=256)
            config.num_attention_heads = config.num_key_value_heads = 2
            built = AutoModelForCausalLM.from_config(config)
        else:
            raise ValueError(f"`model` got {model!r}; allowed values are ['h64', 'hd128'].")
        built.save_pretrained(model_dir)
        tokenizer.save_pretrained(model_dir)
    return model_dir


_GRPO = {"off_policy_correction": "none"}
# name: (accelerate config, recipe overrides, model, launch target or None for `-m alp_trl.train`)
CUDNN_NAN_VARIANTS = {
    "grpo-sdpa": ("ddp.yaml", _GRPO, "h64", None),
    "grpo-fp32": ("ddp.yaml", {**_GRPO, "dtype": "float32", "bf16": False}, "h64", None),
    "grpo-headdim128": ("ddp.yaml", _GRPO, "hd128", None),
    "alp-ddp": ("ddp.yaml", {}, "h64", None),
    "alp-fsdp": ("fsdp.yaml", {}, "h64", None),
    "alp-fsdp-lr1e-5": ("fsdp.yaml", {"learning_rate": 1e-5}, "h64", None),
    "grpo-eager": ("ddp.yaml", {**_GRPO, "attn_implementation": "eager"}, "h64", None),
    "grpo-cudnn-off-globally": ("ddp.yaml", _GRPO, "h64", ["benchmarks/train_without_cudnn_sdpa.py"]),
    "grpo-completion8": ("ddp.yaml", {**_GRPO, "max_completion_length": 8}, "h64", None),
    # the fix switched off: the bug must show, and the guard must skip its NaN steps instead of a crash
    "grpo-cudnn-on-guarded": (
        "ddp.yaml",
        {**_GRPO, "cudnn_sdpa_backward": "on", "max_consecutive_nonfinite_steps": 4},
        "h64",
        None,
    ),
}


def cudnn_nan(workdir: str, parallel: int = 5, extra: dict | None = None) -> dict:
    """The issue-12 table: every variant of `CUDNN_NAN_VARIANTS` for 4 steps (batch 8, 4 generations, 16 tokens,
    bf16, lr 1e-3), `parallel` launches at a time on the one GPU, plus the kernel-level check."""
    results = {"kernel": sdpa_kernel_nan()}
    for model in ("h64", "hd128"):  # built once, before the parallel launches
        tiny_model(workdir, model)

    def run(item):
        index, (name, (config, variant, model, target)) = item
        recipe = {"max_steps": 4, "save_steps": 4, "max_completion_length": 16, **variant, **(extra or {})}
        port = ["--main_process_port", str(29600 + index)]
        return name, launch(f"accelerate_configs/{config}", workdir, recipe, f"-{name}", 1, port, model, target)

    with ThreadPoolExecutor(max_workers=parallel) as pool:
        for name, result in pool.map(run, enumerate(CUDNN_NAN_VARIANTS.items())):
            results[name] = result
    fixed = [n for n in CUDNN_NAN_VARIANTS if n != "grpo-cudnn-on-guarded"]
    results["all_fixed_variants_finite"] = all(
        results[n].get("returncode") == 0
        and len(results[n].get("grad_norms") or []) == 4
        and all(g is not None and g == g and abs(g) != float("inf") for g in results[n]["grad_norms"])
        and not results[n].get("nonfinite_steps")
        for n in fixed
    )
    return results


def sdpa_kernel_nan(lengths=(64, 128, 192), pad=10) -> dict:
    """Non-finite `grad_q` of cuDNN vs the memory-efficient SDPA kernel on a GRPO-shaped boolean mask (causal, with
    the first `pad` positions of sample 0 left-padded: those query rows are fully masked), bf16, per sequence length."""
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    if not torch.cuda.is_available():
        return {"skipped": "no CUDA device"}
    out = {"device": torch.cuda.get_device_name(), "capability": list(torch.cuda.get_device_capability())}
    for length in lengths:
        torch.manual_seed(0)
        q, k, v = (torch.randn(2, 4, length, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        keep = torch.ones(2, length, dtype=torch.bool, device="cuda")
        keep[0, :pad] = False
        mask = torch.ones(length, length, dtype=torch.bool, device="cuda").tril()[None, None] & keep[:, None, None, :]
        row = {}
        for name, backend in (("cudnn", SDPBackend.CUDNN_ATTENTION), ("efficient", SDPBackend.EFFICIENT_ATTENTION)):
            qq = q.clone().requires_grad_()
            try:
                with sdpa_kernel([backend]):
                    F.scaled_dot_product_attention(qq, k, v, attn_mask=mask).float().sum().backward()
                row[name] = int((~torch.isfinite(qq.grad)).sum())
            except RuntimeError as error:  # backend not available for these inputs
                row[name] = f"unavailable: {str(error)[:120]}"
        out[f"L{length}_nonfinite_grad_q"] = row
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--only", nargs="*", default=["smoke", "zero2", "zero3", "fsdp"])
    parser.add_argument("--workdir", default="/tmp/alp_gpu_checks")
    parser.add_argument("--extra", default=None, help="JSON dict of recipe overrides for the launch checks")
    parser.add_argument("--tag", default="")
    parser.add_argument("--num-processes", type=int, default=1, help="processes (GPUs) of each launch check")
    parser.add_argument("--launch-args", default="", help="more `accelerate launch` options, e.g. FSDP overrides")
    parser.add_argument("--parallel", type=int, default=5, help="cudnn_nan: launches at a time on the GPU")
    args = parser.parse_args()
    os.makedirs(args.workdir, exist_ok=True)
    results = {}
    for check in args.only:
        start = time.time()
        try:
            if check == "smoke":
                results[check] = smoke()
            elif check == "cudnn_nan":
                results[check] = cudnn_nan(args.workdir, args.parallel, json.loads(args.extra) if args.extra else None)
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
