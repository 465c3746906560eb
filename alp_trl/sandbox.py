"""Run untrusted Python (the model's tool code) in a sandbox: `run_python(code) -> SandboxResult`.

Every call runs in a fresh process that is never the trainer's, inside bubblewrap (`bwrap`, Debian package
`bubblewrap`: the unprivileged sandbox Flatpak uses), with a budget of its own:

| what | how | limit |
|---|---|---|
| files | a new mount namespace with a read-only root holding only read-only system directories (`/usr`, `/bin`, `/lib*`; `/usr/local/etc` hidden), this environment's Python packages (read-only, for `sympy` / `numpy`), and sized memory-backed folders: the working directory, `/tmp`, `/dev/shm` | 64 / 64 / 16 MiB, files up to 16 MiB; nothing reaches the host's disk |
| secrets | an empty environment (`--clearenv`), a fresh session keyring, key syscalls refused | |
| network | a new network namespace with no interface up | |
| processes | new PID / IPC / UTS / user namespaces; as root a uid of the call's own (`RLIMIT_NPROC` is per call) and a cgroup of its own (`pids.max`) | 64 processes per call |
| kernel | seccomp (`alp_trl.sandbox_limits.seccomp_filter`): no keyring, ptrace, mount, new namespaces (`--disable-userns`), BPF, perf | |
| time | wall clock (the process group killed) and CPU time (`RLIMIT_CPU`) | `timeout` seconds |
| memory | address space per process (`RLIMIT_AS`) and, where a cgroup can be made, all the call's processes together | `memory_mb` (+ the folders) |
| output | stdout and stderr merged; reading stops at the cap and the process is ended there | 16 KiB |

The status comes from the exit code, the signal and the cgroup's accounting, never from the printed text; the output
returned is stripped of control characters and of imitations of the `[sandbox]` notes. Not isolated: CPU cycles and
memory bandwidth (the code competes with training), the kernel itself, timing side channels. Run as an ordinary user,
the process cap is shared by concurrent calls and memory is per process. Where bubblewrap or unprivileged user
namespaces are unavailable nothing runs: the result is `status="unavailable"` with the reason. `run_python` never
raises.
"""

import concurrent.futures
import contextlib
import json
import os
import re
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

from .sandbox_limits import CallCgroup, join_new_session_keyring, seccomp_filter, seccomp_supported, uid_slot


STATUSES = ("ok", "error", "timeout", "memory_limit", "output_limit", "unavailable")
OUTPUT_LIMIT = 16 * 1024
TRUNCATION_MARKER = "\n[sandbox] output stopped at 16 KiB: the process was ended there"
MAX_PROCESSES = 64
MAX_FILE_BYTES = 16 * 1024 * 1024
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


TMPFS_BYTES = {"/tmp": 64 * 2**20, _SANDBOX_DIR: 64 * 2**20, "/dev/shm": 16 * 2**20}
_MARKER = "[sandbox]"  # the prefix of this module's own notes in the output; the code cannot print it
_CONTROL = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b[@-_]|[\x00-\x08\x0b-\x1f\x7f\x80-\x9f]")


def _bwrap_command(interpreter: str, script_fd: int, seccomp_fd: int | None, status_fd: int) -> list[str]:
    command = [
        "bwrap",
        "--unshare-all",  # user, pid, net, ipc, uts, cgroup namespaces: no network at all
        "--unshare-user",
        "--disable-userns",  # no nested user namespaces (so no mounting inside either)
        "--die-with-parent",
        "--new-session",
        "--clearenv",
        "--cap-drop",
        "ALL",
        "--json-status-fd",
        str(status_fd),
    ]
    for directory in ("/usr", "/bin", "/lib", "/lib64", "/lib32", "/libx32", "/sbin"):
        if os.path.exists(directory):
            command += ["--ro-bind", directory, directory]
    if os.path.isdir("/usr/local/etc"):
        command += ["--tmpfs", "/usr/local/etc"]
    interpreter_root = os.path.dirname(os.path.dirname(interpreter))
    if not interpreter_root.startswith("/usr"):  # a Python installed elsewhere (e.g. a pyenv build)
        command += ["--ro-bind", interpreter_root, interpreter_root]
    packages = _package_dirs()
    for directory in packages:
        command += ["--ro-bind", directory, _PACKAGES_DIR]
    command += ["--proc", "/proc", "--ro-bind", "/dev/null", "/proc/cmdline", "--dev", "/dev"]
    for mount_point, size in TMPFS_BYTES.items():  # memory-backed, so each has a size
        command += ["--size", str(size), "--tmpfs", mount_point]
    command += ["--file", str(script_fd), os.path.join(_SANDBOX_DIR, "main.py"), "--remount-ro", "/"]
    if seccomp_fd is not None:
        command += ["--seccomp", str(seccomp_fd)]
    environment = {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "HOME": _SANDBOX_DIR,
        "PYTHONDONTWRITEBYTECODE": "1",
        "PYTHONIOENCODING": "utf-8",
        "OMP_NUM_THREADS": "1",
        "MPLBACKEND": "Agg",
    }
    if packages:
        environment["PYTHONPATH"] = _PACKAGES_DIR
    for name, value in environment.items():
        command += ["--setenv", name, value]
    command += ["--chdir", _SANDBOX_DIR]
    return command + [interpreter, "-I" if not packages else "-s", os.path.join(_SANDBOX_DIR, "main.py")]


