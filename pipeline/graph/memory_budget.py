"""How many pieces build at once: as many as the cores allow (`jobs=`, doit's processes) and as
the memory allows (`memory=`). Before its work, each task reserves its expected peak in a ledger
that every process building in the folder shares (a JSON file under a file lock, so two `doit`
commands on one folder share it too). A task that does not fit waits, first in first out, and
says so; one larger than the whole budget runs alone. A killed process's reservations are dropped
by the next look at the ledger (each entry names its process and that process's start time).

The expected peak of a piece is the memory of a process (torch imported, and its toolchain
worker) plus a multiple of its fp32 weights per stage, the highest measured at full width (README,
the full-width benchmark and benchmarks/memory_bound.py: a piece's peak memory of the process tree
over its fp32 size, Qwen-7B- and 14B-wide):
  export     5.5x (a 14B-wide later block, made from the first one's graph: 6.8 GiB for 1.17 GiB;
                   the first one 4.6x, the embedding 3.5x)
  transform  4.4x (14B block 5.6 GiB; the embedding 4.2x)
  deploy     3.1x (the embedding 9.3 GiB for 2.9 GiB; a block 1.9x)
Pieces that large run their export in a process of their own (pipeline/graph/own_process.py): the memory
a build process would keep after them was in no reservation.
"""
import contextlib
import fcntl
import json
import os
import time
import uuid
from pathlib import Path

import psutil

from ..progress import say

GIB = 2**30
PROCESS_BYTES = 3 * GIB // 4  # a build process with torch imported (0.35 GiB measured) and its toolchain worker (0.7 together)
PEAK_FACTORS = {"export": 5.5, "transform": 4.4, "deploy": 3.1}
MARGIN_BYTES = GIB // 2  # left to the system when the budget is the memory available
POLL_SECONDS = 0.2


def expected_peak(stage: str, fp32_bytes: int) -> int:
    """The memory a stage of a piece of these weights is expected to reach."""
    return PROCESS_BYTES + int(PEAK_FACTORS.get(stage, 1.0) * fp32_bytes)


def default_budget() -> int:
    """The memory available now, less a margin."""
    return max(GIB, psutil.virtual_memory().available - MARGIN_BYTES)


def _me() -> dict:
    process = psutil.Process()
    return {"pid": process.pid, "started": process.create_time()}


def _alive(entry: dict) -> bool:
    try:
        return psutil.Process(entry["pid"]).create_time() == entry["started"]
    except psutil.Error:
        return False


class MemoryBudget:
    """The ledger of one build folder (`<build_dir>/.locks/memory.json`)."""

    def __init__(self, build_dir: Path, budget: int):
        self.path = Path(build_dir) / ".locks" / "memory.json"
        self.budget = budget

    @contextlib.contextmanager
    def _ledger(self):
        """The entries, read and written back under an exclusive lock; dead processes' dropped."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_suffix(".lock"), "a+") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                entries = json.loads(self.path.read_text()) if self.path.exists() and self.path.stat().st_size else []
            except json.JSONDecodeError:  # a writer killed mid-write (written in place): start over
                entries = []
            entries = [e for e in entries if _alive(e)]
            yield entries
            tmp = self.path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(entries))
            os.replace(tmp, self.path)

    def entries(self) -> list[dict]:
        with self._ledger() as entries:
            return [dict(e) for e in entries]

    @contextlib.contextmanager
    def reserve(self, task: str, need: int):
        """Wait until `need` bytes fit beside what runs (and every earlier waiter has started),
        hold them while the body runs."""
        key = uuid.uuid4().hex
        with self._ledger() as entries:
            ticket = max((e["ticket"] for e in entries), default=0) + 1
            entries.append({"key": key, "task": task, "bytes": need, "ticket": ticket, "running": False, **_me()})
            started = self._start_if_fits(entries, key)  # in the same look: no one can slip in between
        waited, start = False, time.monotonic()
        try:
            while not started and not self._try_start(key):
                if not waited:
                    waited = True
                    say(self._waiting_words(task, need))
                time.sleep(POLL_SECONDS)
            if waited:
                say(f"[memory] {task} starts after {time.monotonic() - start:.1f} s ({need / GIB:.1f} GiB)")
            yield
        finally:
            with self._ledger() as entries:
                entries[:] = [e for e in entries if e["key"] != key]

    def _try_start(self, key: str) -> bool:
        with self._ledger() as entries:
            return self._start_if_fits(entries, key)

    def _start_if_fits(self, entries: list[dict], key: str) -> bool:
        """Mark `key` running if no earlier waiter is left and it fits beside what runs."""
        mine = next(e for e in entries if e["key"] == key)
        running = [e for e in entries if e["running"]]
        earlier = [e for e in entries if not e["running"] and e["ticket"] < mine["ticket"]]
        used = sum(e["bytes"] for e in running)
        if not earlier and (not running or used + mine["bytes"] <= self.budget):
            mine["running"] = True
            return True
        return False

    def _waiting_words(self, task: str, need: int) -> str:
        entries = self.entries()
        running = [e for e in entries if e["running"]]
        used = sum(e["bytes"] for e in running)
        alone = " (more than the whole budget: it runs alone)" if need > self.budget else ""
        mine = next((e for e in entries if e["task"] == task and not e["running"]), None)
        ahead = [e for e in entries if mine and not e["running"] and e["ticket"] < mine["ticket"]]
        held = ", ".join(f"{e['task']} ({e['bytes'] / GIB:.1f} GiB)" for e in running) or "nothing"
        queue = ("; behind " + ", ".join(f"{e['task']} ({e['bytes'] / GIB:.1f} GiB)" for e in ahead)
                 + ", waiting first") if ahead else ""
        return (f"[memory] {task} waits: needs {need / GIB:.1f} GiB{alone}, {used / GIB:.1f} of "
                f"{self.budget / GIB:.1f} GiB held by {held}{queue}")
