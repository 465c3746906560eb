"""The report of a `coverage` experiment (the marginal-coverage test): a verdict table at the top, the distance of
each policy to the engine per sigma (mean ± std over seeds, and how many seeds the averaged policy wins), the Figure-2
envelope binned by rollout probability, and the figure."""

import statistics

from .figures import figure_file, figure_link, plot_coverage
from .grid import engine_id


POLICIES = ("unperturbed", "averaged", "temperature", "one_draw")
# For the paper: the averaged policy is closer to the engine than both the unperturbed policy and the temperature
# control in at least this share of seeds (4 of 5) on the positive control and on at least one realistic engine, at
# the setting fixed in advance: sigma = 1x the engine's scale, absolute noise (the paper's). The other settings are
# shown, as exploration, not counted.
WIN_SHARE = 0.8
PRIMARY_SETTING = ("absolute", 1)
BOOTSTRAP_RESAMPLES = 2000


def coverage_rows(records: list[dict]) -> list[dict]:
    """One row per (experiment, checkpoint, engine, noise scale, sigma multiplier) with the seeds' values.

    A seed's win is decided on the paired k1 difference KL(inf || averaged) - KL(inf || X) = mean over the engine's
    tokens of log p_X - log p_averaged (the engine's own log-prob cancels; the same tokens for every X): negative
    against both the policy and the temperature control."""
    rows = {}
    for record in records:
        unit = record["unit"]
        if unit["type"] != "coverage":
            continue
        for config in record.get("result", {}).get("configs", []) if record.get("status") == "ok" else []:
            key = (
                unit["experiment"],
                unit["checkpoint"],
                engine_id(unit["engine"]),
                config["noise_scale"],
                config["multiplier"],
            )
            row = rows.setdefault(key, {"key": key, "seeds": []})
            measured = config["rows"]
            kl = {name: measured[name]["kl_k1"] for name in POLICIES}
            diff = {x: kl["averaged"] - kl[x] for x in ("unperturbed", "temperature")}
            row["seeds"].append(
                {
                    "seed": unit["seed"],
                    "sigma": config["sigma"],
                    "temperature_T": config["temperature_T"],
                    "tokens": measured["unperturbed"]["count"],
                    **{f"kl_{name}": value for name, value in kl.items()},
                    **{f"kl3_{name}": measured[name]["kl_k3"] for name in POLICIES},
                    **{f"diff_{x}": value for x, value in diff.items()},
                    "averaged_wins": all(value < 0 for value in diff.values()),
                    "per_sequence": {n: measured[n].get("per_sequence") for n in ("averaged", *diff)},
                    "envelopes": {name: measured[name]["envelope"] for name in POLICIES},
                }
            )
    return list(rows.values())


def pooled_difference(seeds: list[dict], against: str, resamples: int = BOOTSTRAP_RESAMPLES) -> tuple | None:
    """KL(inf || averaged) - KL(inf || `against`) over the sequences of every seed pooled, and its 95% bootstrap
    interval (sequences resampled with replacement, a fixed seed); `None` when a seed lacks per-sequence values."""
    import random

    pairs = []
    for seed in seeds:
        averaged, other = seed["per_sequence"].get("averaged"), seed["per_sequence"].get(against)
        if not averaged or not other:
            return None
        pairs += [(o[0] - a[0], a[1]) for a, o in zip(averaged, other)]

    def estimate(sample):
        tokens = sum(n for _, n in sample)
        return sum(d for d, _ in sample) / max(tokens, 1)

    rng = random.Random(0)
    values = sorted(estimate([rng.choice(pairs) for _ in pairs]) for _ in range(resamples))
    return estimate(pairs), values[int(0.025 * resamples)], values[int(0.975 * resamples) - 1]


def _mean_std(values: list[float]) -> str:
    if not values:
        return "n/a"
    if len(values) == 1:
        return f"{values[0]:.3g}"
    return f"{statistics.mean(values):.3g} ± {statistics.stdev(values):.2g}"


def _interval(estimate: tuple | None) -> str:
    if estimate is None:
        return "n/a"
    value, low, high = estimate
    return f"{value:+.3g} [{low:+.2g}, {high:+.2g}]"


