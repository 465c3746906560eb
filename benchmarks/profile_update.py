"""Where does ALP's policy-update time go? Loss + backward on fixed inputs, no generation (GPU or CPU).

Times `_compute_loss` + `backward` for: plain GRPO, `bypass` (this package's loss and metrics, no noise), and ALP
(token level, noise on every layer), on the same model and micro-batch; the two differences separate the cost of the
loss/metrics code from the cost of the noise. Also prints the top operators of one ALP update from torch.profiler.

    python benchmarks/profile_update.py --model qwen2-0.5b-random --batch 16 --completion-length 256
"""

import argparse
import json
import os
import statistics
import sys
import time


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--prompt-length", type=int, default=64)
    parser.add_argument("--completion-length", type=int, default=256)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    import torch
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from bench import build_model

    from alp_trl import ALPConfig, ALPGRPOTrainer

    cuda = torch.cuda.is_available()
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    dataset = Dataset.from_dict({"prompt": ["x"] * 8})
    common = dict(
        output_dir="/tmp/profile_update",
        per_device_train_batch_size=args.batch,
        num_generations=4,
        max_completion_length=args.completion_length,
        report_to="none",
        bf16=cuda,
        use_cpu=not cuda,
    )
    g = torch.Generator().manual_seed(0)
    results = {}
    for name in ("grpo", "bypass", "alp"):
        model, tokenizer = build_model(args.model, device, dtype)
        if name == "grpo":
            trainer = GRPOTrainer(
                model=model,
                reward_funcs=lambda completions, **k: [0.0] * len(completions),
                args=GRPOConfig(**common),
                train_dataset=dataset,
                processing_class=tokenizer,
            )
        else:
            correction = "bypass" if name == "bypass" else "alp"
            trainer = ALPGRPOTrainer(
                model=model,
                reward_funcs=lambda completions, **k: [0.0] * len(completions),
                args=ALPConfig(**common, off_policy_correction=correction),
                train_dataset=dataset,
                processing_class=tokenizer,
            )
        vocab = len(tokenizer)
        B, P, T = args.batch, args.prompt_length, args.completion_length
        inputs = {
            "prompt_ids": torch.randint(5, vocab, (B, P), generator=g).to(device),
            "prompt_mask": torch.ones(B, P, dtype=torch.long, device=device),
            "completion_ids": torch.randint(5, vocab, (B, T), generator=g).to(device),
            "completion_mask": torch.ones(B, T, dtype=torch.long, device=device),
            "advantages": torch.randn(B, generator=g).to(device),
            "num_items_in_batch": torch.tensor(B * T, device=device),
        }
        trainer.model.train()
        trainer.current_gradient_accumulation_steps = 1
        with torch.no_grad():
            ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
            mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)
            logps = trainer._get_per_token_logps_and_entropies(trainer.model, ids, mask, T)[0]
        inputs["old_per_token_logps" if name == "grpo" else "sampling_per_token_logps"] = logps - 0.01

        def step(trainer=trainer, inputs=inputs):
            trainer.model.zero_grad(set_to_none=True)
            trainer._compute_loss(trainer.model, inputs).backward()

        times = []
        for i in range(args.iters + 2):
            if cuda:
                torch.cuda.synchronize()
            start = time.perf_counter()
            trainer._step = i
            step()
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        results[name] = {"median_ms": 1000 * statistics.median(times[2:]), "min_ms": 1000 * min(times[2:])}
        if name == "alp":
            activities = [torch.profiler.ProfilerActivity.CPU] + (
                [torch.profiler.ProfilerActivity.CUDA] if cuda else []
            )
            with torch.profiler.profile(activities=activities) as prof:
                step()
                if cuda:
                    torch.cuda.synchronize()
            sort = "self_cuda_time_total" if cuda else "self_cpu_time_total"
            table = prof.key_averages().table(sort_by=sort, row_limit=15, max_name_column_width=50)
            results["alp_profile_top"] = table
            print(table)
        del trainer, model
        if cuda:
            torch.cuda.empty_cache()
    results["noise_cost_ms"] = results["alp"]["median_ms"] - results["bypass"]["median_ms"]
    results["loss_code_cost_ms"] = results["bypass"]["median_ms"] - results["grpo"]["median_ms"]
    print(json.dumps({k: v for k, v in results.items() if k != "alp_profile_top"}, indent=2))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
