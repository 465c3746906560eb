"""`alp-trl` command line: `alp-trl train|plot|diagnose|eval|compare|vllm-serve|study ...` (each subcommand has its
own `--help`)."""

import sys


COMMANDS = {
    "train": (
        "alp_trl.train",
        "train with a recipe: alp-trl train --config recipes/.../config.yaml [--field value ...]",
    ),
    "plot": ("alp_trl.plots", "draw training curves of a run: alp-trl plot OUTPUT_DIR"),
    "diagnose": (
        "alp_trl.intervention",
        "importance-ratio envelope with/without perturbation: alp-trl diagnose MODEL_DIR",
    ),
    "eval": ("alp_trl.evaluate", "avg@k / pass@k on math benchmarks: alp-trl eval MODEL --benchmarks gsm8k --k 4"),
    "compare": ("alp_trl.compare", "ALP vs baselines under one simulated mismatch: alp-trl compare [--max-steps N]"),
    "vllm-serve": (
        "alp_trl.vllm_serve",
        "a vLLM server for vllm_mode=server training (CPU too): alp-trl vllm-serve MODEL [--port 8000]",
    ),
    "study": ("alp_trl.study", "a resumable grid of experiments and seeds: alp-trl study --grid GRID.yaml --out DIR"),
}


def main(argv=None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        lines = [f"  {name:<8} {help_text}" for name, (_, help_text) in COMMANDS.items()]
        message = "usage: alp-trl {" + ",".join(COMMANDS) + "} ...\n\ncommands:\n" + "\n".join(lines)
        if argv and argv[0] not in ("-h", "--help"):
            print(f"alp-trl: unknown command {argv[0]!r}\n\n{message}", file=sys.stderr)
            sys.exit(2)
        print(message)
        return
    import importlib

    module = importlib.import_module(COMMANDS[argv[0]][0])
    sys.argv = [f"alp-trl {argv[0]}", *argv[1:]]
    module.main(argv[1:])


if __name__ == "__main__":
    main()
