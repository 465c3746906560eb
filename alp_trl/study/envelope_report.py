"""The paper's Figure 2 as a table and a figure: after one update from the same checkpoint and rollouts, the quantile
envelope of the token log-ratio (training vs rollout) binned by the rollout's probability of the token, for Bypass
(its policy, at ALP's learning rate), ALP's perturbed policy (the ratio ALP trains with) and ALP's unperturbed policy,
beside the policy before the update; token counts per bin. From the units of an intervention experiment run with
`binned_envelopes: true`."""

import math
import os
import statistics

from .grid import config_id, engine_id


ENVELOPES = (  # (column, what it is)
    ("before", "policy before the update"),
    ("bypass", "Bypass after, same lr"),
    ("alp_perturbed", "ALP after, perturbed (its ratio)"),
    ("alp_unperturbed", "ALP after, unperturbed"),
)


def envelope_rows(records: list[dict]) -> list[dict]:
    """One row per (experiment, engine, perturbation config) whose units stored binned envelopes: per seed, each
    envelope of `ENVELOPES` as `{(lo, hi): bin}`."""
    bypass = {
        (r["unit"]["experiment"], engine_id(r["unit"]["engine"]), r["unit"]["seed"]): r["result"]
        for r in records
        if r["unit"]["type"] == "bypass_curve" and r.get("status") == "ok" and "envelope_before" in r["result"]
    }
    rows = {}
    for record in records:
        unit = record["unit"]
        if unit["type"] != "perturbation" or record.get("status") != "ok":
            continue
        alp = record["result"]["alp_update"]
        curve = bypass.get((unit["experiment"], engine_id(unit["engine"]), unit["seed"]))
        if "envelopes" not in alp or curve is None:
            continue
        same_lr = next((p for p in curve["points"] if math.isclose(p["lr"], alp["lr"], rel_tol=1e-9)), None)
        if same_lr is None or "envelope" not in same_lr:
            continue
        key = (unit["experiment"], engine_id(unit["engine"]), config_id(unit["config"]))
        row = rows.setdefault(key, {"key": key, "config": unit["config"], "seeds": []})
        envelopes = {
            "before": curve["envelope_before"],
            "bypass": same_lr["envelope"],
            "alp_perturbed": alp["envelopes"]["perturbed_vs_rollout"],
            "alp_unperturbed": alp["envelopes"]["unperturbed_vs_rollout"],
        }
        row["seeds"].append(
            {"seed": unit["seed"], **{name: {(b["lo"], b["hi"]): b for b in bins} for name, bins in envelopes.items()}}
        )
    return list(rows.values())


def bin_summary(row: dict) -> list[dict]:
    """Per rollout-probability bin of a row: the tokens in it over all seeds, each envelope's p1 and p99 and width
    p99 - p1 (means over the seeds that have tokens there), and in how many seeds ALP's perturbed envelope is narrower
    than Bypass's."""
    bins = sorted({b for seed in row["seeds"] for b in seed["before"]})
    summary = []
    for lo_hi in bins:
        present = [s for s in row["seeds"] if all(lo_hi in s[name] for name, _ in ENVELOPES)]
        if not present:
            continue
        entry = {"lo": lo_hi[0], "hi": lo_hi[1], "tokens": sum(s["before"][lo_hi]["count"] for s in present)}
        entry["seeds"] = len(present)
        for name, _ in ENVELOPES:
            widths = [s[name][lo_hi]["q99"] - s[name][lo_hi]["q01"] for s in present]
            entry[f"{name}_q01"] = statistics.mean(s[name][lo_hi]["q01"] for s in present)
            entry[f"{name}_q99"] = statistics.mean(s[name][lo_hi]["q99"] for s in present)
            entry[f"{name}_width"] = statistics.mean(widths)
            entry[f"{name}_width_std"] = statistics.stdev(widths) if len(widths) > 1 else 0.0
        entry["alp_narrower_seeds"] = sum(
            s["alp_perturbed"][lo_hi]["q99"] - s["alp_perturbed"][lo_hi]["q01"]
            < s["bypass"][lo_hi]["q99"] - s["bypass"][lo_hi]["q01"]
            for s in present
        )
        summary.append(entry)
    return summary


