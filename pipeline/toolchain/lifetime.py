"""A child process's life bound to its parent's: killed, the parent leaves nothing running."""
import os


def die_with_parent(parent: int) -> None:
    """This process gets SIGKILL when `parent` dies (Linux's parent-death signal; elsewhere nothing
    is done); if it died already, this process exits now. Linux sends it when the *thread* that
    started this process ends: start such a child from a thread that outlives it."""
    import ctypes
    import signal

    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # the parent died before the signal was set
        os._exit(1)
