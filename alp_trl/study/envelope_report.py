"""The paper's Figure 2 as a table and a figure: after one update from the same checkpoint and rollouts, the quantile
envelope of the token log-ratio (training vs rollout) binned by the rollout's probability of the token, for Bypass
(its policy, at ALP's learning rate), ALP's perturbed policy (the ratio ALP trains with) and ALP's unperturbed policy,
beside the policy before the update; token counts per bin. From the units of an intervention experiment run with
`binned_envelopes: true`."""

import math
import statistics

from .figures import figure_file, figure_link
from .grid import config_id, engine_id
from .intervention_units import bypass_point_at_lr, power_law_interpolate


ENVELOPES = (  # (column, what it is)
    ("before", "policy before the update"),
    ("bypass", "Bypass after, same lr"),
    ("alp_perturbed", "ALP after, perturbed (its ratio)"),
    ("alp_unperturbed", "ALP after, unperturbed"),
)
MATCHED = ("bypass_matched", "Bypass after, ALP's update size")  # a width interpolated, not an envelope


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
        key = (unit["experiment"], engine_id(unit["engine"]), config_id(unit["config"]))
        row = rows.setdefault(key, {"key": key, "config": unit["config"], "seeds": [], "no_signal": []})
        if alp["update_size_kl"] == 0 and alp["update_size_reverse_k3"] == 0:  # all advantages 0: nothing moved
            row["no_signal"].append(unit["seed"])
            continue
        same_lr = bypass_point_at_lr(curve["points"], alp["lr"])
        if same_lr is None or "envelope" not in same_lr:
            continue
        envelopes = {
            "before": curve["envelope_before"],
            "bypass": same_lr["envelope"],
            "alp_perturbed": alp["envelopes"]["perturbed_vs_rollout"],
            "alp_unperturbed": alp["envelopes"]["unperturbed_vs_rollout"],
        }
        curves = [(p["update_size_kl"], {(b["lo"], b["hi"]): b for b in p["envelope"]}) for p in curve["points"]]
        row["seeds"].append(
            {
                "seed": unit["seed"],
                **{name: {(b["lo"], b["hi"]): b for b in bins} for name, bins in envelopes.items()},
                "alp_update_size": alp["update_size_kl"],
                "bypass_curve": curves,
            }
        )
    return list(rows.values())


def matched_width(seed: dict, lo_hi: tuple) -> float | None:
    """Bypass's envelope width p99 - p1 in one bin at ALP's update size (KL(before || after)), interpolated as a power
    law between its updates at several learning rates (`matched_bypass`'s rule); `None` outside their range."""
    points = [(size, bins[lo_hi]["q99"] - bins[lo_hi]["q01"]) for size, bins in seed["bypass_curve"] if lo_hi in bins]
    return power_law_interpolate(points, seed["alp_update_size"])


def bin_summary(row: dict) -> list[dict]:
    """Per rollout-probability bin of a row, over the seeds with tokens in it (`seeds`): their tokens there, each
    envelope's p1 and p99 and width p99 - p1 (means), Bypass's width at ALP's update size (mean over the `matched_seeds`
    where ALP's size is inside Bypass's range), and in how many seeds ALP's perturbed envelope is narrower than Bypass's
    at the same lr and ALP's unperturbed one narrower than Bypass's at the same size."""
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
        matched = {s["seed"]: matched_width(s, lo_hi) for s in present}
        widths = [w for w in matched.values() if w is not None]
        entry["bypass_matched_width"] = statistics.mean(widths) if widths else None
        entry["bypass_matched_width_std"] = statistics.stdev(widths) if len(widths) > 1 else 0.0
        entry["matched_seeds"] = len(widths)
        entry["alp_unperturbed_narrower_matched_seeds"] = sum(
            matched[s["seed"]] is not None
            and s["alp_unperturbed"][lo_hi]["q99"] - s["alp_unperturbed"][lo_hi]["q01"] < matched[s["seed"]]
            for s in present
        )
        entry["alp_narrower_seeds"] = sum(
            s["alp_perturbed"][lo_hi]["q99"] - s["alp_perturbed"][lo_hi]["q01"]
            < s["bypass"][lo_hi]["q99"] - s["bypass"][lo_hi]["q01"]
            for s in present
        )
        summary.append(entry)
    return summary


