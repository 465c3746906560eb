"""The figures of a study's report: the one-step intervention per engine, and the training curves of an experiment."""

import itertools
import os
import statistics

from .training_units import own_ratio_keys


def figure_file(images: str, name: str) -> str:
    """The file of a report's figure `name`: `<images>_<name>.png` (`images`: the images folder joined with the
    report's name, so that reports sharing a folder never overwrite each other's figures); the folder is created."""
    os.makedirs(os.path.dirname(images) or ".", exist_ok=True)
    return f"{images}_{name}.png"


def figure_link(path: str) -> str:
    """The markdown link to a figure from its report, which sits beside the images folder."""
    return f"images/{os.path.basename(path)}"


def plot_intervention(rows: list[dict], path: str) -> bool:
    """Per engine: the perturbed / unperturbed envelope width ratio vs sigma (all layers, per noise scale), and the KL
    to the rollout after one ALP update vs Bypass at the matched update size. Returns whether anything was drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    engines = sorted({row["key"][1] for row in rows if row["seeds"]})
    if not engines:
        return False
    fig, axes = plt.subplots(2, len(engines), figsize=(6 * len(engines), 8), squeeze=False, constrained_layout=True)
    for column, engine in enumerate(engines):
        for scale, color in (("absolute", "tab:blue"), ("rms", "tab:orange")):
            points = sorted(
                (row["config"]["perturb_sigma_init"], row["seeds"])
                for row in rows
                if row["key"][1] == engine
                and row["seeds"]
                and row["config"]["perturb_layers"] == "all"
                and row["config"]["perturb_noise_scale"] == scale
            )
            if not points:
                continue
            sigmas = [p[0] for p in points]
            for ax, key, style in ((axes[0][column], "width_ratio", "-"), (axes[1][column], "alp_after_kl", "-")):
                means = [statistics.mean(s[key] for s in seeds) for _, seeds in points]
                ax.plot(sigmas, means, style, marker="o", color=color, label=f"{scale}: ALP")
            matched = [
                [s["bypass_matched_kl"] for s in seeds if s["bypass_matched_kl"] is not None] for _, seeds in points
            ]
            xs = [x for x, m in zip(sigmas, matched) if m]
            if xs:
                axes[1][column].plot(
                    xs,
                    [statistics.mean(m) for m in matched if m],
                    "--",
                    marker="x",
                    color=color,
                    label=f"{scale}: Bypass, matched update size",
                )
        axes[0][column].axhline(1.0, color="k", lw=0.8)
        axes[0][column].set_title(f"{engine}: envelope width, perturbed / unperturbed")
        axes[1][column].set_title(f"{engine}: KL to the rollout after one update")
        for ax in (axes[0][column], axes[1][column]):
            ax.set_xscale("log")
            ax.set_xlabel("sigma")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


# The training figure's panels: (what is drawn, title, the experiment's blow-up limit drawn on it). "own_kl" and
# "own_tail" are the policy's own ratio to the rollout over every scored token (`own_ratio_keys`: under ALP without
# the noise, under MIS the rejected tokens included), the quantities the blow-up endpoint judges.
TRAINING_PANELS = (
    ("reward", "reward", None),
    ("own_kl", "policy's own train-rollout KL (k3)", "blowup_kl"),
    ("own_tail", "policy's own largest |log ratio| of a step", "blowup_log_ratio"),
    ("grad_norm", "grad norm", None),
    ("entropy", "entropy", None),
)


def plot_training(records: list[dict], path: str, experiment: dict | None = None) -> bool:
    """One panel per measure, one colour per method: every seed as a thin line, the mean over seeds thick; the
    experiment's blow-up limits (`blowup_kl`, `blowup_log_ratio`) as dashed lines where it declares them."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..plots import metric_series

    runs = [r for r in records if r.get("status") == "ok" and (r.get("result") or {}).get("history")]
    if not runs:
        return False
    methods = list(dict.fromkeys(r["unit"]["method"] for r in runs))
    fig, axes = plt.subplots(
        1, len(TRAINING_PANELS), figsize=(4.5 * len(TRAINING_PANELS), 3.8), constrained_layout=True
    )
    colors = plt.get_cmap("tab10")
    for index, method in enumerate(methods):
        color = colors(index % 10)
        histories = [r["result"]["history"] for r in runs if r["unit"]["method"] == method]
        for ax, (panel, title, _) in zip(axes, TRAINING_PANELS):
            curves = [dict(zip(*metric_series(history, _panel_key(panel, history)))) for history in histories]
            for curve in curves:
                ax.plot(list(curve), list(curve.values()), color=color, lw=0.6, alpha=0.35)
            steps = sorted(set().union(*curves))
            means = [statistics.mean(c[step] for c in curves if step in c) for step in steps]
            ax.plot(steps, means, color=color, lw=2, label=method if ax is axes[0] else None)
            ax.set_title(title, fontsize=9)
            ax.set_xlabel("step")
            ax.grid(alpha=0.3)
    for ax, (_, _, limit) in zip(axes, TRAINING_PANELS):
        if limit in (experiment or {}):
            ax.axhline(experiment[limit], color="k", ls="--", lw=0.8, label=f"{limit} {experiment[limit]:g}")
            ax.legend(fontsize=7)
    axes[0].legend(fontsize=7)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _panel_key(panel: str, history: list[dict]) -> str:
    """The logged metric a training panel draws for one run."""
    kl_key, tail_key = own_ratio_keys(history)
    return {"own_kl": kl_key, "own_tail": tail_key}.get(panel, panel)


