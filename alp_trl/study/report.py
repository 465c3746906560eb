"""A study's markdown report (docs/evidence.md): the setup, the one-step intervention table (mean ± std over seeds),
each training experiment's table by method, every run, and the failed units; the figures beside it in `images/`."""

import collections
import math
import os
import statistics

from .coverage_report import coverage_section
from .envelope_report import envelope_section
from .figures import figure_file, figure_link, plot_intervention, plot_training
from .grid import BASE_MODEL, bypass_method, config_id, engine_id, slug
from .intervention_units import bypass_point_at_lr, matched_bypass
from .significance import blowup_verdict, fisher_exact_fewer, possible_verdicts
from .training_units import OWN_RATIO_SERIES, training_summaries


def mean_std(values: list[float]) -> str:
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return "n/a"
    if len(values) == 1:
        return f"{values[0]:.4g}"
    return f"{statistics.mean(values):.4g} ± {statistics.stdev(values):.2g}"


def intervention_rows(records: list[dict]) -> list[dict]:
    """One row per (experiment, engine, perturbation config): the seeds' values side by side."""
    bypass = {
        (r["unit"]["experiment"], engine_id(r["unit"]["engine"]), r["unit"]["seed"]): r["result"]["points"]
        for r in records
        if r["unit"]["type"] == "bypass_curve" and r.get("status") == "ok"
    }
    rows = {}
    for record in records:
        unit = record["unit"]
        if unit["type"] != "perturbation":
            continue
        key = (unit["experiment"], engine_id(unit["engine"]), config_id(unit["config"]))
        row = rows.setdefault(
            key, {"key": key, "config": unit["config"], "seeds": [], "failed": [], "pending": [], "no_signal": []}
        )
        if record.get("status") == "failed":
            row["failed"].append(unit["seed"])
        if record.get("status") != "ok":
            if record.get("status") != "failed":
                row["pending"].append(unit["seed"])
            continue
        res = record["result"]
        alp = res["alp_update"]
        points = bypass.get((unit["experiment"], engine_id(unit["engine"]), unit["seed"]), [])
        moved = alp["update_size_kl"] != 0 or alp["update_size_reverse_k3"] != 0
        if not moved:  # every advantage 0 (all rollouts rewarded alike): no update, nothing to compare after it
            row["no_signal"].append(unit["seed"])
        row["seeds"].append(
            {
                "seed": unit["seed"],
                "engine_kl": res["unperturbed"]["kl_k3"],
                "width_unperturbed": res["unperturbed"]["width_p01_p99"],
                "width_perturbed": res["perturbed"]["width_p01_p99"],
                "width_ratio": res["perturbed"]["width_p01_p99"] / max(res["unperturbed"]["width_p01_p99"], 1e-12),
                "kl_perturbed": res["perturbed"]["kl_k3"],
                "alp_update_size": alp["update_size_kl"] if moved else None,
                "alp_after_kl": alp["unperturbed_vs_rollout"]["kl_k3"] if moved else None,
                "bypass_matched_kl": matched_bypass(points, alp["update_size_kl"]),
                **(_after_update(res, points) if moved else {}),
            }
        )
    return list(rows.values())


def _after_update(result: dict, points: list[dict]) -> dict:
    """What the intervention stored after the update, side by side with Bypass: the width of each one's own ratio
    (ALP's perturbed policy, Bypass's policy, against the rollout) at the same learning rate; and, for Bypass matched to
    ALP's update size in each KL direction, Bypass's KL to the rollout and ALP's share of Bypass's reduction of it
    (engine KL - after) / (engine KL - Bypass's after): 1 = as much as Bypass, below 1 less."""
    alp, engine_kl = result["alp_update"], result["unperturbed"]["kl_k3"]
    same_lr = bypass_point_at_lr(points, alp["lr"])
    values = {
        "width_alp_ratio_after": alp["perturbed_vs_rollout"]["width_p01_p99"],
        "width_bypass_ratio_after": same_lr["vs_rollout"]["width_p01_p99"] if same_lr else None,
    }
    if same_lr:
        values["after_width_ratio"] = values["width_alp_ratio_after"] / max(values["width_bypass_ratio_after"], 1e-12)
    for direction, size_key in (("forward", "update_size_kl"), ("reverse", "update_size_reverse_k3")):
        matched = matched_bypass(points, alp[size_key], size_key=size_key)
        values[f"bypass_matched_kl_{direction}"] = matched
        reduction = engine_kl - matched if matched is not None else None
        share = (engine_kl - alp["unperturbed_vs_rollout"]["kl_k3"]) / reduction if reduction else None
        values[f"share_of_reduction_{direction}"] = share
    return values