def envelope_section(records: list[dict], images: str) -> list[str]:
    """The Figure 2 section of a report: its figure, then one table per (engine, perturbation config)."""
    rows = envelope_rows(records)
    if not rows:
        return []
    image = figure_file(images, "envelopes")
    drawn = plot_envelopes(rows, image)
    lines = [
        "## Figure 2: the log-ratio envelope by rollout probability, after one update",
        "",
        *([f"![figure 2]({figure_link(image)})", ""] if drawn else []),
        "Tokens binned by the engine's probability of them; per bin the width p99 - p1 of the token log-ratio "
        "(policy vs rollout), mean ± std over seeds, for the policy before the update, Bypass after one update at "
        "ALP's learning rate, and ALP after its update (its perturbed policy, the ratio it trains with, and its "
        "unperturbed policy), and Bypass's width at ALP's update size (KL(before || after); interpolated per bin as a "
        "power law between Bypass's updates at several learning rates, n/a outside their range: a smaller update "
        "alone makes a narrower envelope). The last two columns count the seeds where ALP's envelope is the narrower. "
        "Tokens are summed over the seeds. The update sizes and the size-matched KL comparison, in both KL "
        "directions, are in the tables above.",
        "",
    ]
    lines += bin_tally(rows)
    for row in rows:
        seeds = sorted(s["seed"] for s in row["seeds"])
        config = row["config"]
        no_signal = (
            f"; left out, no learning signal (every rollout rewarded alike, so no update): {row['no_signal']}"
            if row["no_signal"]
            else ""
        )
        lines += [
            f"**{row['key'][1]}**, sigma {config['perturb_sigma_init']:g} {config['perturb_noise_scale']}, layers "
            f"{config['perturb_layers']} (seeds {seeds}{no_signal})",
            "",
        ]
        if not seeds:
            continue
        lines += [
            "| rollout prob | tokens | "
            + " | ".join(f"{label}: width" for _, label in (*ENVELOPES, MATCHED))
            + " | ALP perturbed narrower than Bypass, same lr | ALP unperturbed narrower than Bypass, same size |",
            "|---|---:|" + "---:|" * (len(ENVELOPES) + 3),
        ]
        for entry in bin_summary(row):
            widths = " | ".join(_width(entry, name) for name, _ in (*ENVELOPES, MATCHED))
            lines.append(
                f"| [{entry['lo']:g}, {entry['hi']:g}) | {entry['tokens']} | {widths} | "
                f"{entry['alp_narrower_seeds']} of {entry['seeds']} | "
                f"{entry['alp_unperturbed_narrower_matched_seeds']} of {entry['matched_seeds']} |"
            )
        lines.append("")
    return lines


def bin_tally(rows: list[dict]) -> list[str]:
    """Per rollout-probability bin, the comparisons of every row (engine x sigma) and seed added up: where the paper
    expects the narrowing most (low-probability tokens) this shows whether it is there. The comparisons share seeds
    and rollouts across sigmas, so they are not independent."""
    if len(rows) < 2:
        return []
    tally = {}
    for row in rows:
        for entry in bin_summary(row):
            counts = tally.setdefault((entry["lo"], entry["hi"]), [0, 0, 0, 0])
            counts[0] += entry["alp_narrower_seeds"]
            counts[1] += entry["seeds"]
            counts[2] += entry["alp_unperturbed_narrower_matched_seeds"]
            counts[3] += entry["matched_seeds"]
    return [
        "All engines, sigmas and seeds added up, per bin (the comparisons share seeds and rollouts across sigmas, so "
        "they are not independent):",
        "",
        "| rollout prob | ALP perturbed narrower than Bypass, same lr | ALP unperturbed narrower than Bypass, same size |",
        "|---|---:|---:|",
        *(f"| [{lo:g}, {hi:g}) | {a} of {n} | {b} of {m} |" for (lo, hi), (a, n, b, m) in sorted(tally.items())),
        "",
    ]


def _width(entry: dict, name: str) -> str:
    """`mean ± std` over the seeds; the value alone from one seed."""
    if entry.get(f"{name}_width") is None:
        return "n/a"
    seeds = entry["matched_seeds"] if name == MATCHED[0] else entry["seeds"]
    if seeds < 2:
        return f"{entry[f'{name}_width']:.3g}"
    return f"{entry[f'{name}_width']:.3g} ± {entry[f'{name}_width_std']:.2g}"


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
