"""Across machines: a build's heavy actions (export, transform, deploy, the verifications) run as
tasks of a Dask cluster (`doit build cluster=tcp://HOST:8786`), while doit, where the command
runs, stays the one place that decides what is stale and records what was done.

Why Dask (`distributed`) and not Ray: each action is one Python call that writes files and returns
nothing, which is what `Client.submit` runs; a worker is a plain Python process started from the
project's own environment (`.venv/bin/dask worker ...`), light enough for a 2-core machine, with no
object store or daemon of its own; a worker's memory is an abstract resource (`--resources
MEMORY=<bytes>`) that each task asks for (its expected peak: pipeline/graph/memory_budget.py), so a
worker runs as many pieces at once as fit; and a task whose worker dies is given to another one
(the scheduler's `allowed-failures`). Ray offers the same, with a heavier runtime.

Every worker sees the build folder at the same path (a shared folder: NFS, or object storage
mounted as a folder); artifacts are written there as everywhere in the pipeline, to a temporary
name and renamed into place, so a worker killed mid-task leaves nothing half-written under a final
name. The TPU-MLIR tools read and write local paths, which is why storage is a folder and not an
fsspec URL.
"""
import contextlib
import io
import os
import sys
import time
import uuid

from ..errors import PipelineError
from ..progress import say
from .memory_budget import GIB

_clients = {}
CONNECT_SECONDS = 5


def client(address: str):
    """One client per scheduler address, per process."""
    from distributed import Client

    if address not in _clients:
        try:
            _clients[address] = Client(address, timeout=CONNECT_SECONDS, set_as_default=False)
        except OSError as err:
            raise PipelineError(f"cluster={address}: no Dask scheduler answers there ({err}); start one with "
                                f"`.venv/bin/dask scheduler` and workers with `.venv/bin/dask worker {address} "
                                f"--resources MEMORY=<bytes>` (README, Across machines)") from None
    return _clients[address]


def largest_worker_memory(c) -> int:
    """The MEMORY resource of the largest worker (a task asking more would never run)."""
    sizes = [w.get("resources", {}).get("MEMORY", 0) for w in c.scheduler_info()["workers"].values()]
    if not sizes or not max(sizes):
        raise PipelineError("the cluster has no worker with a MEMORY resource: start workers with "
                            "`--resources MEMORY=<bytes>`")
    return int(max(sizes))


def run_on_cluster(address: str, work, what: str, need: int) -> None:
    """`work()` (picklable) on a worker of the scheduler at `address` with `need` bytes of MEMORY
    free (at most the largest worker's: then it runs alone there); its progress lines are printed
    here when done."""
    c = client(address)
    need = min(need, largest_worker_memory(c))
    start = time.monotonic()
    say(f"[cluster] {what}: to a worker with {need / GIB:.1f} GiB free")
    from .task_state import current_outputs

    future = c.submit(_execute, work, current_outputs(), resources={"MEMORY": need}, pure=False,
                      key=f"{what.replace(' ', '-')}-{uuid.uuid4().hex[:8]}")
    output, worker = future.result()
    sys.stderr.write(output)
    say(f"[cluster] {what}: done on {worker} in {time.monotonic() - start:.1f} s")


def _execute(work, outputs: list) -> tuple[str, str]:
    """On a worker: the stage's action, its progress lines captured. First the temporaries a
    killed attempt of the task left beside its outputs go: doit holds the task's lock meanwhile, so
    no one else writes them."""
    from distributed import get_worker

    from .. import PROJECT_ROOT
    from ..fsutil import leftovers, remove

    os.chdir(PROJECT_ROOT)  # the build's paths inside the checkout are relative to it
    for path in leftovers(outputs):
        remove(path)
    captured = io.StringIO()
    with contextlib.redirect_stderr(captured):
        work()
    return captured.getvalue(), get_worker().address
