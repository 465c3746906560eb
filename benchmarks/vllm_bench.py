"""Rollouts with the real vLLM engine (CPU build) against transformers generation, as ratios in one run.

Each backend trains Token-ALP on the demo model (SmolLM2-135M-Instruct, embedded) for `--steps` optimizer steps in its
own process (vLLM keeps process-wide state), with fixed-length completions (`min_tokens` / `min_new_tokens` =
`max_completion_length`) so every backend generates the same number of tokens. Per backend, over the steps after the
first: generation time per step (TRL's `_generate`, which includes vLLM's weight sync), completion tokens per second,
step time; each also as a ratio to transformers generation.

    python benchmarks/vllm_bench.py --steps 4 --out docs/benchmarks_vllm_cpu.json
"""

import argparse
import json
import os
import platform
import statistics
import sys
import time

from subprocess_runs import run_worker, write_report


BACKENDS = {
    "transformers": {},
    "vllm-fp32": {"use_vllm": True, "vllm_mode": "colocate", "vllm_dtype": "float32"},
    "vllm-bf16": {"use_vllm": True, "vllm_mode": "colocate", "vllm_dtype": "bfloat16"},
}


def run_backend(name: str, steps: int, batch: int, length: int, out_dir: str) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from alp_trl import ALPConfig, ALPGRPOTrainer
    from alp_trl.model_loading import resolve_model_path

    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    path = resolve_model_path("embedded:smollm2-135m-instruct")
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    fixed_length = {"min_tokens": length} if name.startswith("vllm") else {"min_new_tokens": length}
    args = ALPConfig(
        output_dir=os.path.join(out_dir, name),
        per_device_train_batch_size=batch,
        num_generations=4,
        max_completion_length=length,
        max_steps=steps,
        learning_rate=1e-5,
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        use_cpu=True,
        bf16=False,
        seed=0,
        vllm_max_model_length=512,
        generation_kwargs=fixed_length,
        **BACKENDS[name],
    )
    prompts = [[{"role": "user", "content": f"Write a short story about the number {i}."}] for i in range(64)]

    def length_reward(completions, **kwargs):
        return [len(c[0]["content"]) / 100.0 for c in completions]

    start = time.time()
    trainer = ALPGRPOTrainer(
        model=model,
        reward_funcs=length_reward,
        args=args,
        train_dataset=Dataset.from_dict({"prompt": prompts}),
        processing_class=tokenizer,
    )
    setup_seconds = time.time() - start
    timings, real_generate = [], trainer._generate

    def timed_generate(prompts):
        begin = time.perf_counter()
        result = real_generate(prompts)
        timings.append((time.perf_counter() - begin, sum(len(ids) for ids in result[1])))
        return result

    trainer._generate = timed_generate
    trainer.train()
    step_times = [h["step_time"] for h in trainer.state.log_history if "step_time" in h]
    measured = timings[1:]  # the first generation includes warm-up
    return {
        "backend": name,
        "setup_s": round(setup_seconds, 1),
        "generation_s": statistics.median(t for t, _ in measured),
        "tokens_per_s": sum(n for _, n in measured) / sum(t for t, _ in measured),
        "step_s": statistics.median(step_times[1:]),
        "completion_tokens_per_step": measured[0][1],
    }


def markdown(report: dict) -> str:
    base = next(r for r in report["results"] if r["backend"] == "transformers")
    lines = [
        f"{report['date']}, {report['machine']}, vLLM {report['vllm']} (CPU build), SmolLM2-135M-Instruct, Token-ALP, "
        f"{report['batch']} completions x {report['length']} tokens per step, {report['steps']} steps (the first "
        f"excluded). Command: `{report['command']}`",
        "",
        "| backend | engine setup s | generation s / step | ratio | completion tokens/s | ratio | step s | ratio |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report["results"]:
        lines.append(
            f"| {r['backend']} | {r['setup_s']} | {r['generation_s']:.2f} | {r['generation_s'] / base['generation_s']:.2f} "
            f"| {r['tokens_per_s']:.1f} | {r['tokens_per_s'] / base['tokens_per_s']:.2f} | {r['step_s']:.2f} | "
            f"{r['step_s'] / base['step_s']:.2f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backends", nargs="+", default=list(BACKENDS), choices=list(BACKENDS))
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--batch", type=int, default=8, help="completions per step")
    parser.add_argument("--length", type=int, default=32, help="tokens per completion")
    parser.add_argument("--out", default="docs/benchmarks_vllm_cpu.json")
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    work = os.path.join(os.path.dirname(os.path.abspath(args.out)), ".vllm_bench_runs")
    if args.one:
        print("RESULT " + json.dumps(run_backend(args.one, args.steps, args.batch, args.length, work)))
        return
    results = []
    for name in args.backends:
        worker = ["--one", name, "--steps", str(args.steps), "--batch", str(args.batch), "--length", str(args.length)]
        results.append(run_worker(__file__, [*worker, "--out", args.out]))
        print(results[-1], flush=True)
    import vllm

    report = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "vllm": vllm.__version__,
        "steps": args.steps,
        "batch": args.batch,
        "length": args.length,
        "command": "python " + " ".join(sys.argv),
        "results": results,
    }
    write_report(report, args.out, markdown(report))


if __name__ == "__main__":
    main()
