"""The memory budget that bounds how many pieces build at once (pipeline/graph/memory_budget.py)."""
import os
import re
import signal
import subprocess
import sys
import threading
import time

import pytest

from pipeline.graph.memory_budget import MemoryBudget

from .conftest import ROOT, run_cli

pytestmark = pytest.mark.fast


def _run_together(budget: MemoryBudget, needs: list[int], seconds: float = 0.4) -> list[tuple[float, float]]:
    """Each need reserved by a thread of its own at once, held `seconds`; when each held it."""
    spans = [None] * len(needs)

    def work(k):
        with budget.reserve(f"task {k}", needs[k]):
            start = time.monotonic()
            time.sleep(seconds)
            spans[k] = (start, time.monotonic())

    threads = [threading.Thread(target=work, args=(k,)) for k in range(len(needs))]
    for t in threads:
        t.start()
        time.sleep(0.05)  # in this order (first in, first out)
    for t in threads:
        t.join(30)
    return spans


def _overlap(a, b) -> bool:
    return a[0] < b[1] and b[0] < a[1]


def test_tasks_that_fit_together_run_together_and_others_wait(tmp_path, capfd):
    together = _run_together(MemoryBudget(tmp_path, 10), [4, 5])
    assert _overlap(*together)
    apart = _run_together(MemoryBudget(tmp_path, 10), [6, 6])
    assert not _overlap(*apart)
    assert "[memory] task 1 waits: needs 0.0 GiB" in capfd.readouterr().err
    assert MemoryBudget(tmp_path, 10).entries() == []  # every reservation given back


def test_a_task_larger_than_the_budget_runs_alone_and_later_ones_wait_for_it(tmp_path, capfd):
    spans = _run_together(MemoryBudget(tmp_path, 10), [3, 20, 3])
    assert not _overlap(spans[0], spans[1]) and not _overlap(spans[1], spans[2])
    assert spans[1][0] < spans[2][0]  # first in, first out: the small one does not overtake
    err = capfd.readouterr().err
    assert "task 1 waits: needs 0.0 GiB (more than the whole budget: it runs alone)" in err
    assert re.search(r"task 2 waits: .* held by task 0 \(0\.0 GiB\); behind task 1 \(0\.0 GiB\), waiting first", err)


def test_a_killed_holders_reservation_is_dropped(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; sys.path.insert(0, sys.argv[1]); from pipeline.graph.memory_budget import MemoryBudget\n"
        "with MemoryBudget(sys.argv[2], 10).reserve('holder', 8):\n    print('held', flush=True); time.sleep(600)"),
        str(ROOT), str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        budget = MemoryBudget(tmp_path, 10)
        assert [e["task"] for e in budget.entries()] == ["holder"]
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait(10)
        start = time.monotonic()
        with budget.reserve("after", 8):
            assert time.monotonic() - start < 2
    finally:
        holder.kill()
        holder.wait()


def test_a_parallel_export_waits_for_memory_and_says_so(tmp_path):
    """`doit export` with 2 processes and room for one export at a time (each needs 0.75 GiB and
    more): every piece still exports, one after another, and the waits are shown."""
    result = run_cli(["export", "model=tiny-qwen2", "jobs=2", "memory=1", f"build_dir={tmp_path}",
                      f"dist_dir={tmp_path / 'dist'}"])
    assert result.returncode == 0, result.stderr
    assert re.search(r"\[memory\] export \S+ waits: needs 0\.8 GiB, 0\.8 of 1\.0 GiB held by export ", result.stderr)
    running = set()
    for line in result.stderr.splitlines():
        if m := re.match(r"\[export \d+/\d+\] (\S+) (\.\.\.|done)", line):
            if m[2] == "...":
                assert not running, (line, running)  # never two at once
                running.add(m[1])
            else:
                running.discard(m[1])
    assert len(list((tmp_path / "tiny-qwen2" / "seq32" / "onnx").glob("*.onnx"))) == 9
