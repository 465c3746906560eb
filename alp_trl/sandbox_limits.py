"""Per-call budgets and kernel-surface limits of the Python tool's sandbox (`alp_trl.sandbox`).

- `uid_slot()`: when the trainer runs as root, each concurrent call runs as a uid of its own (`SANDBOX_UID_BASE + n`),
  so that the per-user process limit (`RLIMIT_NPROC`) is a per-call limit and one call's processes never count
  against another's.
- `CallCgroup`: a private cgroup per call where the machine lets this process create one (cgroup v2 with the `pids`
  and `memory` controllers, or v1's `pids` and `memory` hierarchies): a process cap and a memory cap for all the
  call's processes together, tmpfs pages included, and the kernel's record of whether the memory cap was hit.
- `seccomp_filter()`: a classic-BPF seccomp program for bubblewrap's `--seccomp`: the key-management syscalls (the
  caller's session keyring), `ptrace`, mounting, new namespaces, BPF and perf are refused with `EPERM` (x86-64;
  other ABIs are refused outright).
"""

import contextlib
import os
import struct
import threading
import uuid


SANDBOX_UID_BASE = 200_000  # uids no account uses; one per concurrent call
_SLOTS = 4096
_slot_lock = threading.Lock()
_slots_in_use: set[int] = set()


@contextlib.contextmanager
def uid_slot():
    """A uid no other running call holds (`SANDBOX_UID_BASE + n`), for the duration of the call."""
    with _slot_lock:
        slot = next(n for n in range(_SLOTS) if n not in _slots_in_use)
        _slots_in_use.add(slot)
    try:
        yield SANDBOX_UID_BASE + slot
    finally:
        with _slot_lock:
            _slots_in_use.discard(slot)


# ------------------------------------------------------------------------------------------------------- cgroups
def _writable_dir(path: str) -> bool:
    return os.path.isdir(path) and os.access(path, os.W_OK)


def _v2_parent() -> str | None:
    """A cgroup v2 directory with the pids and memory controllers enabled for its children, that we can write."""
    for mount in ("/sys/fs/cgroup", "/sys/fs/cgroup/unified"):
        controllers = os.path.join(mount, "cgroup.subtree_control")
        try:
            with open(controllers) as f:
                enabled = f.read().split()
        except OSError:
            continue
        if {"pids", "memory"} <= set(enabled) and _writable_dir(mount):
            return mount
    return None


def _v1_parents() -> dict[str, str] | None:
    parents = {name: f"/sys/fs/cgroup/{name}" for name in ("pids", "memory")}
    if all(_writable_dir(p) and os.path.exists(os.path.join(p, "cgroup.procs")) for p in parents.values()):
        return parents
    return None


def cgroup_support() -> str:
    """`"v2"`, `"v1"` or `"none"`: which per-call cgroups this process can create."""
    if _v2_parent():
        return "v2"
    if _v1_parents():
        return "v1"
    return "none"


class CallCgroup:
    """One call's private cgroup(s): `pids` cap and `memory` cap; `enter(pid)` from the child before it execs."""

    def __init__(self, max_processes: int, memory_bytes: int):
        self.directories: list[str] = []
        self.kind = "none"
        name = f"alp-sandbox-{uuid.uuid4().hex[:12]}"
        try:
            parent = _v2_parent()
            if parent is not None:
                path = os.path.join(parent, name)
                os.mkdir(path)
                self.directories = [path]
                self.kind = "v2"
                _write(os.path.join(path, "pids.max"), str(max_processes))
                _write(os.path.join(path, "memory.max"), str(memory_bytes))
                _write(os.path.join(path, "memory.swap.max"), "0", required=False)
                return
            parents = _v1_parents()
            if parents is not None:
                self.kind = "v1"
                for parent_dir in parents.values():
                    path = os.path.join(parent_dir, name)
                    os.mkdir(path)
                    self.directories.append(path)
                pids_dir, memory_dir = self.directories
                _write(os.path.join(pids_dir, "pids.max"), str(max_processes))
                _write(os.path.join(memory_dir, "memory.limit_in_bytes"), str(memory_bytes))
                _write(os.path.join(memory_dir, "memory.memsw.limit_in_bytes"), str(memory_bytes), required=False)
        except OSError:
            self.close()
            self.kind = "none"

    def procs_files(self) -> list[str]:
        """The `cgroup.procs` files the child writes its pid to (opened by the parent, written in the child)."""
        return [os.path.join(d, "cgroup.procs") for d in self.directories]

    def memory_cap_hit(self) -> bool:
        """Whether the kernel refused memory to the call at its cap (an OOM kill or a failed charge)."""
        try:
            if self.kind == "v2":
                events = _read_keyed(os.path.join(self.directories[0], "memory.events"))
                return events.get("oom_kill", 0) > 0 or events.get("max", 0) > 0
            if self.kind == "v1":
                memory_dir = self.directories[1]
                failcnt = int(_read(os.path.join(memory_dir, "memory.failcnt")) or 0)
                oom = _read_keyed(os.path.join(memory_dir, "memory.oom_control")).get("oom_kill", 0)
                return failcnt > 0 or oom > 0
        except (OSError, ValueError):
            return False
        return False

    def kill_all(self) -> None:
        """SIGKILL every process still in the call's cgroup (v2: `cgroup.kill`; v1: each pid)."""
        import signal

        if self.kind == "v2":
            with contextlib.suppress(OSError):
                _write(os.path.join(self.directories[0], "cgroup.kill"), "1")
        for directory in self.directories:
            for pid in _read(os.path.join(directory, "cgroup.procs")).split():
                with contextlib.suppress(OSError, ValueError):
                    os.kill(int(pid), signal.SIGKILL)

    def close(self) -> None:
        """Remove the cgroup directories (after every process in them is gone)."""
        import time

        for directory in self.directories:
            for _ in range(50):
                try:
                    os.rmdir(directory)
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    self.kill_all()
                    time.sleep(0.02)
        self.directories = []