def coverage_excess(seeds: list[dict], name: str) -> tuple[float, float]:
    """How much farther `name` is from the engine than the unperturbed policy, relative to the policy's distance:
    (KL(engine || name) - KL(engine || policy)) / the mean over seeds of KL(engine || policy), as mean and std over
    the seeds (std 0 for one seed). Below 0: closer to the engine than the policy. Normalised by the mean rather than
    seed by seed, because a seed's k1 estimate of a small KL can be near 0 or negative."""
    scale = abs(statistics.mean(s["kl_unperturbed"] for s in seeds)) or 1e-12
    excess = [(s[f"kl_{name}"] - s["kl_unperturbed"]) / scale for s in seeds]
    return statistics.mean(excess), statistics.stdev(excess) if len(excess) > 1 else 0.0


def plot_coverage(rows: list[dict], path: str) -> bool:
    """A grid of panels, one row per checkpoint and one column per engine: `coverage_excess` against the sigma
    multiplier, for the averaged policy, the temperature control and one draw, per noise scale (mean ± std over
    seeds; below 0: closer to the engine than the policy)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    checkpoints = sorted({row["key"][1] for row in rows})
    engines = sorted({row["key"][2] for row in rows})
    if not rows:
        return False
    fig, axes = plt.subplots(
        len(checkpoints),
        len(engines),
        figsize=(4 * len(engines), 3.5 * len(checkpoints)),
        squeeze=False,
        constrained_layout=True,
    )
    styles = {"averaged": "-", "temperature": ":", "one_draw": "--"}
    colors = {"absolute": "tab:blue", "rms": "tab:orange"}
    for (i, checkpoint), (j, engine) in itertools.product(enumerate(checkpoints), enumerate(engines)):
        ax = axes[i][j]
        ax.set_title(f"{checkpoint}: {engine}", fontsize=9)
        for noise in ("absolute", "rms"):
            selected = sorted(
                (r for r in rows if r["key"][1:4] == (checkpoint, engine, noise)), key=lambda r: r["key"][4]
            )
            if not selected:
                continue
            for name, style in styles.items():
                points = [coverage_excess(row["seeds"], name) for row in selected]
                ax.errorbar(
                    [r["key"][4] for r in selected],
                    [mean for mean, _ in points],
                    yerr=[std for _, std in points],
                    linestyle=style,
                    color=colors[noise],
                    marker="o",
                    ms=3,
                    capsize=2,
                    label=f"{name} ({noise})",
                )
        ax.axhline(0.0, color="k", lw=0.8)
        ax.set_xscale("log", base=2)
        ax.set_yscale("symlog", linthresh=1.0)  # one draw is far above 0; the averaged policy and the control near it
        ax.grid(alpha=0.3)
        if i == len(checkpoints) - 1:
            ax.set_xlabel("sigma / engine scale")
        if j == 0:
            ax.set_ylabel("(KL(engine||X) - KL(engine||policy))\n/ KL(engine||policy)", fontsize=8)
    axes[0][0].legend(fontsize=7)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True
