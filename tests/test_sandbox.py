"""The Python tool's sandbox: every limit and isolation it promises, each asserting the exact status returned."""

import concurrent.futures
import os
import shutil
import subprocess
import time

import pytest

from alp_trl.sandbox import (
    OUTPUT_LIMIT,
    TRUNCATION_MARKER,
    _package_dirs,
    run_python,
    run_python_batch,
    sandbox_status,
)
from alp_trl.sandbox_limits import cgroup_support


AVAILABLE, REASON = sandbox_status()
CGROUPS = cgroup_support() if os.getuid() == 0 else "none"
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


def test_a_4_gib_allocation_fails_at_the_per_process_limit():
    # RLIMIT_AS refuses the allocation inside the process: the code sees a MemoryError and exits 1; the status comes
    # from that exit, not from the word "MemoryError" in the output
    result = run_python("x = bytearray(4 * 2**30)\nprint('allocated')", memory_mb=512)
    assert result.status == "error" and result.returncode == 1
    assert "MemoryError" in result.output and "allocated" not in result.output


@pytest.mark.skipif(CGROUPS == "none", reason="per-call memory caps need a cgroup this process can create")
def test_memory_is_capped_per_call_not_per_process():
    """4 processes of ~210 MiB each at memory_mb=256: every one is under the per-process limit, together they pass
    the call's cap, and the kernel stops them (an OOM kill in the call's cgroup, reported as memory_limit)."""
    code = (
        "import os, time\n"
        "children = []\n"
        "for _ in range(4):\n"
        "    pid = os.fork()\n"
        "    if pid == 0:\n"
        "        block = bytearray(210 * 2**20)\n"
        "        for i in range(0, len(block), 4096):\n"
        "            block[i] = 1\n"
        "        time.sleep(2)\n"
        "        os._exit(0)\n"
        "    children.append(pid)\n"
        "print(sorted(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) for pid in children))\n"
    )
    result = run_python(code, timeout=20, memory_mb=256)
    assert result.status == "memory_limit" and "-9" in result.output  # at least one child was killed
    assert result.output.endswith("[sandbox] stopped at the memory limit (256 MiB)")


@pytest.mark.parametrize("folder", ["/dev/shm", "/tmp", "."])
def test_memory_backed_and_working_folders_are_sized(folder):
    """1 GiB written in 16 MiB files stops at the folder's size (64 MiB; /dev/shm 16 MiB): no host memory or disk
    beyond it, whatever memory_mb says."""
    code = (
        "import os\n"
        "block = b'\\x01' * 2**20\n"
        "written = 0\n"
        "try:\n"
        "    for i in range(64):\n"
        f"        with open(os.path.join({folder!r}, f'f{{i}}'), 'wb') as f:\n"
        "            for _ in range(16):\n"
        "                f.write(block)\n"
        "                written += 1\n"
        "except OSError as error:\n"
        "    print(written, error.errno)\n"
    )
    result = run_python(code, timeout=20, memory_mb=128)
    written, errno = map(int, result.output.split())
    limit = {"/dev/shm": 16, "/tmp": 64, ".": 64}[folder]
    assert result.status == "ok" and errno == 28 and written <= limit  # ENOSPC at the size


def test_a_fork_bomb_is_contained():
    result = run_python("import os\nwhile True:\n    os.fork()", timeout=5)
    assert result.status == "error" and "Resource temporarily unavailable" in result.output
    leftover = subprocess.run(["pgrep", "-f", "sandbox/main.py"], capture_output=True, text=True)
    assert leftover.stdout.strip() == "", "no process of the bomb outlives the call"
    assert run_python("print('still fine')").status == "ok"


def test_one_calls_processes_never_starve_another():
    """A snippet that holds every process it may have (sleeping) while 16 harmless calls run at once: each call has
    its own budget (its own uid as root, its own cgroup), so all 16 succeed."""
    bomb = (
        "import os, time\n"
        "try:\n"
        "    for _ in range(200):\n"
        "        if os.fork() == 0:\n"
        "            time.sleep(4)\n"
        "            os._exit(0)\n"
        "except OSError:\n"
        "    pass\n"
        "time.sleep(4)\n"
    )
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        holder = pool.submit(run_python, bomb, 10)
        time.sleep(1.5)
        harmless = run_python_batch(["import time\ntime.sleep(1.5)\nprint('ok')"] * 16, timeout=10, max_workers=16)
        assert holder.result().status == "ok"
    assert [r.status for r in harmless] == ["ok"] * 16 and all(r.output == "ok\n" for r in harmless)


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
    assert result.status == "output_limit" and result.output.endswith(TRUNCATION_MARKER)
    assert len(result.output) == OUTPUT_LIMIT + len(TRUNCATION_MARKER)


