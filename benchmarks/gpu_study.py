"""The GPU variant of the evidence study (issue 15, item 5): the one-step intervention grid on a bf16 model whose
rollouts come from transformers generation on the GPU, i.e. a real train-inference mismatch (~0.008 nats/token
measured on an H100), beside a heavy-tailed simulated engine. Sized for < 8 minutes on one H100.

The model is a randomly initialised Qwen2 of Qwen2.5-0.5B's depth and width with the tiny built-in tokenizer (nothing
to download; the reward is the completions' character diversity, since a random model answers nothing right): the
question is how ALP's perturbed envelope relates to a real engine mismatch, not accuracy.

    python benchmarks/gpu_study.py --out $OUT/gpu_study               # on the GPU
    python benchmarks/gpu_study.py --out /tmp/gpu_study --quick       # a seconds-long CPU dry run of the same code
"""

import argparse
import os
import sys

import yaml


def build_model_dir(out: str, quick: bool) -> str:
    from transformers import AutoModelForCausalLM

    from alp_trl.tiny_models import build_tiny_tokenizer, tiny_config

    path = os.path.join(out, "model")
    if os.path.exists(os.path.join(path, "config.json")):
        return path
    tokenizer = build_tiny_tokenizer()
    if quick:
        config = tiny_config("qwen2", len(tokenizer), num_layers=2, hidden_size=32)
    else:
        config = tiny_config("qwen2", len(tokenizer), num_layers=24, hidden_size=896)
        config.num_attention_heads, config.num_key_value_heads, config.intermediate_size = 14, 2, 4864
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--quick", action="store_true", help="CPU dry run: tiny model, 2 configs, 1 seed")
    args = parser.parse_args()
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from alp_trl import study

    os.makedirs(args.out, exist_ok=True)
    sigmas = [1e-3, 5e-2] if args.quick else [1e-4, 1e-3, 5e-3, 1e-2, 2e-2, 5e-2]
    grid = {
        "model": build_model_dir(args.out, args.quick),
        "dtype": "float32" if args.quick else "bfloat16",
        "device": "cpu" if args.quick else "cuda",
        "seeds": [0] if args.quick else [0, 1],
        "experiments": [
            {
                "kind": "intervention",
                "name": "gpu",
                "data": {
                    "num_prompts": 2 if args.quick else 16,
                    "num_generations": 2 if args.quick else 4,
                    "max_new_tokens": 8 if args.quick else 48,
                    "batch_size": 64,
                    "reward": "diversity",
                },
                "engines": [
                    {"rollout_mismatch": "none"},  # transformers generation in bf16: the real mismatch
                    {"rollout_mismatch": "logit_noise", "rollout_mismatch_std": 0.5},
                ],
                "update_lr": 1e-5,
                "bypass_lr_multipliers": [0.25, 1, 4] if args.quick else [0.25, 0.5, 1, 2, 4],
                "perturbations": {
                    "product": {"perturb_sigma_init": sigmas, "perturb_noise_scale": ["absolute", "rms"]}
                },
            }
        ],
    }
    grid_path = os.path.join(args.out, "grid.yaml")
    with open(grid_path, "w") as f:
        yaml.safe_dump(grid, f)
    study.main(["--grid", grid_path, "--out", args.out, "--report", os.path.join(args.out, "evidence_gpu.md")])


if __name__ == "__main__":
    main()
