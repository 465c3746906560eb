"""The Python tool's sandbox: every limit and isolation it promises, each asserting the exact status returned."""

import os
import shutil
import subprocess

import pytest

from alp_trl.sandbox import (
    OUTPUT_LIMIT,
    TRUNCATION_MARKER,
    _package_dirs,
    run_python,
    run_python_batch,
    sandbox_status,
)


AVAILABLE, REASON = sandbox_status()
# In CI the sandbox must be there (.ci/run installs bubblewrap); elsewhere its absence skips these tests with the reason.
pytestmark = pytest.mark.skipif(not AVAILABLE and not os.environ.get("CI"), reason=REASON)


def test_ordinary_code_runs():
    result = run_python("import math\nprint(math.factorial(5), 2 ** 10)")
    assert result.status == "ok" and result.output == "120 1024\n"


@pytest.mark.skipif(not _package_dirs(), reason="this environment's packages are not readable by the sandbox user")
def test_the_environments_packages_are_importable():
    result = run_python("import sympy\nprint(sympy.factorint(360))")
    assert result.status == "ok" and result.output == "{2: 3, 3: 2, 5: 1}\n"


def test_infinite_loop_stops_at_the_time_limit():
    result = run_python("while True:\n    pass", timeout=1.5)
    assert result.status == "timeout" and "timed out after 1.5 s" in result.output
    assert result.seconds < 10


def test_sleeping_code_stops_at_the_wall_clock_limit():
    result = run_python("import time\ntime.sleep(60)", timeout=1.0)
    assert result.status == "timeout" and result.seconds < 10


def test_a_4_gib_allocation_fails_at_the_memory_limit():
    result = run_python("x = bytearray(4 * 2**30)\nprint('allocated')", memory_mb=512)
    assert result.status == "memory_limit" and "MemoryError" in result.output and "allocated" not in result.output


def test_a_fork_bomb_is_contained():
    result = run_python("import os\nwhile True:\n    os.fork()", timeout=5)
    assert result.status == "error" and "Resource temporarily unavailable" in result.output
    leftover = subprocess.run(["pgrep", "-u", "nobody", "-f", "sandbox/main.py"], capture_output=True, text=True)
    assert leftover.stdout.strip() == "", "no process of the bomb outlives the call"
    assert run_python("print('still fine')").status == "ok"


@pytest.mark.parametrize("address", [("127.0.0.1", 22), ("1.1.1.1", 80)])
def test_no_network_local_or_public(address):
    code = f"import socket\nsocket.create_connection({address!r}, timeout=2)\nprint('connected')"
    result = run_python(code)
    assert result.status == "error" and "connected" not in result.output.splitlines()
    assert "Connection refused" in result.output or "Network is unreachable" in result.output


def test_writes_only_inside_the_temporary_directory(tmp_path):
    inside = run_python("open('notes.txt', 'w').write('x')\nprint(open('notes.txt').read())")
    assert inside.status == "ok" and inside.output == "x\n"
    target = tmp_path / "escape.txt"
    outside = run_python(f"open({str(target)!r}, 'w').write('x')")
    assert outside.status == "error" and not target.exists()
    system = run_python("open('/usr/escape.txt', 'w').write('x')")
    assert system.status == "error" and "Read-only file system" in system.output
    assert not os.path.exists("/usr/escape.txt")


def test_the_trainers_files_and_secrets_are_not_visible(monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_secret_value")
    repo_file = os.path.abspath(__file__)
    code = (
        "import os\n"
        "print('env', sorted(k for k in os.environ if 'TOKEN' in k or k.startswith('HF')))\n"
        f"print('repo', os.path.exists({repo_file!r}))\n"
        f"print('home', os.path.exists(os.path.expanduser('~root')) and os.listdir(os.path.expanduser('~root')))\n"
        "print('etc', os.path.exists('/etc/passwd'))\n"
    )
    result = run_python(code)
    assert result.status == "ok"
    assert result.output == "env []\nrepo False\nhome False\netc False\n"


def test_huge_output_is_truncated_with_a_marker():
    result = run_python("print('x' * 200000)")
    assert result.status == "ok" and result.output.endswith(TRUNCATION_MARKER)
    assert len(result.output) == OUTPUT_LIMIT + len(TRUNCATION_MARKER)


def test_syntax_errors_non_utf8_output_and_empty_code():
    assert run_python("def (:").status == "error"
    raw = run_python("import sys\nsys.stdout.buffer.write(b'\\xff\\xfe ok')")
    assert raw.status == "ok" and raw.output.endswith(" ok") and "\ufffd" in raw.output
    empty = run_python("")
    assert empty.status == "ok" and empty.output == ""


def test_batch_runs_concurrently():
    results = run_python_batch(["import time\ntime.sleep(1)\nprint(1)"] * 4, timeout=5, max_workers=4)
    assert [r.status for r in results] == ["ok"] * 4
    assert max(r.seconds for r in results) < 3.5


def test_unavailable_sandbox_runs_nothing(monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    result = run_python("open('/tmp/should-not-exist', 'w')")
    assert result.status == "unavailable" and "bubblewrap" in result.output
