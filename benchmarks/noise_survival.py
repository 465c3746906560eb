"""How much of ALP's noise survives being added to the hidden states in the model's dtype (issue 14, item 6).

One forward pass of SmolLM2-135M-Instruct (the embedded demo model) over a few chat prompts, with the perturbation
active on every layer, for each dtype (float32, bfloat16), noise scale (absolute, rms) and sigma; per layer, the RMS of
what was actually added over the RMS intended (`alp_trl.perturbation.noise_survival`, the `alp/noise_survival` metric).

    python benchmarks/noise_survival.py --out docs/noise_survival.json
"""

import argparse
import json
import os
import sys
import time

import torch


def measure(model, batch, sigma: float, noise_scale: str) -> dict[int, float]:
    from alp_trl.perturbation import LayerwisePerturbation

    perturbation = LayerwisePerturbation.attach(model, "all", sigma_init=sigma, noise_scale=noise_scale, seed=0)
    perturbation.track_survival = True
    try:
        with torch.no_grad(), perturbation.active(0):
            model(**batch)
        return {layer: round(float(v), 4) for layer, v in perturbation.survival_per_layer().items()}
    finally:
        perturbation.detach()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--sigmas", type=float, nargs="+", default=[1e-6, 1e-3, 0.02, 0.05])
    args = parser.parse_args()
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from bench import build_model

    prompts = [f"What is {i} + {2 * i + 7}? Think step by step." for i in range(4)]
    results = {"model": "SmolLM2-135M-Instruct", "prompts": prompts, "torch": torch.__version__, "runs": []}
    start = time.time()
    for dtype in (torch.float32, torch.bfloat16):
        model, tokenizer = build_model("smollm2", "cpu", dtype)
        texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False) for p in prompts]
        batch = tokenizer(texts, return_tensors="pt", padding=True)
        for noise_scale in ("absolute", "rms"):
            for sigma in args.sigmas:
                per_layer = measure(model, batch, sigma, noise_scale)
                values = list(per_layer.values())
                row = {
                    "dtype": str(dtype).split(".")[-1],
                    "noise_scale": noise_scale,
                    "sigma": sigma,
                    "mean": round(sum(values) / len(values), 4),
                    "layer0": values[0],
                    "min": min(values),
                    "max": max(values),
                    "per_layer": per_layer,
                }
                results["runs"].append(row)
                print(json.dumps({k: v for k, v in row.items() if k != "per_layer"}), flush=True)
    results["seconds"] = round(time.time() - start, 1)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