def verdicts(rows: list[dict], positive_controls: list[str]) -> list[dict]:
    """Per (experiment, checkpoint, engine): the wins at the setting fixed in advance (`PRIMARY_SETTING`) and whether
    they are at least `WIN_SHARE` of the seeds; beside it, for exploration only, the setting that won most seeds."""
    found = {}
    for row in rows:
        seeds, key = row["seeds"], row["key"][:3]
        wins = sum(s["averaged_wins"] for s in seeds)
        entry = found.setdefault(key, {"key": key, "wins": 0, "seeds": 0, "best": None})
        if row["key"][3:] == PRIMARY_SETTING:
            entry.update(wins=wins, seeds=len(seeds), winners=sorted(s["seed"] for s in seeds if s["averaged_wins"]))
        best = entry["best"]
        if best is None or wins / len(seeds) > best["wins"] / best["seeds"]:
            entry["best"] = {"setting": row["key"][3:], "wins": wins, "seeds": len(seeds)}
    for verdict in found.values():
        verdict["positive_control"] = verdict["key"][2] in positive_controls
        verdict["holds"] = verdict["seeds"] > 0 and verdict["wins"] >= WIN_SHARE * verdict["seeds"]
    return list(found.values())


def overall_verdict(
    found: list[dict], planned: list[str] | None = None, positive_controls: list[str] | None = None
) -> list[str]:
    """Per checkpoint, the issue's rule: for the paper when the averaged policy wins on the positive control AND on at
    least one realistic engine; against when it does not win even on the positive control. `planned`: every engine of
    the grid, so that one without results yet is named as not measured rather than counted as a loss."""
    lines = []
    for checkpoint in sorted({v["key"][1] for v in found}):
        mine = [v for v in found if v["key"][1] == checkpoint]
        unmeasured = [e for e in planned or [] if e not in {v["key"][2] for v in mine}]
        control = [v for v in mine if v["positive_control"]]
        realistic = [v for v in mine if not v["positive_control"]]
        controls_pending = [e for e in unmeasured if e in (positive_controls or [])]
        measured_controls = ", ".join(v["key"][2] for v in control)
        if control and not any(v["holds"] for v in control) and controls_pending:
            text = "undecided: at the setting fixed in advance the averaged policy is not closer in enough seeds on "
            text += f"{measured_controls}; another positive control is not measured yet"
        elif control and not any(v["holds"] for v in control):
            text = (
                "against the paper's mechanism: at the setting fixed in advance the averaged policy is not closer in "
            )
            text += "enough seeds, even on the positive control"
        elif control and any(v["holds"] for v in realistic):
            text = "for the paper: closer on the positive control and on at least one realistic engine"
        elif control and not realistic:
            text = "closer on the positive control; no realistic engine measured yet"
        elif control:
            held = [v["key"][2] for v in control if v["holds"]]
            missed = [v["key"][2] for v in control if not v["holds"]]
            text = f"closer on the positive control only ({', '.join(held)}"
            text += f"; not on {', '.join(missed)})" if missed else ")"
            text += f", not on the realistic engines measured ({', '.join(v['key'][2] for v in realistic)})"
        else:
            text = "no positive control in the grid: no verdict"
        pending = [v for v in mine if v["seeds"] < 5]
        if pending:
            text += f" (provisional: {len(pending)} engine(s) with fewer than 5 seeds)"
        if unmeasured:
            text += f"; not measured yet: {', '.join(unmeasured)}"
        lines.append(f"- **{checkpoint}**: {text}.")
    return lines


