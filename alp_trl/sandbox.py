"""Run untrusted Python (the model's tool code) in a sandbox: `run_python(code) -> SandboxResult`.

Every call runs in a fresh process that is never the trainer's, inside bubblewrap (`bwrap`, Debian package
`bubblewrap`: the unprivileged sandbox Flatpak uses), started as the unprivileged user `nobody`:

| what | how | limit |
|---|---|---|
| files | a new mount namespace holding only read-only system directories (`/usr`, `/bin`, `/lib*`), the Python packages of this environment (read-only, so `sympy` / `numpy` can be imported), a fresh writable temporary directory as the working directory and a small `/tmp`; the trainer's folders, the home directory and `/etc` do not exist inside | writes only in the temporary directory (removed afterwards), files up to 16 MiB |
| secrets | an empty environment (`--clearenv`): no tokens, no `HF_*` variables | |
| network | a new network namespace with no interface up: no loopback service, no outside address | |
| processes | new PID / IPC / UTS namespaces; `RLIMIT_NPROC` for `nobody` (fork bombs stop); the whole sandbox dies with its parent | 64 processes |
| time | wall clock (`timeout`, the process group killed) and CPU time (`RLIMIT_CPU`) | `timeout` seconds |
| memory | address space (`RLIMIT_AS`) | `memory_mb` |
| output | stdout and stderr merged, the first 16 KiB kept, the rest dropped with a marker | 16 KiB |

Not isolated: CPU cycles and memory bandwidth of the machine (the code competes with training), the kernel itself
(a kernel exploit escapes any namespace sandbox), timing side channels. Where bubblewrap or unprivileged user
namespaces are unavailable, nothing runs: the result is `status="unavailable"` with the reason, never an unsandboxed
execution. `run_python` never raises for anything the code does.
"""

import concurrent.futures
import os
import resource
import shutil
import signal
import site
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
from dataclasses import dataclass


STATUSES = ("ok", "error", "timeout", "memory_limit", "unavailable")
OUTPUT_LIMIT = 16 * 1024
TRUNCATION_MARKER = "\n[... output truncated at 16 KiB ...]"
MAX_PROCESSES = 64
MAX_FILE_BYTES = 16 * 1024 * 1024
NOBODY = 65534
_SANDBOX_DIR = "/sandbox"
_PACKAGES_DIR = "/opt/python-packages"


@dataclass
class SandboxResult:
    """The outcome of one execution: `status` (one of `STATUSES`) and `output` (stdout + stderr, at most 16 KiB)."""

    status: str
    output: str
    returncode: int | None = None
    seconds: float = 0.0


def _interpreter() -> str | None:
    """A Python the unprivileged user can execute: the system one, else this process's if world-readable."""
    for candidate in ("/usr/bin/python3", sys.executable):
        if candidate and os.path.exists(candidate) and _world_readable(os.path.realpath(candidate)):
            return os.path.realpath(candidate)
    return None


def _world_readable(path: str) -> bool:
    """Every directory on the way and the file itself can be read by others."""
    parts = os.path.abspath(path).split(os.sep)
    for i in range(2, len(parts) + 1):
        current = os.sep.join(parts[:i]) or os.sep
        try:
            mode = os.stat(current).st_mode
        except OSError:
            return False
        if not mode & 0o005:
            return False
    return True


def _package_dirs() -> list[str]:
    """This environment's site-packages (read-only inside, for sympy / numpy), when `nobody` can read them."""
    dirs = [sysconfig.get_paths()["purelib"], *site.getsitepackages()]
    return [d for d in dict.fromkeys(dirs) if os.path.isdir(d) and _world_readable(d)][:1]


def sandbox_status() -> tuple[bool, str]:
    """Whether code can run sandboxed here, and why not."""
    if shutil.which("bwrap") is None:
        return False, "bubblewrap (bwrap) is not installed: apt-get install bubblewrap"
    if _interpreter() is None:
        return False, "no Python interpreter readable by the unprivileged sandbox user"
    if os.name != "posix" or not hasattr(os, "setuid"):
        return False, "the sandbox needs Linux"
    return True, "bubblewrap"


def _bwrap_command(interpreter: str, workdir: str, script: str) -> list[str]:
    command = [
        "bwrap",
        "--unshare-all",  # user, pid, net, ipc, uts, cgroup namespaces: no network at all
        "--die-with-parent",
        "--new-session",
        "--clearenv",
        "--cap-drop",
        "ALL",
    ]
    for directory in ("/usr", "/bin", "/lib", "/lib64", "/lib32", "/libx32", "/sbin"):
        if os.path.exists(directory):
            command += ["--ro-bind", directory, directory]
    interpreter_root = os.path.dirname(os.path.dirname(interpreter))
    if not interpreter_root.startswith("/usr"):  # a Python installed elsewhere (e.g. a pyenv build)
        command += ["--ro-bind", interpreter_root, interpreter_root]
    packages = _package_dirs()
    for directory in packages:
        command += ["--ro-bind", directory, _PACKAGES_DIR]
    command += [
        "--proc",
        "/proc",
        "--dev",
        "/dev",
        "--tmpfs",
        "/tmp",
        "--bind",
        workdir,
        _SANDBOX_DIR,
        "--chdir",
        _SANDBOX_DIR,
        "--setenv",
        "PATH",
        "/usr/local/bin:/usr/bin:/bin",
        "--setenv",
        "HOME",
        _SANDBOX_DIR,
        "--setenv",
        "PYTHONDONTWRITEBYTECODE",
        "1",
        "--setenv",
        "PYTHONIOENCODING",
        "utf-8",
        "--setenv",
        "OMP_NUM_THREADS",
        "1",
        "--setenv",
        "MPLBACKEND",
        "Agg",
    ]
    if packages:
        command += ["--setenv", "PYTHONPATH", _PACKAGES_DIR]
    return command + [interpreter, "-I" if not packages else "-s", os.path.join(_SANDBOX_DIR, script)]