def envelope_section(records: list[dict], image_dir: str) -> list[str]:
    """The Figure 2 section of a report: its figure, then one table per (engine, perturbation config)."""
    rows = envelope_rows(records)
    if not rows:
        return []
    os.makedirs(image_dir, exist_ok=True)
    drawn = plot_envelopes(rows, os.path.join(image_dir, "figure2_envelopes.png"))
    lines = [
        "## Figure 2: the log-ratio envelope by rollout probability, after one update",
        "",
        *(["![figure 2](images/figure2_envelopes.png)", ""] if drawn else []),
        "Tokens binned by the engine's probability of them; per bin the width p99 - p1 of the token log-ratio "
        "(policy vs rollout), mean ± std over seeds, for the policy before the update, Bypass after one update at "
        "ALP's learning rate, and ALP after its update (its perturbed policy, the ratio it trains with, and its "
        "unperturbed policy); `ALP narrower` counts the seeds whose perturbed envelope is narrower than Bypass's. "
        "Tokens are summed over the seeds. The update sizes and the size-matched comparison, in both KL directions, "
        "are in the tables above.",
        "",
    ]
    for row in rows:
        seeds = sorted(s["seed"] for s in row["seeds"])
        config = row["config"]
        lines += [
            f"**{row['key'][1]}**, sigma {config['perturb_sigma_init']:g} {config['perturb_noise_scale']}, layers "
            f"{config['perturb_layers']} (seeds {seeds})",
            "",
            "| rollout prob | tokens | "
            + " | ".join(f"{label}: width" for _, label in ENVELOPES)
            + " | ALP narrower |",
            "|---|---:|" + "---:|" * len(ENVELOPES) + "---:|",
        ]
        for entry in bin_summary(row):
            widths = " | ".join(
                f"{entry[f'{name}_width']:.3g} ± {entry[f'{name}_width_std']:.2g}" for name, _ in ENVELOPES
            )
            lines.append(
                f"| [{entry['lo']:g}, {entry['hi']:g}) | {entry['tokens']} | {widths} | "
                f"{entry['alp_narrower_seeds']} of {entry['seeds']} |"
            )
        lines.append("")
    return lines


def plot_envelopes(rows: list[dict], path: str) -> bool:
    """One panel per (engine, perturbation config): p1 and p99 of each envelope per rollout-probability bin (means
    over seeds), the paper's Figure 2 drawn from this repository's units."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summaries = [(row, bin_summary(row)) for row in rows]
    summaries = [(row, summary) for row, summary in summaries if summary]
    if not summaries:
        return False
    columns = min(3, len(summaries))
    lines_of_panels = math.ceil(len(summaries) / columns)
    fig, axes = plt.subplots(
        lines_of_panels, columns, figsize=(5.5 * columns, 4 * lines_of_panels), squeeze=False, constrained_layout=True
    )
    colors = {"before": "k", "bypass": "tab:gray", "alp_perturbed": "tab:blue", "alp_unperturbed": "tab:orange"}
    for index, (row, summary) in enumerate(summaries):
        ax = axes[index // columns][index % columns]
        x = list(range(len(summary)))
        for name, label in ENVELOPES:
            style = ":" if name == "before" else "-"
            ax.plot(x, [e[f"{name}_q99"] for e in summary], style, color=colors[name], marker="o", ms=3, label=label)
            ax.plot(x, [e[f"{name}_q01"] for e in summary], style, color=colors[name], marker="o", ms=3)
        ax.axhline(0.0, color="k", lw=0.5)
        ax.set_xticks(x, [f"<{e['hi']:g}\n(n={e['tokens']})" for e in summary], fontsize=7)
        config = row["config"]
        ax.set_title(
            f"{row['key'][1]}: sigma {config['perturb_sigma_init']:g} {config['perturb_noise_scale']}", fontsize=9
        )
        ax.set_xlabel("rollout probability of the token (bin)")
        ax.set_ylabel("log-ratio p1 / p99")
        ax.grid(alpha=0.3)
        if index == 0:
            ax.legend(fontsize=7)
    for index in range(len(summaries), lines_of_panels * columns):
        axes[index // columns][index % columns].axis("off")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
