"""A `BmodelBackend` in a child process, stopped when closed.

Why: on the cmodel simulator, the first bmodel a process loads starts the simulated chip's engine
threads (TPU_BD, TPU_GDMA, ... 6 of them), and they spin on every core from then on: idle, after
bmrt_destroy and bm_dev_free, until the process exits (measured: 2 cores busy with nothing
running). A long-lived process (doit building other pieces, pytest, a benchmark) that ran the
simulator in-process would run everything after it at a fraction of the speed. Running the
backend in a child that exits on `close()` gives the cores back. On a device there is no such
cost, and the chat CLI and server (processes of their own) use `BmodelBackend` directly."""
import json
import os
import subprocess
import sys
import time
import warnings
import weakref
from multiprocessing import Pipe
from multiprocessing.connection import Connection
from pathlib import Path

from runtime import device_walk
from runtime.nets import ModelInfo
from runtime.toolchain import ToolchainError
from runtime.traffic import Traffic

from .lifetime import die_with_parent

WALK_STEPS = ("prefill", "decode", "logits", "token", "candidates", "prompt_logits", "rewind")


def _serve(conn, bmodel: str, devids: list[int], whole_model: bool, resident: bool) -> None:
    """The child: opens the bmodel, then answers one request at a time until told to stop:
    ("run", (net, feeds)) on the copy path, ("walk", ()) to start the engine's walk, then its steps."""
    from runtime.bmodel_backend import BmodelBackend

    try:
        backend = BmodelBackend(Path(bmodel), devids, whole_model, resident)
        conn.send(("ok", {"nets": backend.nets, "info": backend.info}))
    except Exception as err:  # noqa: BLE001  (sent to the parent, which raises it)
        conn.send(("error", f"{type(err).__name__}: {err}"))
        return
    walk = None
    while True:
        try:
            request = conn.recv()
        except EOFError:  # the parent is gone
            return
        if request is None:
            return
        method, args = request
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                if method == "run":
                    value = backend.run(*args)
                elif method == "walk":
                    walk = backend.walk()
                    value = walk.info
                else:
                    start = time.perf_counter()
                    value = getattr(walk, method)(*args)
                    backend.seconds += time.perf_counter() - start
            conn.send(("ok", (value, backend.seconds, backend.traffic.as_dict(),
                              [(w.category.__name__, str(w.message)) for w in caught])))
        except Exception as err:  # noqa: BLE001
            conn.send(("error", f"{type(err).__name__}: {err}"))


def _stop(conn: Connection, process: subprocess.Popen) -> None:
    try:
        conn.send(None)
    except OSError:
        pass
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
    conn.close()


def main() -> None:
    """The child's entry: `python -c ... <fd> <bmodel> <devids json> <whole_model> <resident> <parent>`."""
    fd, bmodel, devids, whole_model, resident, parent = sys.argv[1:7]
    die_with_parent(int(parent))  # the pipe's EOF is not read while a long request runs
    _serve(Connection(int(fd)), bmodel, json.loads(devids), whole_model == "1", resident == "1")


class IsolatedBmodelBackend:
    """Same interface as BmodelBackend (nets, info, seconds, traffic, run, walk, close); the runtime
    lives in a child."""

    def __init__(self, bmodel: Path, devids: list[int] = (0,), whole_model: bool = True, resident: bool = True):
        self.bmodel = Path(bmodel).resolve()
        if not self.bmodel.is_file():
            raise FileNotFoundError(f"{bmodel} does not exist")
        self._conn, child_conn = Pipe()
        # a fresh interpreter (not fork: no inherited simulator state; not multiprocessing's spawn,
        # which re-imports the caller's __main__)
        root = str(Path(__file__).resolve().parent.parent.parent)
        child = f"import sys; sys.path.insert(0, {root!r}); from pipeline.toolchain.isolated_backend import main; main()"
        self._process = subprocess.Popen([sys.executable, "-c", child, str(child_conn.fileno()), str(self.bmodel),
                                          json.dumps(list(devids)), "1" if whole_model else "0",
                                          "1" if resident else "0", str(os.getpid())],
                                         pass_fds=[child_conn.fileno()])
        child_conn.close()
        self._close = weakref.finalize(self, _stop, self._conn, self._process)
        try:
            opened = self._receive("open")
        except ToolchainError:
            self._close()
            raise
        self.nets, self.info, self.seconds, self.traffic = opened["nets"], opened["info"], 0.0, Traffic()

    def _receive(self, what: str):
        try:
            status, value = self._conn.recv()
        except (EOFError, OSError):
            self._close()
            raise ToolchainError(f"the bmodel process for {self.bmodel} died (exit {self._process.returncode}) "
                                 f"during {what}") from None
        if status == "error":
            raise ToolchainError(f"{self.bmodel}: {what}: {value}")
        return value

    def call(self, method: str, *args):
        self._conn.send((method, args))
        value, self.seconds, traffic, warned = self._receive(method if method != "run" else f"net {args[0]}")
        self.traffic = Traffic(**traffic)
        for category, message in warned:  # the child's warnings, for this process's user
            warnings.warn(message, getattr(device_walk, category, UserWarning), stacklevel=3)
        return value

    def run(self, net: str, feeds: dict) -> list:
        return self.call("run", net, feeds)

    def walk(self) -> "RemoteWalk":
        return RemoteWalk(self, self.call("walk"))

    def close(self) -> None:
        self._close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class RemoteWalk:
    """The engine's walk over the nets, run in the child (runtime/device_walk.py there)."""

    def __init__(self, backend: IsolatedBmodelBackend, info: ModelInfo):
        self.backend, self.info = backend, info

    @property
    def traffic(self) -> Traffic:
        return self.backend.traffic

    def __getattr__(self, step: str):
        if step not in WALK_STEPS:
            raise AttributeError(step)
        return lambda *args: self.backend.call(step, *args)
