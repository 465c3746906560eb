"""A 2-point intervention grid on the tiny model, shared by the study tests."""

import yaml


def intervention_grid(tmp_path, model_dir, **extra) -> str:
    grid = {
        "model": str(model_dir),
        "seeds": [0],
        "experiments": [
            {
                "kind": "intervention",
                "name": "iv",
                "data": {
                    "num_prompts": 2,
                    "num_generations": 2,
                    "max_new_tokens": 6,
                    "batch_size": 4,
                    "reward": "diversity",
                },
                "engines": [{"rollout_mismatch": "logit_noise", "rollout_mismatch_std": 0.5}],
                "update_lr": 1e-3,
                "bypass_lr_multipliers": [0.5, 2],
                "perturbations": {"product": {"perturb_sigma_init": [0.01, 0.5]}},
            }
        ],
        **extra,
    }
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(grid))
    return str(path)