def _own_seeds(grid: dict) -> str:
    own = [f"{e['name']}: {e['seeds']}" for e in grid["experiments"] if "seeds" in e]
    return f" ({'; '.join(own)})" if own else ""


def write_report(results: dict, path: str, command: str) -> None:
    """The markdown report: setup, every intervention row (mean ± std over seeds), every training run."""
    records, grid = results["records"], results["grid"]
    # each report's figures are named after it (images/<report>_<figure>.png): reports share docs/images
    image_dir = os.path.join(os.path.dirname(os.path.abspath(path)), "images")
    images = os.path.join(image_dir, os.path.splitext(os.path.basename(path))[0])
    lines = [
        *_setup_section(results, command),
        *_conclusion_section(grid),
        *coverage_section(records, {e["name"]: e for e in grid["experiments"]}, images, command),
        *_intervention_section(records, images),
        *envelope_section(records, images),
        *_training_section(records, grid, images),
        *_failed_section(records),
    ]
    with open(path, "w") as f:
        f.write("\n".join(lines))


def _setup_section(results: dict, command: str) -> list[str]:
    """The title, how to reproduce, the grid, the machines and how far the study got."""
    records, grid = results["records"], results["grid"]
    done = [r for r in records if r.get("status") == "ok"]
    failed = [r for r in records if r.get("status") == "failed"]
    missing = [r for r in records if r.get("status") == "not run"]
    machines = sorted({r.get("machine", "?") for r in done})
    seconds = sum(r.get("seconds", 0) for r in records)
    return [
        f"# {grid.get('title', 'Study report')}",
        "",
        f"Reproduce: `{command}` (resumable; `make {grid.get('make_target', 'study')}`). Grid: `{results['grid_path']}`, model "
        f"`{grid['model']}`, seeds {grid['seeds']}{_own_seeds(grid)}. Machine(s): {'; '.join(machines) or 'n/a'}. "
        f"Units: {len(done)} done, {len(failed)} failed, {len(missing)} not run yet; {seconds / 60:.1f} min of "
        f"compute in the finished units.{_provenance(done)}",
        "",
    ]


def _provenance(done: list[dict]) -> str:
    """When the finished units ran and with which commit of this code (units from before commits were recorded have
    none: rerunning them at today's code may differ)."""
    dates = sorted(r["started"][:10] for r in done if r.get("started"))
    if not dates:
        return ""
    commits = collections.Counter(r.get("commit") or "not recorded" for r in done)
    code = ", ".join(f"{commit} ({n} units)" for commit, n in sorted(commits.items()))
    return f" Run {dates[0]}{' to ' + dates[-1] if dates[-1] != dates[0] else ''}; code commit: {code}."


def _conclusion_section(grid: dict) -> list[str]:
    """The conclusion, written by hand in the grid file from the tables below, and dated there."""
    if not grid.get("conclusion"):
        return []
    return ["## Conclusion", "", grid["conclusion"].strip(), ""]


