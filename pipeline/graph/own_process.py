"""A large piece's action in a process of its own, so that its memory goes back to the system when
it ends.

A build process that exported a full-width piece kept part of that memory afterwards (most likely
freed heap that glibc keeps for reuse): a process that had exported a 14B-wide embedding (10.6 GiB
at its peak) then exported a block at 9.6 GiB, where the block alone takes 5.6 (resident memory).
That memory was in no reservation of the memory budget (pipeline/graph/memory_budget.py), and a 14B-wide
build with 2 processes was killed for memory with its reservations at 19.2 of 21.1 GiB. A process of its own gives all of it back.

Only the stages whose work is in the build process's own heap go there: the export (torch) and the
ONNX check (torch and onnxruntime). The transform and deploy run in the toolchain process, which is
replaced after a large piece already (pipeline/toolchain/tools.py: RECYCLE_RSS). Small pieces stay
in the build process: a new process costs ~3 s of imports, not worth it below a few GiB.
"""
import multiprocessing
import os
import traceback

from ..errors import PipelineError

GIB = 2**30
OWN_PROCESS_BYTES = 2 * GIB  # an expected peak above this runs in a process of its own


def run_in_own_process(work, what: str) -> None:
    """`work()` (picklable) in a new process (spawned: forking a process that ran torch's OpenMP
    threads can hang); its failure is raised here as it would have been."""
    context = multiprocessing.get_context("spawn")
    receive, send = context.Pipe(duplex=False)
    child = context.Process(target=_child, args=(send, os.getpid(), work), name=what)
    child.start()
    send.close()
    try:
        failure = receive.recv()
    except EOFError:  # it died without a word
        child.join()
        why = (" (SIGKILL: on Linux, most often the out-of-memory killer; see `dmesg`)"
               if child.exitcode == -9 else "")
        raise PipelineError(f"the {what} process died (exit {child.exitcode}){why}") from None
    except BaseException:  # Ctrl-C here: the piece's work is not wanted any more
        child.kill()
        child.join()
        raise
    finally:
        receive.close()
    child.join()
    if failure is not None:
        kind, message = failure
        raise (KeyboardInterrupt() if kind == "interrupt" else PipelineError(message))


def _child(send, parent: int, work) -> None:
    from pipeline.toolchain.lifetime import die_with_parent

    die_with_parent(parent)  # killed, the build leaves no process behind it

    try:
        work()
        failure = None
    except PipelineError as err:
        failure = ("error", str(err))
    except KeyboardInterrupt:
        failure = ("interrupt", "")
    except OSError as err:  # a full or read-only disk: said as the build process says it
        from ..fsutil import explain_os_error

        failure = ("error", explain_os_error(err) or traceback.format_exc())
    except BaseException:  # noqa: BLE001  (an unexpected error: its traceback, for the task's failure)
        failure = ("error", traceback.format_exc())
    try:
        send.send(failure)
        send.close()
    except OSError:  # the build stopped waiting (Ctrl-C): nobody to tell
        pass