def _limits(timeout: float, memory_mb: int):
    """Applied in the child before `bwrap` starts: drop to `nobody`, then the resource limits (inherited by the code)."""

    def apply():
        os.setsid()
        resource.setrlimit(resource.RLIMIT_AS, (memory_mb * 2**20, memory_mb * 2**20))
        cpu = int(timeout) + 1
        resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu))
        resource.setrlimit(resource.RLIMIT_FSIZE, (MAX_FILE_BYTES, MAX_FILE_BYTES))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        if os.getuid() == 0:
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
        resource.setrlimit(resource.RLIMIT_NPROC, (MAX_PROCESSES, MAX_PROCESSES))

    return apply


def _read_capped(stream, sink: list, limit: int) -> None:
    """Keep the first `limit` bytes of a stream, drain and drop the rest (so the writer never blocks)."""
    kept, size, overflow = [], 0, False
    for chunk in iter(lambda: stream.read(65536), b""):
        if size < limit:
            kept.append(chunk[: limit - size])
        overflow |= size + len(chunk) > limit
        size += len(chunk)
    sink.append((b"".join(kept), overflow))


def _classify(returncode: int, output: str, timed_out: bool) -> str:
    if timed_out or returncode == -signal.SIGXCPU:
        return "timeout"
    if "MemoryError" in output or "Cannot allocate memory" in output:
        return "memory_limit"
    return "ok" if returncode == 0 else "error"


def run_python(code: str, timeout: float = 5.0, memory_mb: int = 1024) -> SandboxResult:
    """Run `code` with Python in the sandbox (see the module docstring) and return its status and output.

    Statuses: `"ok"` (exit 0), `"error"` (an exception, a non-zero exit, a crash), `"timeout"` (wall clock or CPU
    time), `"memory_limit"` (the allocation failed at `memory_mb`), `"unavailable"` (no sandbox here: nothing ran).
    Never raises for anything the code does.
    """
    start = time.time()
    available, reason = sandbox_status()
    if not available:
        return SandboxResult("unavailable", f"Sandbox unavailable: {reason}. The code was not run.", None, 0.0)
    if not isinstance(code, str):
        return SandboxResult("error", f"Expected code as text, got {type(code).__name__}.", None, 0.0)
    workdir = tempfile.mkdtemp(prefix="alp-sandbox-")
    try:
        os.chmod(workdir, 0o777)  # written by `nobody` inside
        script = "main.py"
        with open(os.path.join(workdir, script), "w", encoding="utf-8", errors="replace") as f:
            f.write(code)
        os.chmod(os.path.join(workdir, script), 0o644)
        command = _bwrap_command(_interpreter(), workdir, script)
        try:
            process = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                preexec_fn=_limits(timeout, memory_mb),
                env={"PATH": "/usr/bin:/bin"},
            )
        except OSError as error:
            return SandboxResult("unavailable", f"Sandbox unavailable: {error}. The code was not run.", None, 0.0)
        sink: list = []
        reader = threading.Thread(target=_read_capped, args=(process.stdout, sink, OUTPUT_LIMIT), daemon=True)
        reader.start()
        timed_out = False
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            try:
                os.killpg(process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            process.wait()
        reader.join(timeout=5)
        data, overflow = sink[0] if sink else (b"", False)
        output = data.decode("utf-8", errors="replace")
        if overflow:
            output += TRUNCATION_MARKER
        if "bwrap:" in output[:200] and process.returncode not in (0, None) and not output.startswith("Traceback"):
            if "No permissions to create new namespace" in output or "Creating new namespace failed" in output:
                return SandboxResult("unavailable", f"Sandbox unavailable: {output.strip()[:300]}", None, 0.0)
        status = _classify(process.returncode, output, timed_out)
        if status == "timeout":
            output += f"\n[timed out after {timeout:g} s]"
        return SandboxResult(status, output, process.returncode, round(time.time() - start, 3))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def run_python_batch(
    codes: list[str], timeout: float = 5.0, memory_mb: int = 1024, max_workers: int | None = None
) -> list[SandboxResult]:
    """`run_python` on many snippets at once (a bounded thread pool; each snippet in its own sandbox)."""
    if not codes:
        return []
    workers = max_workers or min(len(codes), max(1, (os.cpu_count() or 2)))
    with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(lambda code: run_python(code, timeout, memory_mb), codes))