def _own_task_count() -> int:
    """Tasks (processes and threads) of this process's user: what `RLIMIT_NPROC` counts."""
    uid, count = os.getuid(), 0
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.stat(f"/proc/{entry}").st_uid == uid:
                    count += len(os.listdir(f"/proc/{entry}/task"))
            except OSError:
                continue
    return count


def _limits(timeout: float, memory_mb: int, uid: int | None, nproc: int, procs_files: list):
    """Applied in the child before `bwrap` starts: its own cgroup(s), a fresh session keyring, the resource limits
    (inherited by the code), then the call's own uid (as root)."""

    def apply():
        os.setsid()
        for procs in procs_files:  # the call's cgroups: every process the code starts stays in them
            procs.write(str(os.getpid()))
            procs.flush()
        if seccomp_supported():
            join_new_session_keyring()
        resource.setrlimit(resource.RLIMIT_AS, (memory_mb * 2**20, memory_mb * 2**20))
        cpu = int(timeout) + 1
        resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu))
        resource.setrlimit(resource.RLIMIT_FSIZE, (MAX_FILE_BYTES, MAX_FILE_BYTES))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        if uid is not None:
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
        resource.setrlimit(resource.RLIMIT_NPROC, (nproc, nproc))

    return apply


def _read_until(stream, limit: int, on_overflow) -> tuple[bytes, bool]:
    """The first `limit` bytes of a stream; at the first byte beyond, stop reading and call `on_overflow` (which kills
    the writer), so a flood costs the caller one buffer."""
    kept, size = [], 0
    for chunk in iter(lambda: stream.read(65536), b""):
        if size + len(chunk) > limit:
            kept.append(chunk[: limit - size])
            on_overflow()
            return b"".join(kept), True
        kept.append(chunk)
        size += len(chunk)
    return b"".join(kept), False


def sanitize_output(text: str) -> str:
    """What goes back to the model: no terminal escape sequences or control characters (newlines and tabs stay), and
    no text that imitates this module's `[sandbox]` notes."""
    return _CONTROL.sub("", text).replace(_MARKER, "[sandbox?]")


def _exit_status(raw_status: bytes) -> tuple[bool, int | None]:
    """From bubblewrap's `--json-status-fd` documents: whether the code's process started, and its exit code
    (128 + N when signal N ended it)."""
    started, exit_code = False, None
    for line in raw_status.decode("utf-8", "replace").splitlines():
        try:
            document = json.loads(line)
        except ValueError:
            continue
        started |= "child-pid" in document
        if "exit-code" in document:
            exit_code = document["exit-code"]
    return started, exit_code


def _classify(exit_code: int | None, timed_out: bool, memory_cap_hit: bool, output_overflow: bool) -> str:
    if timed_out or exit_code == 128 + signal.SIGXCPU:
        return "timeout"
    if memory_cap_hit:
        return "memory_limit"
    if output_overflow:
        return "output_limit"
    return "ok" if exit_code == 0 else "error"


