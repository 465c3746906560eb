"""Calls per second of the Python tool's sandbox: `run_python("print(1)")` one after another and 16 at once.

    python benchmarks/sandbox_bench.py [--compare OLD_SANDBOX.py] [--calls 20] [--repeats 2]

`--compare` loads another version of `alp_trl/sandbox.py` (e.g. `git show REV:alp_trl/sandbox.py > old.py`) and
measures both, interleaved, in the same run.
"""

import argparse
import importlib.util
import os
import sys
import time


sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def load(path: str, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def measure(module, calls: int) -> tuple[float, float]:
    module.run_python("print(1)")
    start = time.time()
    for _ in range(calls):
        assert module.run_python("print(1)").status == "ok"
    sequential = calls / (time.time() - start)
    start = time.time()
    results = module.run_python_batch(["print(1)"] * 16, max_workers=16)
    assert all(r.status == "ok" for r in results)
    return sequential, 16 / (time.time() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--compare", default=None)
    parser.add_argument("--calls", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    import alp_trl.sandbox as current

    versions = {"current": current}
    if args.compare:
        versions = {"compared": load(args.compare, "sandbox_compared"), **versions}
    for repeat in range(args.repeats):
        for name, module in versions.items():
            sequential, concurrent = measure(module, args.calls)
            print(
                f"{name} (repeat {repeat}): {sequential:.1f} calls/s one after another, {concurrent:.1f} for 16 at once"
            )


if __name__ == "__main__":
    main()
