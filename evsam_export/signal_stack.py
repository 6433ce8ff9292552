"""Signal handling in one place: handlers installed for a block and restored after it (`handlers`), and the
main thread's alternate signal stack kept valid, so stop signals end a command cleanly.

Python runs every signal handler it installs (Ctrl-C's included) on the thread's alternate signal stack.
OpenVINO's CPU plugin registers a stack of its own for each plugin instance and, when the instance is
destroyed, puts back the stack that was registered when it was created; instances destroyed in creation
order (two runners, NNCF's engines) put back a stack that was already freed. The next signal then cannot be
delivered and the kernel kills the process with SIGSEGV: no clean-up, no message (docs/reliability.md).
Our OpenVINO code shares one Core per process (runners/openvino_runner.py), and repair() puts a stack
of our own in place after OpenVINO and NNCF work. Linux only; elsewhere every function here does nothing.
"""

from __future__ import annotations

import ctypes
import signal
import sys
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from functools import lru_cache

# Large enough for Python's C handler plus faulthandler's traceback on any x86-64/aarch64 signal frame.
OWN_STACK_BYTES = 256 * 1024

_own_stack = None  # the buffer registered by repair(); kept alive for the life of the process


class _StackT(ctypes.Structure):
    _fields_ = [("ss_sp", ctypes.c_void_p), ("ss_flags", ctypes.c_int), ("ss_size", ctypes.c_size_t)]


@lru_cache(maxsize=1)
def _libc():
    return ctypes.CDLL(None, use_errno=True)


def current() -> tuple[int, int]:
    """(address, size) of the calling thread's alternate signal stack; (0, 0) when none is registered."""
    if not sys.platform.startswith("linux"):
        return 0, 0
    stack = _StackT()
    if _libc().sigaltstack(None, ctypes.byref(stack)) != 0 or stack.ss_flags & 2:  # SS_DISABLE
        return 0, 0
    return stack.ss_sp or 0, stack.ss_size


def is_mapped(address: int, size: int) -> bool:
    """Whether [address, address + size) lies in one readable-writable mapping of this process."""
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                fields = line.split()
                low, high = (int(bound, 16) for bound in fields[0].split("-"))
                if low <= address and address + size <= high:
                    return fields[1].startswith("rw")
    except OSError:
        return True  # cannot tell: leave the stack alone
    return False


def is_valid() -> bool:
    """True when no alternate stack is registered (the kernel then uses the normal stack) or it is mapped."""
    address, size = current()
    return address == 0 or is_mapped(address, size)


def repair() -> bool:
    """Register a stack of our own when the registered one has been freed; True when it had to."""
    global _own_stack
    if is_valid():
        return False
    if _own_stack is None:
        _own_stack = ctypes.create_string_buffer(OWN_STACK_BYTES)
    stack = _StackT(ctypes.addressof(_own_stack), 0, OWN_STACK_BYTES)
    if _libc().sigaltstack(ctypes.byref(stack), None) != 0:
        return False
    return True


@contextmanager
def handlers(signums: Iterable[int], handler: Callable, keep_ignored: bool = False) -> Iterator[dict]:
    """Install `handler` for each of `signums` while the block runs, then put the previous handlers back.

    Yields {signal: previous handler} of those installed. Outside the main thread nothing is installed (signals
    are not ours to handle there); `keep_ignored` leaves a signal the user ignores (nohup) ignored."""
    installed = {}
    for signum in signums:
        if keep_ignored and signal.getsignal(signum) == signal.SIG_IGN:
            continue
        try:
            installed[signum] = signal.signal(signum, handler)
        except (ValueError, OSError):  # not the main thread, or a signal this platform will not let us catch
            continue
    try:
        yield installed
    finally:
        for signum, previous in installed.items():
            signal.signal(signum, previous if previous is not None else signal.SIG_DFL)