def run_python(code: str, timeout: float = 5.0, memory_mb: int = 1024) -> SandboxResult:
    """Run `code` with Python in the sandbox (see the module docstring) and return its status and output.

    Statuses: `"ok"` (exit 0), `"error"` (an exception, a non-zero exit, a crash), `"timeout"` (wall clock or CPU
    time), `"memory_limit"` (the call's processes together reached their memory cap: needs a per-call cgroup),
    `"output_limit"` (it printed more than 16 KiB: stopped there), `"unavailable"` (no sandbox here: nothing ran).
    The status comes from the process's exit and the kernel's accounting, never from what the code printed. Never
    raises.
    """
    start = time.time()
    try:
        available, reason = sandbox_status()
        if not available:
            return SandboxResult("unavailable", f"Sandbox unavailable: {reason}. The code was not run.", None, 0.0)
        if not isinstance(code, str):
            return SandboxResult("error", f"Expected code as text, got {type(code).__name__}.", None, 0.0)
        if os.getuid() == 0:
            with uid_slot() as uid:
                return _run(code, timeout, memory_mb, uid, start)
        return _run(code, timeout, memory_mb, None, start)
    except Exception as error:  # a failure to start (the code itself never raises here)
        return SandboxResult("unavailable", f"Sandbox unavailable: {type(error).__name__}: {error}.", None, 0.0)


def _run(code: str, timeout: float, memory_mb: int, uid: int | None, start: float) -> SandboxResult:
    tmpfs_bytes = sum(TMPFS_BYTES.values())
    cgroup = CallCgroup(MAX_PROCESSES, memory_mb * 2**20 + tmpfs_bytes) if os.getuid() == 0 else None
    nproc = MAX_PROCESSES if uid is not None else _own_task_count() + MAX_PROCESSES
    files = []
    try:
        script = tempfile.TemporaryFile()
        script.write(code.encode("utf-8", errors="replace"))
        script.seek(0)
        files.append(script)
        seccomp_fd = None
        if seccomp_supported():
            rules = tempfile.TemporaryFile()
            rules.write(seccomp_filter())
            rules.seek(0)
            files.append(rules)
            seccomp_fd = rules.fileno()
        status_read, status_write = os.pipe()
        procs = [open(path, "w") for path in (cgroup.procs_files() if cgroup else [])]
        files += procs
        command = _bwrap_command(_interpreter(), script.fileno(), seccomp_fd, status_write)
        pass_fds = [script.fileno(), status_write] + ([seccomp_fd] if seccomp_fd is not None else [])
        try:
            process = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                preexec_fn=_limits(timeout, memory_mb, uid, nproc, procs),
                pass_fds=pass_fds,
                env={"PATH": "/usr/bin:/bin"},
            )
        finally:
            os.close(status_write)
        with os.fdopen(status_read, "rb") as status_stream:

            def kill():
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(process.pid, signal.SIGKILL)
                if cgroup is not None:
                    cgroup.kill_all()

            sink = []
            reader = threading.Thread(
                target=lambda: sink.append(_read_until(process.stdout, OUTPUT_LIMIT, kill)), daemon=True
            )
            reader.start()
            timed_out = False
            try:
                process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                timed_out = True
                kill()
                process.wait()
            reader.join(timeout=5)
            raw_status = status_stream.read()
        data, overflow = sink[0] if sink else (b"", False)
        output = data.decode("utf-8", errors="replace")
        started, exit_code = _exit_status(raw_status)
        if not started and not timed_out:
            return SandboxResult("unavailable", f"Sandbox unavailable: {output.strip()[:300]}", None, 0.0)
        if exit_code is None and process.returncode is not None and process.returncode < 0:
            exit_code = 128 - process.returncode  # bubblewrap itself was killed (by us, or at the memory cap)
        memory_hit = cgroup is not None and cgroup.memory_cap_hit()
        status = _classify(exit_code, timed_out, memory_hit, overflow)
        output = sanitize_output(output)
        if overflow:
            output += TRUNCATION_MARKER
        if status == "timeout":
            output += f"\n{_MARKER} timed out after {timeout:g} s"
        elif status == "memory_limit":
            output += f"\n{_MARKER} stopped at the memory limit ({memory_mb} MiB)"
        return SandboxResult(status, output, exit_code, round(time.time() - start, 3))
    finally:
        for handle in files:
            with contextlib.suppress(OSError):
                handle.close()
        if cgroup is not None:
            cgroup.close()


def run_python_batch(
    codes: list[str], timeout: float = 5.0, memory_mb: int = 1024, max_workers: int | None = None
) -> list[SandboxResult]:
    """`run_python` on many snippets at once (a bounded thread pool; each snippet in its own sandbox)."""
    if not codes:
        return []
    workers = max_workers or min(len(codes), max(1, (os.cpu_count() or 2)))
    with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(lambda code: run_python(code, timeout, memory_mb), codes))
