"""ALP's cost against plain `GRPOTrainer`, as ratios measured in the same run (`make bench`).

Every (model, variant, repeat) trains `--steps` optimizer steps in a fresh subprocess, so that peak memory (CPU max
RSS, or CUDA max allocated) belongs to that run alone; variants are interleaved within each repeat. Generation has a
fixed length (`min_new_tokens = max_completion_length`), so every variant does the same generation work and the
time difference is the policy update's. Reported per variant, each as a ratio to GRPO:

- step time (median, min, max over the steps after the first of every repeat);
- update time: the step minus generation and scoring (where ALP's work happens);
- log-prob forward passes per step (calls of the model with TRL's fused LM head: training, old-policy and reference
  forwards) and generation forward passes per step;
- peak memory.

    python benchmarks/bench.py --models tiny smollm2 --steps 4 --repeats 2 --out docs/benchmarks_cpu.json
"""

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time


VARIANTS = {
    "grpo": {},
    "alp-token": {"off_policy_correction": "alp", "importance_sampling_level": "token"},
    "alp-seq": {"off_policy_correction": "alp", "importance_sampling_level": "sequence"},
    "alp-channel": {"off_policy_correction": "alp", "perturb_sigma_shape": "channel"},
}


def build_model(name: str, device: str, dtype):
    """(model, tokenizer) for a benchmark model name, on `device`."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from alp_trl.model_loading import resolve_model_path
    from alp_trl.tiny_models import build_tiny_causal_lm, build_tiny_tokenizer

    torch.manual_seed(0)
    if name == "tiny":
        tokenizer = build_tiny_tokenizer()
        model = build_tiny_causal_lm("qwen2", vocab_size=len(tokenizer), num_layers=4, hidden_size=64)
    elif name == "smollm2":
        path = resolve_model_path("embedded:smollm2-135m-instruct")
        tokenizer, model = AutoTokenizer.from_pretrained(path), AutoModelForCausalLM.from_pretrained(path)
    elif name == "qwen2-0.5b-random":
        # Qwen2.5-0.5B's shape (24 layers, hidden 896, 14 heads / 2 KV heads, MLP 4864), randomly initialised, with
        # SmolLM2's tokenizer (49k vocabulary) so that generated ids decode.
        tokenizer = AutoTokenizer.from_pretrained(resolve_model_path("embedded:smollm2-135m-instruct"))
        config = AutoConfig.for_model(
            "qwen2",
            vocab_size=len(tokenizer),
            hidden_size=896,
            intermediate_size=4864,
            num_hidden_layers=24,
            num_attention_heads=14,
            num_key_value_heads=2,
            max_position_embeddings=4096,
            tie_word_embeddings=True,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        model = AutoModelForCausalLM.from_config(config)
    else:
        raise ValueError(f"unknown model {name!r}; allowed: tiny, smollm2, qwen2-0.5b-random")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model.to(device=device, dtype=dtype), tokenizer


def run_one(args) -> dict:
    """One training run in this process; prints a JSON line with its measurements."""
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from alp_trl import ALPConfig, ALPGRPOTrainer

    cuda = torch.cuda.is_available() and not args.cpu
    device = "cuda" if cuda else "cpu"
    dtype = torch.bfloat16 if cuda else torch.float32
    model, tokenizer = build_model(args.model, device, dtype)
    prompts = [[{"role": "user", "content": f"What is {i} + {2 * i + 1}? Answer briefly."}] for i in range(64)]
    dataset = Dataset.from_dict({"prompt": prompts})

    def reward(completions, **kwargs):
        return [float(len(c[0]["content"]) % 7) for c in completions]

    variant = VARIANTS[args.variant]
    common = dict(
        output_dir=os.path.join(args.workdir, f"{args.model}-{args.variant}"),
        per_device_train_batch_size=args.batch,
        num_generations=args.num_generations,
        max_completion_length=args.completion_length,
        generation_kwargs={"min_new_tokens": args.completion_length},
        max_steps=args.steps,
        learning_rate=1e-6,
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        bf16=cuda,
        use_cpu=not cuda,
        seed=0,
        gradient_checkpointing=args.gradient_checkpointing,
        steps_per_generation=args.steps_per_generation,
    )
    if variant:
        trainer_cls, config = ALPGRPOTrainer, ALPConfig(**common, **variant)
    else:
        trainer_cls, config = GRPOTrainer, GRPOConfig(**common)

    class Timed(trainer_cls):
        generation_seconds: list = []

        def _generate_and_score_completions(self, inputs):
            if cuda:
                torch.cuda.synchronize()
            start = time.perf_counter()
            output = super()._generate_and_score_completions(inputs)
            if cuda:
                torch.cuda.synchronize()
            self.generation_seconds.append(time.perf_counter() - start)
            return output

    step_seconds = []

    class StepTimer(TrainerCallback):
        def on_step_begin(self, *a, **k):
            if cuda:
                torch.cuda.synchronize()
            self.start = time.perf_counter()

        def on_step_end(self, *a, **k):
            if cuda:
                torch.cuda.synchronize()
            step_seconds.append(time.perf_counter() - self.start)

    trainer = Timed(
        model=model,
        reward_funcs=reward,
        args=config,
        train_dataset=dataset,
        processing_class=tokenizer,
        callbacks=[StepTimer()],
    )
    counts = {"logprob": 0, "generation": 0}
    core = trainer.model.get_base_model() if hasattr(trainer.model, "get_base_model") else trainer.model

    def count(module, args_, kwargs):
        counts["logprob" if kwargs.get("fused_lm_head") else "generation"] += 1

    core.register_forward_pre_hook(count, with_kwargs=True)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    trainer.train()
    peak = (
        torch.cuda.max_memory_allocated() / 2**20
        if cuda
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10
    )
    result = {
        "model": args.model,
        "variant": args.variant,
        "device": torch.cuda.get_device_name() if cuda else platform.processor() or "cpu",
        "dtype": str(dtype),
        "step_seconds": step_seconds,
        "generation_seconds": trainer.generation_seconds,
        "steps_per_generation": args.steps_per_generation,
        "logprob_forwards_per_step": counts["logprob"] / args.steps,
        "generation_forwards_per_step": counts["generation"] / args.steps,
        "peak_memory_mib": peak,
        "num_parameters": sum(p.numel() for p in model.parameters()),
    }
    print("BENCH " + json.dumps(result), flush=True)
    return result


def summarize(results: list[dict]) -> dict:
    """Per (model, variant): medians over runs and steps, and ratios to GRPO of the same model."""
    table = {}
    for r in results:
        entry = table.setdefault(r["model"], {}).setdefault(r["variant"], {"steps": [], "updates": [], "peaks": []})
        # per generation cycle (one step, or `steps_per_generation` steps sharing one generation batch), the first
        # cycle dropped (warm-up); a step's time is its cycle's time over the steps in it
        per = r.get("steps_per_generation", 1)
        cycles = [sum(r["step_seconds"][i : i + per]) for i in range(0, len(r["step_seconds"]), per)]
        pairs = list(zip(cycles, r["generation_seconds"]))
        pairs = pairs[1:] or pairs
        entry["steps"] += [c / per for c, _ in pairs]
        entry["updates"] += [max(c - g, 0.0) / per for c, g in pairs]
        entry["peaks"].append(r["peak_memory_mib"])
        entry.update(
            {
                k: r[k]
                for k in (
                    "logprob_forwards_per_step",
                    "generation_forwards_per_step",
                    "device",
                    "dtype",
                    "num_parameters",
                )
            }
        )
    summary = {}
    for model, variants in table.items():
        base = variants.get("grpo")
        for variant, e in variants.items():
            row = {
                "device": e["device"],
                "dtype": e["dtype"],
                "num_parameters": e["num_parameters"],
                "step_median_s": statistics.median(e["steps"]),
                "step_min_s": min(e["steps"]),
                "step_max_s": max(e["steps"]),
                "update_median_s": statistics.median(e["updates"]),
                "peak_memory_mib": max(e["peaks"]),
                "logprob_forwards_per_step": e["logprob_forwards_per_step"],
                "generation_forwards_per_step": e["generation_forwards_per_step"],
            }
            if base:
                row["step_ratio"] = row["step_median_s"] / statistics.median(base["steps"])
                row["update_ratio"] = row["update_median_s"] / max(statistics.median(base["updates"]), 1e-9)
                row["memory_ratio"] = row["peak_memory_mib"] / max(base["peaks"])
            summary[f"{model}/{variant}"] = row
    return summary


def markdown(summary: dict) -> str:
    lines = [
        "| model / variant | step median s (min-max) | step / GRPO | update s | update / GRPO | log-prob fwd / step "
        "| gen fwd / step | peak MiB | memory / GRPO |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in summary.items():
        lines.append(
            f"| {name} | {r['step_median_s']:.3f} ({r['step_min_s']:.3f}-{r['step_max_s']:.3f}) "
            f"| {r.get('step_ratio', float('nan')):.3f} | {r['update_median_s']:.3f} "
            f"| {r.get('update_ratio', float('nan')):.3f} | {r['logprob_forwards_per_step']:.1f} "
            f"| {r['generation_forwards_per_step']:.1f} | {r['peak_memory_mib']:.0f} "
            f"| {r.get('memory_ratio', float('nan')):.3f} |"
        )
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["tiny", "smollm2"])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--num-generations", type=int, default=4)
    parser.add_argument("--completion-length", type=int, default=32)
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument(
        "--steps-per-generation",
        type=int,
        default=1,
        help="optimizer steps per generation batch; above 1, TRL computes old-policy log-probs for GRPO",
    )
    parser.add_argument("--cpu", action="store_true", help="stay on the CPU even if a GPU is present")
    parser.add_argument("--workdir", default="/tmp/alp_trl_bench")
    parser.add_argument("--out", default=None, help="write raw results and the summary to this JSON file")
    parser.add_argument("--one", nargs=2, metavar=("MODEL", "VARIANT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.one:
        args.model, args.variant = args.one
        run_one(args)
        return

    results = []
    passthrough = (
        [
            "--steps",
            str(args.steps),
            "--batch",
            str(args.batch),
            "--num-generations",
            str(args.num_generations),
            "--completion-length",
            str(args.completion_length),
            "--steps-per-generation",
            str(args.steps_per_generation),
            "--workdir",
            args.workdir,
        ]
        + (["--gradient-checkpointing"] if args.gradient_checkpointing else [])
        + (["--cpu"] if args.cpu else [])
    )
    for model in args.models:
        for repeat in range(args.repeats):
            order = args.variants if repeat % 2 == 0 else list(reversed(args.variants))  # interleave, alternate
            for variant in order:
                start = time.time()
                proc = subprocess.run(
                    [sys.executable, __file__, "--one", model, variant, *passthrough], capture_output=True, text=True
                )
                lines = [line for line in proc.stdout.splitlines() if line.startswith("BENCH ")]
                if proc.returncode != 0 or not lines:
                    raise RuntimeError(f"{model}/{variant} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
                results.append(json.loads(lines[-1][len("BENCH ") :]))
                print(f"[bench] {model} {variant} repeat {repeat}: {time.time() - start:.1f}s", flush=True)
    summary = summarize(results)
    print(markdown(summary))
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(
                {"args": vars(args), "results": results, "summary": summary, "markdown": markdown(summary)},
                f,
                indent=2,
            )


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    main()
