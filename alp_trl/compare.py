"""`make compare` / `alp-trl compare`: ALP against the baselines under the same simulated mismatch and seeds.

Each method trains from the same model on the same prompts with the same seed, its rollouts sampled by the same
simulated inference engine (`--rollout-mismatch`, bf16 weights by default), through the normal entry point
(`python -m alp_trl.train`), one run after another. The script then reads every run's `metrics.jsonl` and writes a
markdown table (means over the last half of the steps, and worst values over the run) and a plot of the curves.

    python -m alp_trl.compare --recipe recipes/SmolLM2-135M-Instruct/alp/config_demo.yaml --max-steps 12
"""

import argparse
import json
import os

from .plots import load_history
from .train_launch import launch_training_run


_SEQ = ["--importance_sampling_level", "sequence"]
METHODS = {
    "ALP (token)": ["--off_policy_correction", "alp"],
    "ALP (seq)": ["--off_policy_correction", "alp", *_SEQ],
    "Bypass (token)": ["--off_policy_correction", "bypass"],
    "Bypass (seq)": ["--off_policy_correction", "bypass", *_SEQ],
    "Token-MIS": ["--off_policy_correction", "token_mis"],
    "Seq-MIS": ["--off_policy_correction", "seq_mis"],
    "TIS": ["--off_policy_correction", "tis"],
    "Seq-TIS": ["--off_policy_correction", "seq_tis"],
    # the GRPO baseline through the shared objective (same clamp, dual clip, metrics as the others)
    "GRPO": ["--off_policy_correction", "ppo"],
    # TRL's own GRPO loss (no dual clip or clamp; no ratio metrics unless log_rollout_mismatch)
    "GRPO (TRL)": ["--off_policy_correction", "none", "--log_rollout_mismatch", "true"],
}
DEFAULT_METHODS = ["ALP (token)", "Bypass (token)", "Token-MIS", "GRPO"]
# column -> (metric, reduction over the run)
COLUMNS = {
    "reward (last half)": ("reward", "late_mean"),
    "accuracy (last half)": ("rewards/accuracy/mean", "late_mean"),
    "train-rollout KL (mean)": ("alp/train_rollout_kl", "mean"),
    "ratio p99 (mean)": ("alp/ratio/p99", "mean"),
    "ratio max (max)": ("alp/ratio/max", "max"),
    "clip frac (mean)": ("clip_ratio/region_mean", "mean"),
    "engine |dlogp| (mean)": ("rollout_mismatch/logp_abs_diff_mean", "mean"),
    "step time s (mean)": ("step_time", "mean"),
}


def _slug(method: str) -> str:
    """`"ALP (seq)"` -> `"alp_seq"`: the run folder of a method."""
    return "_".join("".join(c if c.isalnum() else " " for c in method.lower()).split())


def run_args(args: argparse.Namespace) -> list[str]:
    """The training flags every method's run shares (after its own flags and `--output_dir`)."""
    return [
        "--max_steps",
        str(args.max_steps),
        "--seed",
        str(args.seed),
        "--rollout_mismatch",
        args.rollout_mismatch,
        "--rollout_mismatch_std",
        str(args.rollout_mismatch_std),
        "--save_strategy",
        "no",
        "--auto_resume",
        "false",
        "--plot",
        "false",
        *args.overrides,
    ]


def reduce(history: list[dict], key: str, how: str) -> float | None:
    values = [r[key] for r in history if isinstance(r.get(key), (int, float))]
    if not values:
        return None
    if how == "late_mean":
        values = values[len(values) // 2 :]
    return max(values) if how == "max" else sum(values) / len(values)


def table(histories: dict[str, list[dict]]) -> str:
    lines = ["| method | " + " | ".join(COLUMNS) + " |", "|---|" + "---:|" * len(COLUMNS)]
    for method, history in histories.items():
        cells = []
        for key, how in COLUMNS.values():
            value = reduce(history, key, how)
            cells.append("n/a" if value is None else f"{value:.4g}")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(histories: dict[str, list[dict]], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [
        ("reward", "reward"),
        ("alp/train_rollout_kl", "train-rollout KL (k3)"),
        ("alp/ratio/p99", "token ratio p99"),
        ("alp/ratio/max", "token ratio max"),
        ("clip_ratio/region_mean", "clip fraction"),
        ("entropy", "entropy"),
    ]
    fig, axes = plt.subplots(2, 3, figsize=(15, 8), constrained_layout=True)
    for ax, (key, title) in zip(axes.flat, keys):
        for method, history in histories.items():
            points = [(r["step"], r[key]) for r in history if isinstance(r.get(key), (int, float))]
            if points:
                ax.plot(*zip(*points), marker=".", label=method)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(
        prog="alp-trl compare", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--recipe", default="recipes/SmolLM2-135M-Instruct/alp/config_demo.yaml")
    parser.add_argument("--out", default="outputs/compare")
    parser.add_argument("--methods", nargs="+", default=DEFAULT_METHODS, choices=list(METHODS))
    parser.add_argument("--max-steps", type=int, default=12)
    parser.add_argument("--rollout-mismatch", default="bf16")
    parser.add_argument("--rollout-mismatch-std", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("overrides", nargs="*", help="extra `--field value` overrides for every run (after --)")
    args = parser.parse_args(argv)

    histories, timings = {}, {}
    for method in args.methods:
        run = launch_training_run(
            args.recipe,
            os.path.join(args.out, _slug(method)),
            run_args(args),
            leading_args=METHODS[method],
            check=True,
            log_prefix=f"[compare] {method}: ",
        )
        timings[method] = round(run.seconds, 1)
        histories[method] = load_history(run.output_dir)

    os.makedirs(args.out, exist_ok=True)
    markdown = table(histories)
    plot(histories, os.path.join(args.out, "compare.png"))
    with open(os.path.join(args.out, "compare.md"), "w") as f:
        f.write(markdown + "\n")
    with open(os.path.join(args.out, "compare.json"), "w") as f:
        json.dump({"args": vars(args), "seconds": timings, "histories": histories}, f)
    print(markdown)
    print(f"wrote {args.out}/compare.md, compare.png, compare.json")
    return histories


if __name__ == "__main__":
    main()
