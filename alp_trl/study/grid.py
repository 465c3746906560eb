"""A study's grid file: its validation, the perturbation configs of an intervention experiment, and the plan of
units of work with their stable ids."""

import itertools
import math


BASE_MODEL = "base model (not trained)"  # the `method` of the untrained model's evaluation unit
EXPERIMENT_KINDS = ("intervention", "train", "coverage")


def load_grid(path: str) -> dict:
    """Read and validate a grid file; errors name the key."""
    import yaml

    with open(path) as f:
        grid = yaml.safe_load(f) or {}
    for key in ("model", "seeds", "experiments"):
        if key not in grid:
            raise ValueError(f"The grid {path} needs `{key}`.")
    if not isinstance(grid["seeds"], list) or not grid["seeds"]:
        raise ValueError("`seeds` must be a non-empty list of integers.")
    for index, experiment in enumerate(grid["experiments"]):
        kind = experiment.get("kind")
        if kind not in EXPERIMENT_KINDS:
            raise ValueError(f"`experiments[{index}].kind` got {kind!r}; allowed values are {list(EXPERIMENT_KINDS)}.")
        if "name" not in experiment:
            raise ValueError(f"`experiments[{index}]` needs a `name`.")
        if kind == "train" and not experiment.get("methods"):
            raise ValueError(f"`experiments[{index}].methods` must name at least one method.")
        for limit in ("blowup_kl", "blowup_log_ratio"):
            value = experiment.get(limit, 1.0)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 < value < math.inf:
                raise ValueError(f"`experiments[{index}].{limit}` must be a positive number, got {value!r}.")
        if kind == "train" and "verdict" in experiment:
            _check_verdict(experiment, index)
        if kind in ("coverage", "intervention"):
            _check_engines(experiment, index)
        if kind == "coverage":
            _check_coverage(experiment, index)
        if kind == "intervention" and experiment.get("binned_envelopes"):
            if 1 not in experiment.get("bypass_lr_multipliers", [0.5, 1, 2]):
                raise ValueError(
                    f"`experiments[{index}].bypass_lr_multipliers` must include 1 with `binned_envelopes`: the "
                    "envelopes compare Bypass and ALP at the same learning rate."
                )
        if kind == "intervention" and experiment.get("update_optimizer", "adamw") not in ("adamw", "sgd"):
            raise ValueError(
                f"`experiments[{index}].update_optimizer` got {experiment['update_optimizer']!r}; "
                "allowed values are ['adamw', 'sgd']."
            )
    return grid


def declares_blowup(experiment: dict) -> bool:
    """Whether the experiment judges blow-ups: it sets `blowup_kl` or `blowup_log_ratio` (a blow-up is relative to
    the engine's own mismatch, so there is no default)."""
    return "blowup_kl" in experiment or "blowup_log_ratio" in experiment


def bypass_method(experiment: dict) -> str | None:
    """A training experiment's Bypass method (`off_policy_correction: bypass`, its own or the experiment's
    `overrides`), the control the others' blow-ups are compared against; `None` when it has none."""
    shared = experiment.get("overrides", {})
    for method, overrides in experiment["methods"].items():
        if {**shared, **(overrides or {})}.get("off_policy_correction") == "bypass":
            return method
    return None


def _check_verdict(experiment: dict, index: int) -> None:
    """A training experiment's `verdict` rule: `method` (one of its methods, not the Bypass one) against its Bypass
    method, `for_margin` and `runs` positive integers, and blow-up limits to judge the runs by."""
    where, rule = f"`experiments[{index}].verdict`", experiment["verdict"]
    if not isinstance(rule, dict) or set(rule) != {"method", "for_margin", "runs"}:
        raise ValueError(f"{where} must have exactly the keys ['for_margin', 'method', 'runs'], got {rule!r}.")
    bypass = bypass_method(experiment)
    if bypass is None:
        raise ValueError(f"{where} compares against a Bypass method: give one `off_policy_correction: bypass`.")
    allowed = [m for m in experiment["methods"] if m != bypass]
    if rule["method"] not in allowed:
        raise ValueError(f"{where}.method got {rule['method']!r}; allowed values are {allowed}.")
    for key in ("for_margin", "runs"):
        if not isinstance(rule[key], int) or isinstance(rule[key], bool) or rule[key] < 1:
            raise ValueError(f"{where}.{key} must be a positive integer, got {rule[key]!r}.")
    if not declares_blowup(experiment):
        raise ValueError(f"{where} needs blow-up limits: set `blowup_kl` and/or `blowup_log_ratio`.")


def _check_engines(experiment: dict, index: int) -> None:
    """An experiment's `engines`: at least one; `engine`, where given, names the real engine (`vllm`)."""
    where = f"`experiments[{index}]`"
    if not experiment.get("engines"):
        raise ValueError(f"{where}.engines must name at least one engine.")
    for engine in experiment["engines"]:
        if "engine" in engine and engine["engine"] != "vllm":
            raise ValueError(f"{where}: an engine's `engine` got {engine['engine']!r}; allowed values are ['vllm'].")


