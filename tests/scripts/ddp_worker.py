"""Worker of tests/test_distributed.py: trains ALP a few steps in every process, then writes what each rank holds."""

import json
import os
import sys

import torch
from datasets import Dataset

from alp_trl.tiny_models import build_tiny_causal_lm, build_tiny_tokenizer
from tests.helpers import build_trainer, tiny_config


def reward(completions, **kwargs):
    return [len(set(c[0]["content"])) / 10.0 for c in completions]


def main(out_dir: str) -> None:
    tokenizer = build_tiny_tokenizer()
    model = build_tiny_causal_lm("qwen2", vocab_size=len(tokenizer), seed=0)
    dataset = Dataset.from_dict({"prompt": [[{"role": "user", "content": f"What is {i} + 1?"}] for i in range(32)]})
    args = tiny_config(os.path.join(out_dir, "run"), max_steps=3, perturb_sigma_init=0.05, perturb_lr=0.1)
    trainer = build_trainer(model, tokenizer, dataset, args, reward_funcs=reward)
    trainer.train()
    perturbation = trainer.perturbation
    hidden = torch.ones(2, 3, 32)
    with perturbation.active(step=7, micro_step=1), torch.no_grad():
        eps = (perturbation(hidden, 0) - hidden) / perturbation.sigma[0]
    weights = trainer.model.model.layers[0].self_attn.q_proj.weight.detach()
    record = {
        "rank": trainer.accelerator.process_index,
        "world_size": trainer.accelerator.num_processes,
        "noise_rank": perturbation.rank,
        "sigma": perturbation.sigma.tolist(),
        "sigma_moved": not torch.allclose(perturbation.sigma, torch.full_like(perturbation.sigma, 0.05)),
        "eps": eps.flatten()[:16].tolist(),
        "weight_checksum": float(weights.double().sum()),
    }
    with open(os.path.join(out_dir, f"rank{record['rank']}.json"), "w") as f:
        json.dump(record, f)
    # tear gloo down while the interpreter is alive: left to interpreter finalisation it can abort (SIGABRT)
    trainer.accelerator.wait_for_everyone()
    trainer.accelerator.end_training()


if __name__ == "__main__":
    main(sys.argv[1])
