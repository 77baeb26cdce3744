"""Where a process's fds 1 and 2 point while native code runs: the BM runtime and the TPU-MLIR
tools print straight to them (C stdio, or subprocesses that inherit them). Standard library only:
the toolchain worker imports it too, from the toolchain's own Python."""
import contextlib
import ctypes
import os
import sys


def flush_c_stdio() -> None:
    try:
        ctypes.CDLL(None).fflush(None)
    except (OSError, AttributeError):
        pass


def redirect_to(log) -> None:
    """Point fds 1 and 2 at `log` from now on (Python's own buffers are flushed first)."""
    sys.stdout.flush()
    sys.stderr.flush()
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)


@contextlib.contextmanager
def output_to(log):
    """Point fds 1 and 2 at `log` for the `with` block, then back where they were. What native
    code buffered meanwhile is flushed into the log before they move back."""
    saved = os.dup(1), os.dup(2)
    redirect_to(log)
    try:
        yield
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        flush_c_stdio()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for f in saved:
            os.close(f)
