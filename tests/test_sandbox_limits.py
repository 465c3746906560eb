"""The sandbox's pure limits (`alp_trl.sandbox_limits`), without bubblewrap: the seccomp program run through a small
classic-BPF interpreter (what the kernel decides for each syscall), and the per-call uid slots under concurrency.
The sandbox itself, and the kernel applying the filter, are tested in tests/test_sandbox.py."""

import struct
import threading

import pytest

from alp_trl.sandbox_limits import (
    AUDIT_ARCH_X86_64,
    CLONE,
    CLONE3,
    DENIED_SYSCALLS,
    SANDBOX_UID_BASE,
    X32_SYSCALL_BIT,
    seccomp_filter,
    uid_slot,
)


ALLOW, KILL = 0x7FFF0000, 0x80000000
EPERM, ENOSYS = 0x00050000 | 1, 0x00050000 | 38
CLONE_NEWUSER, CLONE_NEWNET, CLONE_THREAD, CLONE_VM = 0x10000000, 0x40000000, 0x00010000, 0x00000100


def run_filter(nr: int, arch: int = AUDIT_ARCH_X86_64, arg0: int = 0) -> int:
    """The action the kernel takes: `struct seccomp_data` is nr (offset 0), arch (4), ip (8), args (16, 24, ...)."""
    program = seccomp_filter()
    assert len(program) % 8 == 0
    instructions = [struct.unpack("=HBBI", program[i : i + 8]) for i in range(0, len(program), 8)]
    data = {0: nr, 4: arch, 16: arg0 & 0xFFFFFFFF}
    pc, accumulator = 0, 0
    for _ in range(len(instructions)):  # classic BPF only jumps forward
        code, jt, jf, k = instructions[pc]
        if code == 0x20:  # BPF_LD | BPF_W | BPF_ABS
            accumulator, pc = data[k], pc + 1
        elif code == 0x06:  # BPF_RET | BPF_K
            return k
        else:
            taken = {0x15: accumulator == k, 0x35: accumulator >= k, 0x45: bool(accumulator & k)}[code]
            pc += 1 + (jt if taken else jf)
    raise AssertionError("the program fell off its end")


@pytest.mark.parametrize("name", sorted(DENIED_SYSCALLS))
def test_every_denied_syscall_gets_eperm(name):
    assert run_filter(DENIED_SYSCALLS[name]) == EPERM


@pytest.mark.parametrize("nr", [0, 1, 2, 3, 9, 39, 59, 60, 231, 257])  # read ... exit_group, openat
def test_ordinary_syscalls_are_allowed(nr):
    assert run_filter(nr) == ALLOW


def test_clone_is_refused_only_with_namespace_flags_and_clone3_falls_back():
    assert run_filter(CLONE, arg0=CLONE_VM | CLONE_THREAD) == ALLOW  # threads
    assert run_filter(CLONE, arg0=0x11) == ALLOW  # fork: SIGCHLD
    assert run_filter(CLONE, arg0=CLONE_NEWUSER | 0x11) == EPERM
    assert run_filter(CLONE, arg0=CLONE_NEWNET) == EPERM
    assert run_filter(CLONE3) == ENOSYS, "glibc falls back to clone, whose flags the filter can read"


def test_other_abis_are_refused():
    assert run_filter(DENIED_SYSCALLS["keyctl"], arch=0x40000003) == KILL  # i386's numbers differ: killed outright
    assert run_filter(0, arch=0x40000003) == KILL
    assert run_filter(X32_SYSCALL_BIT | 0) == EPERM  # the x32 ABI


def test_concurrent_calls_hold_distinct_uids_and_give_them_back():
    held, barrier, errors = [], threading.Barrier(8), []

    def call():
        try:
            with uid_slot() as uid:
                held.append(uid)
                barrier.wait(timeout=10)  # all eight hold a slot at once
        except Exception as error:  # noqa: BLE001 - surfaced below
            errors.append(error)

    threads = [threading.Thread(target=call) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors and len(set(held)) == 8 and all(uid >= SANDBOX_UID_BASE for uid in held)
    with uid_slot() as uid:
        assert uid == SANDBOX_UID_BASE, "every slot was given back: the first is free again"
