"""Shared by the vLLM benchmarks: run one measurement in a fresh process (vLLM keeps process-wide state) and write a
report as JSON plus its markdown table."""

import json
import os
import subprocess
import sys


def run_worker(script: str, args: list[str]) -> dict:
    """Run `python script args...`, which prints one `RESULT <json>` line; return that JSON (exit with its stderr if
    there is none)."""
    done = subprocess.run([sys.executable, script, *args], capture_output=True, text=True, check=False)
    line = next((x for x in done.stdout.splitlines() if x.startswith("RESULT ")), None)
    if line is None:
        raise SystemExit(f"{' '.join(args)}: the worker failed\n{done.stderr[-3000:]}")
    return json.loads(line[len("RESULT ") :])


def write_report(report: dict, out: str, table: str) -> None:
    """`out` (JSON) and the markdown `table` beside it (same name, `.md`); the table is printed too."""
    with open(out, "w") as f:
        json.dump(report, f, indent=1)
    with open(os.path.splitext(out)[0] + ".md", "w") as f:
        f.write(table)
    print(table)