def coverage_section(records: list[dict], experiments: dict, images: str, command: str) -> list[str]:
    """The coverage experiments' part of the report (empty when the grid has none)."""
    rows = coverage_rows(records)
    if not rows:
        return []
    positive = [
        engine_id(e)
        for experiment in experiments.values()
        if experiment["kind"] == "coverage"
        for e in experiment["engines"]
        if e.get("positive_control")
    ]
    dates = sorted(r.get("started", "")[:10] for r in records if r["unit"]["type"] == "coverage" and "started" in r)
    lines = [
        "## Marginal coverage: is the noise-averaged policy closer to the engine?",
        "",
        "The quantity of the paper's theorem: KL(inference || pi_bar), pi_bar the perturbed policy averaged over "
        "the noise (K draws, the mean of their distributions), against the unperturbed policy and a control that "
        "smooths without noise (the unperturbed policy at the temperature T that gives it pi_bar's mean entropy), "
        "and one noise draw (what ALP's ratio uses). KL per token, k1 estimate on the tokens the engine sampled "
        "(unbiased; all four on the same tokens, so differences are paired). sigma = multiplier x the engine's "
        "scale: the sigma whose single draw is as far from the policy as the engine is (`matched_sigma`), measured on "
        "the first seed of each checkpoint and engine and reused for the others. 'wins': "
        "seeds where pi_bar is closer than both the policy and the temperature control; the verdict counts them at "
        "1x absolute only, fixed before the runs (the other 5 settings are exploration). With K draws, log pi_bar "
        "is estimated low (Jensen), which handicaps pi_bar, most at large sigma.",
        "",
        f"Verdicts (as of {dates[-1] if dates else 'n/a'}; reproduce: `{command}`):",
        "",
        "| checkpoint | engine | wins at 1x, absolute (fixed in advance) | seeds that won | verdict | "
        "exploration: most wins at |",
        "|---|---|---:|---|---|---|",
    ]
    for v in verdicts(rows, positive):
        _, checkpoint, engine = v["key"]
        role = " (positive control)" if v["positive_control"] else ""
        verdict = "averaged closer in enough seeds" if v["holds"] else "not closer in enough seeds"
        best = v["best"]
        lines.append(
            f"| {checkpoint} | {engine}{role} | {v['wins']} of {v['seeds']} | {v.get('winners') or 'none'} | {verdict} "
            f"| {best['setting'][0]}, "
            f"{best['setting'][1]:g}x ({best['wins']} of {best['seeds']}) |"
        )
    planned = [
        engine_id(e)
        for experiment in experiments.values()
        if experiment["kind"] == "coverage"
        for e in experiment["engines"]
    ]
    lines += ["", *overall_verdict(verdicts(rows, positive), planned, positive)]
    image = figure_file(images, "kl")
    if plot_coverage(rows, image):
        lines += [
            "",
            f"![coverage]({figure_link(image)})",
            "",
            "The figure: per checkpoint (row) and engine (column), how much farther from the engine each of the averaged "
            "policy, the temperature control and one draw is than the policy, as a share of the policy's KL "
            "(mean ± std over seeds; below 0: closer; symlog axis), against sigma in units of the engine's scale.",
        ]
    lines += [
        "",
        "Per setting (mean ± std over seeds; KL(inference || X) per token, k1; 'averaged - policy' and "
        "'averaged - temperature': the paired difference over every seed's sequences pooled, with its 95% bootstrap "
        "interval over sequences; below 0: the averaged policy is closer; n/a where the units were run before "
        "per-sequence values were stored):",
        "",
        "| checkpoint | engine | noise | x scale | sigma | seeds | tokens | policy | averaged | temperature (T) | "
        "one draw | averaged - policy | averaged - temperature | wins |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        _, checkpoint, engine, noise, multiplier = row["key"]
        seeds = row["seeds"]

        def values(name, seeds=seeds):
            return [s[name] for s in seeds]

        temperature = f"{_mean_std(values('kl_temperature'))} ({statistics.mean(values('temperature_T')):.3g})"
        lines.append(
            f"| {checkpoint} | {engine} | {noise} | {multiplier:g} | {statistics.mean(values('sigma')):.3g} | "
            f"{len(seeds)} | {sum(values('tokens'))} | {_mean_std(values('kl_unperturbed'))} | "
            f"{_mean_std(values('kl_averaged'))} | {temperature} | {_mean_std(values('kl_one_draw'))} | "
            f"{_interval(pooled_difference(seeds, 'unperturbed'))} | {_interval(pooled_difference(seeds, 'temperature'))} "
            f"| {sum(values('averaged_wins'))} of {len(seeds)} |"
        )
    lines += ["", *_envelope_tables(rows)]
    return lines


def _envelope_tables(rows: list[dict]) -> list[str]:
    """Figure 2 as a table: at 1x the engine's scale (absolute noise), the log-ratio log p_X(y) - log p_inf(y) per
    rollout-probability bin, quantiles averaged over seeds, tokens summed."""
    lines = [
        "Log-ratio to the engine by rollout probability (1x scale, absolute noise; quantiles averaged over seeds, "
        "tokens summed over seeds): p1 / p50 / p99 per policy.",
        "",
        "| checkpoint | engine | rollout prob. | tokens | policy | averaged | temperature | one draw |",
        "|---|---|---|---:|---|---|---|---|",
    ]
    for row in rows:
        _, checkpoint, engine, noise, multiplier = row["key"]
        if noise != "absolute" or multiplier != 1:
            continue
        bins = {}
        for seed in row["seeds"]:
            for name in POLICIES:
                for b in seed["envelopes"][name]:
                    entry = bins.setdefault((b["lo"], b["hi"]), {"count": 0, **{n: [] for n in POLICIES}})
                    entry[name].append(b)
                    if name == "unperturbed":
                        entry["count"] += b["count"]
        for (lo, hi), entry in sorted(bins.items()):
            cells = []
            for name in POLICIES:
                qs = entry[name]
                cells.append(
                    " / ".join(f"{statistics.mean(b[q] for b in qs):+.3f}" for q in ("q01", "q50", "q99"))
                    if qs
                    else "n/a"
                )
            lines.append(f"| {checkpoint} | {engine} | [{lo:g}, {hi:g}) | {entry['count']} | {' | '.join(cells)} |")
    return lines + [""]
