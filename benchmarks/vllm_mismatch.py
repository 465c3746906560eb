"""The real train-inference mismatch of vLLM's CPU build: its log-probs against an fp32 transformers forward.

For each engine precision, vLLM (colocated, `logprobs_mode="processed_logprobs"`) samples completions of the
arithmetic training prompts of the demo model (SmolLM2-135M-Instruct, embedded); a float32 transformers forward scores
the same tokens. Reported per precision: mean / p50 / p99 / max |engine log-prob - trainer log-prob| over all sampled
tokens, the KL estimate (k3) of the trainer from the engine, and the same binned by the engine's probability of the
sampled token (where the paper says the mismatch matters most: low-probability tokens).

    python benchmarks/vllm_mismatch.py --dtypes float32 bfloat16 --prompts 32 --n 4 --max-tokens 64 \
        --out docs/vllm_mismatch_cpu.json

One engine per process (vLLM keeps process-wide state), hence a subprocess per precision.
"""

import argparse
import json
import os
import platform
import sys
import time

from subprocess_runs import run_worker, write_report


BINS = [(0.0, 0.1), (0.1, 0.5), (0.5, 0.9), (0.9, 1.0 + 1e-9)]


def measure(dtype: str, prompts: int, n: int, max_tokens: int, seed: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from vllm import LLM, SamplingParams

    from alp_trl.data import load_split
    from alp_trl.model_loading import resolve_model_path

    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    path = resolve_model_path("embedded:smollm2-135m-instruct")
    tokenizer = AutoTokenizer.from_pretrained(path)
    rows = load_split("builtin:arithmetic", split="train").select(range(prompts))
    prompt_ids = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": f"{row['problem']}\nPut your final answer within \\boxed{{}}."}],
            add_generation_prompt=True,
            tokenize=True,
            return_dict=True,
        )["input_ids"]
        for row in rows
    ]
    start = time.time()
    llm = LLM(
        model=path, dtype=dtype, enforce_eager=True, seed=seed, max_model_len=512, logprobs_mode="processed_logprobs"
    )
    startup = time.time() - start
    params = SamplingParams(n=n, temperature=1.0, top_p=1.0, top_k=0, max_tokens=max_tokens, logprobs=0)
    start = time.time()
    outputs = llm.generate([{"prompt_token_ids": ids} for ids in prompt_ids], params, use_tqdm=False)
    generate_seconds = time.time() - start
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    engine, trainer = [], []
    for ids, request in zip(prompt_ids, outputs):
        for completion in request.outputs:
            tokens = list(completion.token_ids)
            if not tokens:
                continue
            engine += [next(iter(lp.values())).logprob for lp in completion.logprobs]
            full = torch.tensor([ids + tokens])
            with torch.no_grad():
                logits = model(full).logits[0, len(ids) - 1 : -1].float()
            trainer += torch.log_softmax(logits, -1).gather(-1, torch.tensor(tokens)[:, None])[:, 0].tolist()
    engine_t, trainer_t = torch.tensor(engine), torch.tensor(trainer)
    gap = (engine_t - trainer_t).abs()
    log_ratio = trainer_t - engine_t  # log pi_train / pi_engine on tokens drawn from the engine
    kl_k3 = (log_ratio.exp() - 1 - log_ratio).mean().item()
    result = {
        "dtype": dtype,
        "tokens": len(engine),
        "engine_startup_s": round(startup, 1),
        "generated_tokens_per_s": round(len(engine) / generate_seconds, 1),
        "abs_dlogp": _quantiles(gap),
        "kl_k3": kl_k3,
        "by_engine_probability": [],
    }
    probability = engine_t.exp()
    for low, high in BINS:
        inside = (probability >= low) & (probability < high)
        if inside.any():
            result["by_engine_probability"].append(
                {"bin": [low, min(high, 1.0)], "tokens": int(inside.sum()), "abs_dlogp": _quantiles(gap[inside])}
            )
    return result


def _quantiles(values) -> dict:
    import torch

    q = torch.quantile(values.double(), torch.tensor([0.5, 0.99], dtype=torch.double)).tolist()
    return {"mean": values.mean().item(), "p50": q[0], "p99": q[1], "max": values.max().item()}


def markdown(report: dict) -> str:
    lines = [
        f"vLLM {report['vllm']} CPU build vs float32 transformers, SmolLM2-135M-Instruct, {report['machine']}, "
        f"{report['date']}. Command: `{report['command']}`",
        "",
        "| engine dtype | tokens | mean abs dlogp | p50 | p99 | max | KL(k3) | engine tokens/s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report["results"]:
        g = r["abs_dlogp"]
        lines.append(
            f"| {r['dtype']} | {r['tokens']} | {g['mean']:.2e} | {g['p50']:.2e} | {g['p99']:.2e} | {g['max']:.2e} | "
            f"{r['kl_k3']:.2e} | {r['generated_tokens_per_s']} |"
        )
    lines += ["", "By the engine's probability of the sampled token:", ""]
    lines += ["| engine dtype | p(token) | tokens | mean abs dlogp | p99 | max |", "|---|---|---:|---:|---:|---:|"]
    for r in report["results"]:
        for b in r["by_engine_probability"]:
            g = b["abs_dlogp"]
            lines.append(
                f"| {r['dtype']} | [{b['bin'][0]:.1f}, {b['bin'][1]:.1f}) | {b['tokens']} | {g['mean']:.2e} | "
                f"{g['p99']:.2e} | {g['max']:.2e} |"
            )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--n", type=int, default=4, help="completions per prompt")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="docs/vllm_mismatch_cpu.json")
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)  # worker mode: one dtype, JSON to stdout
    args = parser.parse_args()
    if args.one:
        print("RESULT " + json.dumps(measure(args.one, args.prompts, args.n, args.max_tokens, args.seed)))
        return
    results = []
    for dtype in args.dtypes:
        worker = ["--one", dtype, "--prompts", str(args.prompts), "--n", str(args.n), "--seed", str(args.seed)]
        results.append(run_worker(__file__, [*worker, "--max-tokens", str(args.max_tokens)]))
        print(dtype, results[-1]["abs_dlogp"], flush=True)
    import vllm

    report = {
        "date": time.strftime("%Y-%m-%d"),
        "vllm": vllm.__version__,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "command": "python " + " ".join(sys.argv),
        "results": results,
    }
    write_report(report, args.out, markdown(report))


if __name__ == "__main__":
    main()