def _intervention_section(records: list[dict], images: str) -> list[str]:
    """The one-step intervention: its figure and one table row per (engine, perturbation config)."""
    rows = intervention_rows(records)
    if not rows:
        return []
    image = figure_file(images, "intervention")
    drawn = plot_intervention(rows, image)
    return [
        "## One-step intervention",
        "",
        *([f"![intervention]({figure_link(image)})", ""] if drawn else []),
        "Per engine and perturbation (mean ± std over seeds): the width p99 - p1 of the token log-ratio training vs "
        "rollout without noise and with it (ratio < 1: the perturbed envelope is narrower), the perturbed ratio's "
        "KL to the rollout, and after one ALP update the unperturbed policy's KL to the rollout beside Bypass's "
        "at the same update size (KL before -> after; interpolated as a power law between Bypass updates at "
        "several learning rates; n/a when ALP's update size is outside their range).",
        "",
        "| engine | noise | sigma | layers | seeds | engine KL | width unperturbed | width perturbed | ratio | "
        "KL perturbed | ALP update size | ALP after: KL to rollout | Bypass, matched size |",
        "|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        *(_intervention_row(row) for row in rows),
        "",
        "After the update, side by side with Bypass (mean ± std over seeds): the width p99 - p1 of each method's own "
        "ratio against the rollout at the same learning rate (ALP: its perturbed policy; ratio < 1: ALP's narrower), "
        "and Bypass matched to ALP's update size in each KL direction (forward: KL(before || after); reverse: "
        "KL(after || before)), with ALP's share of Bypass's change of the KL to the rollout, (engine KL - ALP after) "
        "/ (engine KL - Bypass after): where the update brings the policy closer to the rollout (logit noise), 1 "
        "is as much as Bypass and below 1 less; where the engine is closer to the policy than any update (bf16), "
        "both move away and above 1 means ALP moved farther.",
        "",
        "| engine | noise | sigma | layers | seeds | width ALP ratio after | width Bypass ratio after | ratio | "
        "Bypass matched (fwd) | share (fwd) | Bypass matched (rev) | share (rev) |",
        "|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        *(_after_update_row(row) for row in rows),
        "",
    ]


def _after_update_row(row: dict) -> str:
    seeds, config = row["seeds"], row["config"]

    def col(name):
        return mean_std([s.get(name) for s in seeds])

    return (
        f"| {row['key'][1]} | {config['perturb_noise_scale']} | {config['perturb_sigma_init']:g} | "
        f"{config['perturb_layers']} | {len(seeds)} | {col('width_alp_ratio_after')} | "
        f"{col('width_bypass_ratio_after')} | {col('after_width_ratio')} | {col('bypass_matched_kl_forward')} | "
        f"{col('share_of_reduction_forward')} | {col('bypass_matched_kl_reverse')} | "
        f"{col('share_of_reduction_reverse')} |"
    )


def _intervention_row(row: dict) -> str:
    seeds, config = row["seeds"], row["config"]

    def col(name):
        return mean_std([s.get(name) for s in seeds])

    label = f"{len(seeds)}" + (f" (failed: {row['failed']})" if row["failed"] else "")
    label += f" (not run yet: {row['pending']})" if row["pending"] else ""
    label += f" (no learning signal, no update: {row['no_signal']})" if row["no_signal"] else ""
    return (
        f"| {row['key'][1]} | {config['perturb_noise_scale']} | {config['perturb_sigma_init']:g} | "
        f"{config['perturb_layers']} | {label} | {col('engine_kl')} | {col('width_unperturbed')} | "
        f"{col('width_perturbed')} | {col('width_ratio')} | {col('kl_perturbed')} | "
        f"{col('alp_update_size')} | {col('alp_after_kl')} | {col('bypass_matched_kl')} |"
    )


def _training_section(records: list[dict], grid: dict, images: str) -> list[str]:
    """Per training experiment its figure and table by method, then every run."""
    train = [r for r in records if r["unit"]["type"] in ("train", "eval_base")]
    if not train:
        return []
    experiments = {e["name"]: e for e in grid["experiments"]}
    summaries = training_summaries(train, experiments)
    lines = ["## Training runs", ""]
    for name, experiment in experiments.items():
        runs = [r for r in train if r["unit"]["experiment"] == name]
        if runs:
            lines += _experiment_table(name, experiment, runs, summaries, images)
    return lines + _every_run_table(train, summaries) + _trend_table(train, summaries)