def _write(path: str, value: str, required: bool = True) -> None:
    try:
        with open(path, "w") as f:
            f.write(value)
    except OSError:
        if required:
            raise


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return ""


def _read_keyed(path: str) -> dict[str, int]:
    values = {}
    for line in _read(path).splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1].isdigit():
            values[parts[0]] = int(parts[1])
    return values


# ------------------------------------------------------------------------------------------------------- seccomp
AUDIT_ARCH_X86_64 = 0xC000003E
X32_SYSCALL_BIT = 0x40000000
# x86-64 syscall numbers refused with EPERM
DENIED_SYSCALLS = {
    "keyctl": 250,
    "add_key": 248,
    "request_key": 249,
    "ptrace": 101,
    "process_vm_readv": 310,
    "process_vm_writev": 311,
    "mount": 165,
    "umount2": 166,
    "pivot_root": 155,
    "chroot": 161,
    "unshare": 272,
    "setns": 308,
    "open_tree": 428,
    "move_mount": 429,
    "fsopen": 430,
    "fsconfig": 431,
    "fsmount": 432,
    "fspick": 433,
    "mount_setattr": 442,
    "bpf": 321,
    "perf_event_open": 298,
    "userfaultfd": 323,
    "kexec_load": 246,
    "init_module": 175,
    "finit_module": 313,
    "delete_module": 176,
    "name_to_handle_at": 303,
    "open_by_handle_at": 304,
    "iopl": 172,
    "ioperm": 173,
    "swapon": 167,
    "swapoff": 168,
    "reboot": 169,
    "acct": 163,
}
CLONE = 56
CLONE3 = 435
# clone flags that create namespaces
CLONE_NAMESPACE_FLAGS = 0x00020000 | 0x02000000 | 0x04000000 | 0x08000000 | 0x10000000 | 0x20000000 | 0x40000000
EPERM, ENOSYS = 1, 38

_LD_W_ABS, _JEQ, _JGE, _JSET, _RET = 0x20, 0x15, 0x35, 0x45, 0x06
_ALLOW, _KILL_PROCESS = 0x7FFF0000, 0x80000000


def _errno(value: int) -> int:
    return 0x00050000 | value


def seccomp_filter() -> bytes:
    """The BPF program (`struct sock_filter[]`) bubblewrap loads with `--seccomp FD` (x86-64 only)."""
    program = [
        (_LD_W_ABS, 0, 0, 4),  # seccomp_data.arch
        (_JEQ, 1, 0, AUDIT_ARCH_X86_64),
        (_RET, 0, 0, _KILL_PROCESS),  # the i386 / x32 ABIs would bypass the numbers below
        (_LD_W_ABS, 0, 0, 0),  # seccomp_data.nr
        (_JGE, 0, 1, X32_SYSCALL_BIT),
        (_RET, 0, 0, _errno(EPERM)),
    ]
    for number in sorted(DENIED_SYSCALLS.values()):
        program += [(_JEQ, 0, 1, number), (_RET, 0, 0, _errno(EPERM))]
    # clone3 passes its flags in memory, out of the filter's reach: refuse it, glibc falls back to clone
    program += [(_JEQ, 0, 1, CLONE3), (_RET, 0, 0, _errno(ENOSYS))]
    program += [
        (_JEQ, 0, 3, CLONE),
        (_LD_W_ABS, 0, 0, 16),  # low 32 bits of args[0]: the clone flags
        (_JSET, 0, 1, CLONE_NAMESPACE_FLAGS),
        (_RET, 0, 0, _errno(EPERM)),
        (_RET, 0, 0, _ALLOW),
    ]
    return b"".join(struct.pack("=HBBI", *instruction) for instruction in program)


def seccomp_supported() -> bool:
    """The filter is written for x86-64."""
    import platform

    return platform.machine().lower() in ("x86_64", "amd64")


def join_new_session_keyring() -> None:
    """Give the calling process a new, empty session keyring (the caller's is no longer reachable): call in the child
    before exec. Best effort: a kernel without keyrings has nothing to leak."""
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.syscall(250, 1, None)  # keyctl(KEYCTL_JOIN_SESSION_KEYRING, NULL)
    except (OSError, AttributeError):
        pass