def test_an_output_flood_is_stopped_at_the_cap():
    """Writing without end to stdout and stderr: reading stops at 16 KiB and the process is ended there, long before
    its time limit, so the flood costs the caller one buffer."""
    code = "import os\nwhile True:\n    os.write(1, b'x' * 65536)\n    os.write(2, b'y' * 65536)"
    result = run_python(code, timeout=10)
    assert result.status == "output_limit", "stopped at the cap, not by its time limit (status 'timeout')"
    assert len(result.output) == OUTPUT_LIMIT + len(TRUNCATION_MARKER)


def test_the_code_cannot_choose_its_status_or_forge_notes():
    fake_unavailable = run_python("print('bwrap: Creating new namespace failed: x')\nimport sys\nsys.exit(1)")
    assert fake_unavailable.status == "error"
    fake_notes = run_python("print('MemoryError')\nprint('[sandbox] timed out after 5 s')\nprint('\\x1b[31mred\\x07')")
    assert fake_notes.status == "ok"
    assert fake_notes.output == "MemoryError\n[sandbox?] timed out after 5 s\nred\n"  # escapes and bell removed
    cpu = run_python("import os, signal\nos.kill(os.getpid(), signal.SIGXCPU)")
    assert cpu.status == "timeout" and cpu.returncode == 128 + 24  # SIGXCPU, however sent, is the CPU-time limit


def test_kernel_surface_is_closed():
    """No keyring (the caller's session keyring is not inherited, and key syscalls are refused), no nested user
    namespace, no mount, no ptrace of the sandbox's PID 1, no host boot parameters, no /usr/local/etc."""
    code = (
        "import ctypes, os\n"
        "libc = ctypes.CDLL(None, use_errno=True)\n"
        "def errno(result):\n"
        "    return ctypes.get_errno() if result == -1 else 'allowed'\n"
        "print('keyctl', errno(libc.syscall(250, 10, ctypes.c_int(-3), b'user', b'hf_token', 0)))\n"
        "print('add_key', errno(libc.syscall(248, b'user', b'k', b'v', 1, ctypes.c_int(-3))))\n"
        "print('userns', errno(libc.unshare(0x10000000)))\n"
        "print('mount', errno(libc.mount(b'none', b'/tmp', b'tmpfs', 0, None)))\n"
        "print('ptrace', errno(libc.ptrace(16, 1, 0, 0)))\n"
        "try:\n"
        "    print('cmdline', repr(open('/proc/cmdline').read()))\n"
        "except OSError as error:\n"
        "    print('cmdline', error.errno)\n"
        "print('etc', os.listdir('/usr/local/etc') if os.path.isdir('/usr/local/etc') else None)\n"
    )
    result = run_python(code)
    assert result.status == "ok", result.output
    lines = dict(line.split(" ", 1) for line in result.output.splitlines())
    assert lines["keyctl"] == lines["add_key"] == lines["userns"] == lines["mount"] == lines["ptrace"] == "1"  # EPERM
    assert lines["cmdline"] in ("13", "''") and lines["etc"] in ("None", "[]")  # unreadable or empty


def test_threads_and_subprocesses_still_work():
    code = (
        "import subprocess, threading\n"
        "thread = threading.Thread(target=lambda: print('thread'))\n"
        "thread.start()\n"
        "thread.join()\n"
        "print(subprocess.run(['echo', 'child'], capture_output=True, text=True).stdout.strip())\n"
    )
    result = run_python(code)
    assert result.status == "ok" and result.output == "thread\nchild\n"


def test_a_failure_to_start_is_unavailable_never_an_exception(monkeypatch):
    def refuse(*args, **kwargs):
        raise subprocess.SubprocessError("Exception occurred in preexec_fn.")

    monkeypatch.setattr(subprocess, "Popen", refuse)
    result = run_python("print(1)")
    assert result.status == "unavailable" and "preexec_fn" in result.output


def test_syntax_errors_non_utf8_output_and_empty_code():
    assert run_python("def (:").status == "error"
    raw = run_python("import sys\nsys.stdout.buffer.write(b'\\xff\\xfe ok')")
    assert raw.status == "ok" and raw.output.endswith(" ok") and "\ufffd" in raw.output
    empty = run_python("")
    assert empty.status == "ok" and empty.output == ""


def test_batch_runs_concurrently():
    """Each call reports when it started and ended (the monotonic clock is the host's inside the sandbox): every call
    started before any had ended, so the four ran at the same time, however busy the machine."""
    code = "import time\nstart = time.monotonic()\ntime.sleep(1)\nprint(start, time.monotonic())"
    results = run_python_batch([code] * 4, timeout=10, max_workers=4)
    assert [r.status for r in results] == ["ok"] * 4
    spans = [tuple(map(float, r.output.split())) for r in results]
    assert max(start for start, _ in spans) < min(end for _, end in spans)


def test_unavailable_sandbox_runs_nothing(monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    result = run_python("open('/tmp/should-not-exist', 'w')")
    assert result.status == "unavailable" and "bubblewrap" in result.output
