"""Training curves from a run's logged history: `alp-trl plot OUTPUT_DIR` (PNG files)."""

import argparse
import glob
import json
import os
import re

from .callbacks import METRICS_FILE


def load_history(output_dir: str) -> list[dict]:
    """Logged training records of a run: `metrics.jsonl`, else the newest checkpoint's `trainer_state.json`."""
    path = os.path.join(output_dir, METRICS_FILE)
    if os.path.exists(path):
        with open(path) as f:
            return [json.loads(line) for line in f if line.strip()]
    candidates = [os.path.join(output_dir, "trainer_state.json")]
    checkpoints = glob.glob(os.path.join(output_dir, "checkpoint-*", "trainer_state.json"))
    candidates += sorted(checkpoints, key=lambda p: int(re.search(r"checkpoint-(\d+)", p).group(1)), reverse=True)
    for candidate in candidates:
        if os.path.exists(candidate):
            with open(candidate) as f:
                return json.load(f)["log_history"]
    raise FileNotFoundError(f"No {METRICS_FILE} or trainer_state.json found under {output_dir!r}.")


def metric_series(history: list[dict], key: str) -> tuple[list[int], list[float]]:
    """The (steps, values) of one metric over a history: records where it is a number (booleans and `None` skipped)."""
    steps, values = [], []
    for record in history:
        value = record.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            steps.append(record.get("step", len(steps)))
            values.append(float(value))
    return steps, values


# panel title -> (metric keys, log scale)
PANELS = {
    "reward": (["reward"], False),
    "train vs rollout KL (k3)": (["alp/train_rollout_kl"], True),
    "token ratio tail (train / rollout)": (["alp/ratio/p50", "alp/ratio/p99", "alp/ratio/max"], True),
    "clip fraction": (["alp/clip_frac", "alp/dual_clip_frac", "clip_ratio/region_mean"], False),
    "entropy": (["entropy"], False),
    "sigma per layer": ([], True),  # filled with alp/sigma/layer_XX
    "tool use (code_tool)": (
        [
            "tools/calls_per_completion",
            "tools/turns_per_completion",
            "tools/void_turn_stops",
            "tools/tool_token_frac",
            "tools/failures/error",
            "tools/failures/timeout",
            "tools/failures/memory_limit",
            "tools/failures/unavailable",
        ],
        False,
    ),
    "noise survival (ALP)": (["alp/noise_survival"], False),
    "importance weights (train / rollout)": (["alp/is_weight_chi2", "alp/is_weight_ess_frac", "alp/ppl_ratio"], False),
}


def panel_keys(history: list[dict]) -> dict[str, list[str]]:
    """The metric keys each panel draws for this history (only those logged)."""
    train = [r for r in history if not any(k.startswith("eval_") for k in r) and "train_runtime" not in r]
    logged = {k for r in train for k, v in r.items() if isinstance(v, (int, float))}
    reward_keys = sorted(k for k in logged if k.startswith("rewards/") and k.endswith("/mean"))
    sigma_keys = sorted(k for k in logged if k.startswith("alp/sigma/layer_"))
    out = {}
    for name, (keys, _) in PANELS.items():
        keys = keys + reward_keys if name == "reward" else keys
        keys = sigma_keys if name == "sigma per layer" else keys
        out[name] = [k for k in keys if k in logged]
    return out


def plot_training_curves(history: list[dict], out_dir: str, title: str | None = None) -> list[str]:
    """Draw the paper's training diagnostics into `out_dir/training_curves.png`; returns the written paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [r for r in history if not any(k.startswith("eval_") for k in r) and "train_runtime" not in r]
    drawn_keys = panel_keys(history)
    fig, axes = plt.subplots(3, 3, figsize=(15, 12), constrained_layout=True)
    for ax, (name, (_, log_scale)) in zip(axes.flat, PANELS.items()):
        keys = drawn_keys[name]
        drawn = 0
        for key in keys:
            steps, values = metric_series(train, key)
            if not steps:
                continue
            label = key.removeprefix("alp/sigma/").removeprefix("alp/").removeprefix("rewards/").removeprefix("tools/")
            ax.plot(
                steps,
                values,
                marker="." if len(steps) < 50 else None,
                label=label,
                lw=1 if name == "sigma per layer" else 1.5,
            )
            drawn += 1
        if drawn and log_scale and all(v > 0 for k in keys for v in metric_series(train, k)[1]):
            ax.set_yscale("log")
        if not drawn:
            ax.text(0.5, 0.5, "not logged in this run", ha="center", va="center", transform=ax.transAxes)
        elif name != "sigma per layer" or drawn <= 12:
            ax.legend(fontsize=7)
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "training_curves.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="alp-trl plot", description="Draw training curves of an alp_trl run.")
    parser.add_argument("output_dir", help=f"the run's output_dir (holds {METRICS_FILE} or checkpoints)")
    parser.add_argument("--out", default=None, help="where to write the PNG files (default: OUTPUT_DIR/plots)")
    args = parser.parse_args(argv)
    try:
        history = load_history(args.output_dir)
    except FileNotFoundError as error:
        parser.error(str(error))
    paths = plot_training_curves(
        history,
        args.out or os.path.join(args.output_dir, "plots"),
        title=os.path.basename(os.path.normpath(args.output_dir)),
    )
    for path in paths:
        print(path)


if __name__ == "__main__":
    main()