def _experiment_table(name: str, experiment: dict, runs: list[dict], summaries: dict, images: str) -> list[str]:
    """One training experiment: its figure and one row per method (the untrained model first, when evaluated)."""
    image = figure_file(images, slug(name))
    drawn = plot_training(runs, image, experiment)
    lines = [
        f"### {name}",
        "",
        *([f"![{name}]({figure_link(image)})", ""] if drawn else []),
        f"Per method, mean ± std over the seeds that finished. A spike is a step whose train-rollout KL "
        f"exceeds {experiment.get('spike_kl', 0.05):g} or whose grad norm exceeds "
        f"{experiment.get('spike_grad_norm', 10.0):g} (or is not finite). Under ALP the train side of the "
        "train-rollout KL is the perturbed policy; under Token-/Seq-MIS (rejection by dropping) the KL and the entropy "
        "are over the tokens the rejection keeps. Late reward: the mean over the second half of the steps.",
        "",
        "| method | seeds ok | failed | max train-rollout KL | max grad norm | spike frac | final reward | "
        "late reward | best reward | min entropy | final entropy | held-out avg@k | runs that blew up |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    has_base = any(r["unit"]["type"] == "eval_base" for r in runs)
    methods = [BASE_MODEL, *experiment["methods"]] if has_base else experiment["methods"]
    rows = [_method_row(method, runs, summaries) for method in methods]
    return (
        lines
        + rows
        + [""]
        + _blowup_tests(experiment, runs, summaries)
        + _blowup_verdict(experiment, runs, summaries)
        + _blowup_sensitivity(experiment, runs, summaries)
        + _blowup_positions(experiment, runs, summaries)
    )


def _finished(method: str, runs: list[dict], summaries: dict) -> list[dict]:
    """The summaries of `method`'s runs that finished."""
    return [summaries[id(r)] for r in runs if r["unit"]["method"] == method and r.get("status") == "ok"]


def _method_row(method: str, runs: list[dict], summaries: dict) -> str:
    ok = _finished(method, runs, summaries)
    bad = [r["unit"]["seed"] for r in runs if r["unit"]["method"] == method and r.get("status") == "failed"]

    def agg(key):
        return mean_std([s.get(key) for s in ok])

    return (
        f"| {method} | {len(ok)} | {bad or ''} | {agg('max_train_rollout_kl')} | {agg('max_grad_norm')} | "
        f"{agg('spike_frac')} | {agg('final_reward')} | {agg('late_reward')} | {agg('best_reward')} | "
        f"{agg('min_entropy')} | {agg('final_entropy')} | {agg('eval_avg_at_k')} | {_blowups(ok)} |"
    )


def _blowup_counts(summaries: list[dict]) -> tuple[int, int]:
    """(runs that blew up (`blowup_step`), runs whose ratio was logged against a declared limit) of finished runs."""
    logged = [s for s in summaries if s.get("blowup_declared") and ("tail_early" in s or "kl_early" in s)]
    return sum(s.get("blowup_step") is not None for s in logged), len(logged)


def _blowups(summaries: list[dict]) -> str:
    """`k of n`: how many of the runs judged blew up (`n/a` when none declares limits or logs its ratio)."""
    blown, logged = _blowup_counts(summaries)
    return f"{blown} of {logged}" if logged else "n/a"


def _blowup_verdict(experiment: dict, runs: list[dict], summaries: dict) -> list[str]:
    """The experiment's `verdict` rule (fixed before its runs) applied to the blow-up counts: the verdict once every
    run of both arms is judged, before that the verdicts the runs still to come can reach."""
    rule = experiment.get("verdict")
    if not rule:
        return []
    method, margin, total = rule["method"], rule["for_margin"], rule["runs"]
    bypass = bypass_method(experiment)
    (blown, judged), (bypass_blown, bypass_judged) = (
        _blowup_counts(_finished(arm, runs, summaries)) for arm in (method, bypass)
    )
    lines = [
        f"The verdict rule fixed in the grid: for the paper if {method} blows up in at least {margin} fewer of its "
        f"{total} runs than {bypass}, against if in as many or more, otherwise no verdict.",
        "",
    ]
    counts = f"{method} blew up in {blown} of {judged} runs, {bypass} in {bypass_blown} of {bypass_judged}"
    if judged >= total and bypass_judged >= total:
        return lines + [f"Verdict: **{blowup_verdict(blown, bypass_blown, margin)}** ({counts}).", ""]
    still = possible_verdicts((blown, judged), (bypass_blown, bypass_judged), total, margin)
    if len(still) == 1:  # every outcome of the runs to come gives the same verdict
        to_come = 2 * total - judged - bypass_judged
        return lines + [
            f"Verdict: **{still[0]}**, settled: no outcome of the runs still to come ({to_come}) can change it "
            f"({counts} so far).",
            "",
        ]
    return lines + [
        f"Verdict: open, {judged} of {total} runs of {method} and {bypass_judged} of {total} of {bypass} judged, "
        f"{blown} and {bypass_blown} of them blew up; the runs still to come can give: {', '.join(still)}.",
        "",
    ]


def _blowup_tests(experiment: dict, runs: list[dict], summaries: dict) -> list[str]:
    """Each method's blow-ups against the Bypass method's (`off_policy_correction: bypass`, its own or the
    experiment's) with Fisher's exact one-sided p: the chance of as few blow-ups or fewer if both had the same rate."""
    methods, bypass = experiment["methods"], bypass_method(experiment)
    counts = {method: _blowup_counts(_finished(method, runs, summaries)) for method in methods}
    others = [m for m, (_, logged) in counts.items() if m != bypass and logged]
    if bypass is None or not counts[bypass][1] or not others:
        return []
    bypass_blown, bypass_logged = counts[bypass]
    if not bypass_blown:
        return [f"No {bypass} run blew up ({bypass_logged} judged): no method can blow up less.", ""]
    lines = [
        f"Blow-ups against {bypass}: p is Fisher's exact one-sided test, the chance that the method would blow up in "
        f"as few of its runs as it did (or fewer) if both had the same rate.",
        "",
    ]
    for method in others:
        blown, logged = counts[method]
        p = fisher_exact_fewer(blown, logged, bypass_blown, bypass_logged)
        lines.append(
            f"- {method}: {blown} of {logged} against {bypass}'s {bypass_blown} of {bypass_logged}, p = {p:.3g}"
        )
    return lines + [""]


LIMIT_SCALES = (0.8, 0.9, 1.0, 1.1, 1.25)  # the blow-up limits scaled, for the sensitivity table


def _blowup_sensitivity(experiment: dict, runs: list[dict], summaries: dict) -> list[str]:
    """How near each run came to the blow-up limits (`blowup_peak`, by seed) and how many runs would count as blown
    up with both limits scaled by each of `LIMIT_SCALES`, with the experiment's verdict rule applied to those counts
    once every run is in (descriptive: the limits the endpoint uses are the ones fixed before the runs)."""
    by_seed = sorted(runs, key=lambda r: r["unit"]["seed"])
    peaks = {}
    for method in experiment["methods"]:
        found = [s["blowup_peak"] for s in _finished(method, by_seed, summaries) if s.get("blowup_peak") is not None]
        if found:
            peaks[method] = found
    if not peaks:
        return []
    rule, bypass = experiment.get("verdict"), bypass_method(experiment)
    judged = rule and all(len(peaks.get(m, [])) >= rule["runs"] for m in (rule["method"], bypass))
    lines = [
        "How near each run came to the blow-up limits: the largest share of a limit its policy's own ratio reached "
        "over the run (train-rollout KL over the KL limit, largest |log ratio| over its limit), by seed; above 1 the "
        "run blew up (descriptive):",
        "",
        *(
            f"- {method}: {', '.join(f'{peak:.4g}' for peak in found)} (median {statistics.median(found):.3g})"
            for method, found in peaks.items()
        ),
        "",
        "Runs that would count as blown up with both limits scaled (a sensitivity check, not the endpoint):",
        "",
        "| limits x | " + " | ".join(peaks) + (" | verdict by the rule |" if judged else " |"),
        "|---:|" + "---:|" * len(peaks) + ("---|" if judged else ""),
    ]
    for scale in LIMIT_SCALES:
        counts = {m: sum(peak > scale for peak in found) for m, found in peaks.items()}
        cells = [f"{counts[m]} of {len(found)}" for m, found in peaks.items()]
        verdict = [blowup_verdict(counts[rule["method"]], counts[bypass], rule["for_margin"])] if judged else []
        lines.append(f"| {scale:g} | " + " | ".join(cells + verdict) + " |")
    return lines + [""]


def _blowup_positions(experiment: dict, runs: list[dict], summaries: dict) -> list[str]:
    """Where on their generation batch the steps over the blow-up limits fell, each method's finished runs pooled
    (descriptive: the endpoint counts runs). Nothing when no run has a step over the limits or batches are 1 step."""
    pooled = {}
    for method in experiment["methods"]:
        positions = [s["blowup_positions"] for s in _finished(method, runs, summaries) if s.get("blowup_positions")]
        if positions:
            pooled[method] = [sum(column) for column in zip(*positions)]
    if not any(sum(counts) for counts in pooled.values()):
        return []
    updates = len(next(iter(pooled.values())))
    return [
        f"Steps over the blow-up limits by their update on the generation batch ({updates} updates per batch; the "
        "1st trains on rollouts the policy itself just sampled, so only the engine's mismatch separates them, the "
        f"{updates}th on rollouts {updates - 1} updates old), every finished run of a method pooled (descriptive):",
        "",
        *(f"- {method}: {' / '.join(map(str, counts))}" for method, counts in pooled.items()),
        "",
    ]


def _every_run_table(train: list[dict], summaries: dict) -> list[str]:
    return [
        "Every run:",
        "",
        "| experiment | method | seed | status | steps | max train-rollout KL | max grad norm | spike frac | "
        "final reward | best reward | held-out avg@k | seconds |",
        "|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        *(_run_row(record, summaries[id(record)]) for record in train),
        "",
    ]


def _run_row(record: dict, summary: dict) -> str:
    unit = record["unit"]

    def cell(key):
        value = summary.get(key)
        return "n/a" if value is None else f"{value:.4g}"

    return (
        f"| {unit['experiment']} | {unit['method']} | {unit['seed']} | {record.get('status')} | "
        f"{cell('steps')} | {cell('max_train_rollout_kl')} | {cell('max_grad_norm')} | {cell('spike_frac')} | "
        f"{cell('final_reward')} | {cell('best_reward')} | {cell('eval_avg_at_k')} | "
        f"{record.get('seconds', 'n/a')} |"
    )


def _trend_table(train: list[dict], summaries: dict) -> list[str]:
    """Each run's ratio tail and train-rollout KL over training: the first quarter of the steps against the last."""
    runs = [r for r in train if "tail_early" in summaries[id(r)]]
    if not runs:
        return []
    return [
        "The ratio over training (the paper's Figure 1 asks whether its tail grows): per run, the mean over the first "
        "quarter of the logged steps -> the mean over the last quarter, and the growth (last / first), of the largest "
        "|log ratio| of a step and of the train-rollout KL, as the update saw them (under ALP the perturbed policy it "
        "trains with; under a MIS rejection that drops tokens, the kept tokens only) and, where logged, of the "
        "policy's own ratio over every scored token (under ALP without the noise, `log_unperturbed_ratio`; under MIS "
        "the rejected tokens included); the spike steps in the second half of the run (thresholds above), the steps "
        "whose largest |log ratio| was not finite (left out of the means), and the first step where the policy's own "
        "ratio blew up (train-rollout KL above the experiment's `blowup_kl` or largest |log ratio| above its "
        "`blowup_log_ratio`, where it declares them; the policy's own ratio where logged) and how many steps did "
        "(descriptive: the endpoint counts runs).",
        "",
        "| experiment | method | seed | max abs log ratio | growth | train-rollout KL | growth | policy's own: max abs "
        "log ratio | growth | policy's own: KL | growth | spike steps, second half | non-finite ratio steps | "
        "first blow-up step | blow-up steps |",
        "|---|---|---:|---|---:|---|---:|---|---:|---|---:|---:|---:|---:|---:|",
        *(_trend_row(record, summaries[id(record)]) for record in runs),
        "",
    ]


def _trend_row(record: dict, summary: dict) -> str:
    unit = record["unit"]
    cells = []
    own = next((n for n in OWN_RATIO_SERIES if f"{n}_tail_early" in summary), OWN_RATIO_SERIES[0])
    for name in ("tail", "kl", f"{own}_tail", f"{own}_kl"):
        if f"{name}_early" not in summary:
            cells += ["n/a", "n/a"]
            continue
        growth = summary[f"{name}_growth"]
        cells += [
            f"{summary[f'{name}_early']:.3g} -> {summary[f'{name}_late']:.3g}",
            "n/a" if growth is None else f"{growth:.2f}",
        ]
    cells += [str(summary.get("late_spike_steps", "n/a")), str(summary.get("tail_nonfinite", "n/a"))]
    if not summary.get("blowup_declared"):
        cells += ["n/a", "n/a"]
    else:
        cells.append("none" if summary.get("blowup_step") is None else str(summary["blowup_step"]))
        cells.append(str(summary.get("blowup_step_count", "n/a")))
    return f"| {unit['experiment']} | {unit['method']} | {unit['seed']} | " + " | ".join(cells) + " |"


def _failed_section(records: list[dict]) -> list[str]:
    failed = [r for r in records if r.get("status") == "failed"]
    if not failed:
        return []
    return ["## Failed units", ""] + [f"- `{r['unit']['id']}`: {r.get('error')}" for r in failed] + [""]
