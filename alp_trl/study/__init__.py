"""`alp-trl study --grid GRID.yaml --out DIR`: run a declared grid of experiments with several seeds, resumably.

A grid is a YAML file with a `model` (optionally `dtype`, e.g. `bfloat16`, and `device`, e.g. `cuda`), `seeds` and a
list of `experiments`, each of a `kind`:

- `intervention` (the paper's Figure 2 question, one step, no training run): for every `engine` (a simulated
  inference engine, `rollout_mismatch` + `rollout_mismatch_std`, or the real one, `engine: vllm` with `dtype`) and
  seed, rollouts are sampled once and cached; then,
  on the same checkpoint and the same rollouts, each `perturbation` (sigma, noise scale, layers; a cartesian
  `product` and/or an explicit `list`) is measured: the token log-ratio envelope training vs rollout without and with
  the noise, and after one ALP update (`update_lr`) the unperturbed policy's distance to the rollout together with
  the size of the update (KL(before || after), the k3 estimate on the rollout tokens). One Bypass update per `bypass_lr_multipliers` gives the
  same distances at several update sizes, so that ALP is compared with Bypass at a matched update size. The update
  is `update_steps` steps of `update_optimizer` (`adamw`, fresh; or `sgd`, which keeps the gradient's magnitudes);
  `binned_envelopes: true` also stores the envelopes binned by the rollout's probability of the token
  (`envelope_bins`), the paper's Figure 2, with token counts.
- `coverage` (the quantity the paper's theorem bounds): `alp_trl.marginal_coverage` per checkpoint, engine and seed.
- `train`: the training entry point (`python -m alp_trl.train`) once per method and seed on a `recipe` with
  `overrides`; the run's `metrics.jsonl` is kept and summarised (largest train-rollout KL, fraction of spike steps,
  final and best reward).

An experiment may set its own `seeds`, replacing the grid's. Every unit of work (one perturbation config of one engine and seed, one Bypass curve, one training run) writes
`DIR/units/<id>.json` when it is done; a second invocation skips what exists, so an interruption loses at most the
unit in progress. `DIR/results.json` collects every unit, failed ones included (with their error), and
`--report PATH` writes the markdown report (tables as mean +- std over seeds, every run listed) and its plot
(`images/<report>_<figure>.png` beside the report, e.g. `images/evidence_intervention.png` for evidence.md).
"""

import argparse

from ..intervention import policy_logps
from .envelope_report import bin_summary, envelope_rows, envelope_section
from .figures import TRAINING_PANELS, plot_intervention, plot_training
from .grid import BASE_MODEL, config_id, engine_id, load_grid, only_experiments, perturbation_configs, plan_units, slug
from .intervention_units import (
    InterventionContext,
    log_ratio_summary,
    matched_bypass,
    measure_update_size,
    run_bypass_unit,
    run_perturbation_unit,
    sample_intervention_batch,
)
from .report import intervention_rows, mean_std, write_report
from .runner import collect, load_records, machine, run_study, run_unit, write_json_atomically
from .training_units import run_base_eval_unit, run_eval, run_train_unit, summarize_training, training_summaries


__all__ = [
    "BASE_MODEL",
    "TRAINING_PANELS",
    "InterventionContext",
    "bin_summary",
    "collect",
    "config_id",
    "engine_id",
    "envelope_rows",
    "envelope_section",
    "intervention_rows",
    "load_grid",
    "load_records",
    "log_ratio_summary",
    "machine",
    "main",
    "matched_bypass",
    "mean_std",
    "measure_update_size",
    "only_experiments",
    "perturbation_configs",
    "plan_units",
    "plot_intervention",
    "plot_training",
    "policy_logps",
    "run_base_eval_unit",
    "run_bypass_unit",
    "run_eval",
    "run_perturbation_unit",
    "run_study",
    "run_train_unit",
    "run_unit",
    "sample_intervention_batch",
    "slug",
    "summarize_training",
    "training_summaries",
    "write_json_atomically",
    "write_report",
]


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(
        prog="alp-trl study", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--grid", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--only", nargs="*", default=None, help="only these experiments of the grid")
    parser.add_argument("--report", default=None, help="write the markdown report here (e.g. docs/evidence.md)")
    parser.add_argument(
        "--report-only", action="store_true", help="run nothing: collect the finished units and write the report"
    )
    args = parser.parse_args(argv)
    try:
        load_grid(args.grid)
    except (OSError, ValueError) as error:
        parser.error(str(error))
    if args.report_only:
        grid = load_grid(args.grid)
        results = collect(grid, args.grid, args.out, only_experiments(plan_units(grid), args.only))
    else:
        results = run_study(args.grid, args.out, args.only)
    if args.report:
        command = f"alp-trl study --grid {args.grid} --out {args.out} --report {args.report}"
        write_report(results, args.report, command)
        print(f"wrote {args.report}")
    return results