def _check_coverage(experiment: dict, index: int) -> None:
    """A coverage experiment's keys, before anything runs."""
    where = f"`experiments[{index}]`"
    for name, spec in (experiment.get("checkpoints") or {"base": {}}).items():
        if name != "base" and "recipe" not in spec:
            raise ValueError(f"{where}.checkpoints.{name} needs a `recipe` to train it from the grid's model.")
    for scale in experiment.get("noise_scales", ["absolute", "rms"]):
        if scale not in ("absolute", "rms"):
            raise ValueError(f"{where}.noise_scales: got {scale!r}; allowed values are ['absolute', 'rms'].")
    if int(experiment.get("draws", 8)) < 1:
        raise ValueError(f"{where}.draws must be >= 1.")


def perturbation_configs(spec: dict) -> list[dict]:
    """The perturbation configs of an intervention: the cartesian `product` of its lists, then the explicit `list`."""
    configs = []
    product = spec.get("product") or {}
    if product:
        keys = list(product)
        for values in itertools.product(*(product[k] for k in keys)):
            configs.append(dict(zip(keys, values)))
    configs += list(spec.get("list") or [])
    for config in configs:
        config.setdefault("perturb_noise_scale", "absolute")
        config.setdefault("perturb_layers", "all")
    return configs


def slug(value) -> str:
    """A file-name-safe form of a name: letters, digits, `.` and `-` kept, anything else `_`."""
    return "".join(c if c.isalnum() or c in ".-" else "_" for c in str(value))


def engine_id(engine: dict) -> str:
    """`vllm-bfloat16` for the real engine, else the simulated engine's kind and std (`logit_noise0.3`)."""
    if engine.get("engine") == "vllm":
        return f"vllm-{engine.get('dtype', 'bfloat16')}"
    kind = engine.get("rollout_mismatch", "none")
    std = engine.get("rollout_mismatch_std")
    return kind if not std else f"{kind}{std:g}"


def config_id(config: dict) -> str:
    layers = slug(config["perturb_layers"])
    return f"{config['perturb_noise_scale']}-s{config['perturb_sigma_init']:g}-{layers}".replace("+", "")


def plan_units(grid: dict) -> list[dict]:
    """Every unit of work of a grid, in order, with a stable id (the name of its result file)."""
    units = []
    for experiment in grid["experiments"]:
        name = experiment["name"]
        for seed in experiment.get("seeds", grid["seeds"]):
            if experiment["kind"] == "intervention":
                for engine in experiment["engines"]:
                    base = f"{name}__{engine_id(engine)}__seed{seed}"
                    units.append(
                        {
                            "id": f"{base}__bypass",
                            "type": "bypass_curve",
                            "experiment": name,
                            "engine": engine,
                            "seed": seed,
                        }
                    )
                    for config in perturbation_configs(experiment["perturbations"]):
                        units.append(
                            {
                                "id": f"{base}__{config_id(config)}",
                                "type": "perturbation",
                                "experiment": name,
                                "engine": engine,
                                "seed": seed,
                                "config": config,
                            }
                        )
            elif experiment["kind"] == "coverage":
                continue  # planned below: checkpoint first, then engine, then seed
            else:
                if experiment.get("eval"):  # the untrained model's held-out accuracy, the reference for the runs
                    units.append(
                        {
                            "id": f"{name}__base_model__seed{seed}",
                            "type": "eval_base",
                            "experiment": name,
                            "method": BASE_MODEL,
                            "seed": seed,
                        }
                    )
                for method in experiment["methods"]:
                    units.append(
                        {
                            "id": f"{name}__{slug(method)}__seed{seed}",
                            "type": "train",
                            "experiment": name,
                            "method": method,
                            "seed": seed,
                        }
                    )
        if experiment["kind"] == "coverage":
            units += coverage_units(experiment, grid["seeds"])
    return units


def coverage_units(experiment: dict, grid_seeds: list[int]) -> list[dict]:
    """A coverage experiment's units, checkpoint by checkpoint: the `checkpoint` unit that trains it (not for `base`),
    then one `coverage` unit per engine and seed (every seed of an engine lands before the next engine starts)."""
    name, units = experiment["name"], []
    checkpoints = experiment.get("checkpoints") or {"base": {}}
    for checkpoint, spec in checkpoints.items():
        if checkpoint != "base":  # trained right before it is measured
            units.append(
                {
                    "id": f"{name}__checkpoint__{slug(checkpoint)}",
                    "type": "checkpoint",
                    "experiment": name,
                    "checkpoint": checkpoint,
                    "seed": spec.get("seed", 0),
                }
            )
        for engine in experiment["engines"]:
            for seed in experiment.get("seeds", grid_seeds):
                units.append(
                    {
                        "id": f"{name}__{slug(checkpoint)}__{engine_id(engine)}__seed{seed}",
                        "type": "coverage",
                        "experiment": name,
                        "checkpoint": checkpoint,
                        "engine": engine,
                        "seed": seed,
                    }
                )
    return units


def only_experiments(units: list[dict], only: list[str] | None) -> list[dict]:
    """The units of the experiments named in `only` (`--only`); all of them when it names none."""
    return [u for u in units if u["experiment"] in only] if only else units
