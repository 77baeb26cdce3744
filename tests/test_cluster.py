"""Across machines (pipeline/graph/cluster.py): a build's heavy actions on a Dask cluster, here a local one
of 2 worker processes (each with a nanny that restarts it), doit deciding what is stale."""
import os
import re
import signal
import threading
import time

import onnx
import pytest

from .conftest import run_doit

pytestmark = pytest.mark.fast
PIECES = 9  # tiny-qwen2's: embedding(_cache), block(_cache)_0 and _1, lm_head and the two heads


@pytest.fixture
def cluster():
    from distributed import Client, LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, resources={"MEMORY": 4 * 2**30},
                      dashboard_address=None) as local, Client(local) as client:
        yield local.scheduler_address, client


def _exported(build_dir):
    onnx_dir = build_dir / "tiny-qwen2" / "seq32" / "onnx"
    for path in onnx_dir.glob("*.onnx"):
        onnx.checker.check_model(onnx.load(str(path)))  # whole: nothing half-written
    assert not [p.name for p in onnx_dir.iterdir() if p.name.startswith(".")]  # no temporary left
    return sorted(p.stem for p in onnx_dir.glob("*.onnx"))


def test_the_workers_export_every_piece(tmp_path, cluster):
    address, _ = cluster
    result = run_doit(tmp_path, ["export"], model="tiny-qwen2", cluster=address, jobs=4)
    assert result.code == 0, result.output
    workers = set(re.findall(r"\[cluster\] export \S+: done on (\S+) in", result.output))
    assert len(workers) == 2, result.output  # both took pieces
    assert len(_exported(tmp_path)) == PIECES
    again = run_doit(tmp_path, ["export"], model="tiny-qwen2", cluster=address, jobs=4)
    assert again.code == 0 and "[cluster]" not in again.output  # doit decides what is stale: nothing


def test_a_killed_workers_piece_goes_to_the_other_and_nothing_is_done_twice(tmp_path, cluster):
    address, client = cluster
    killed = []

    def kill_the_first_busy_worker():
        deadline = time.monotonic() + 120
        while not killed and time.monotonic() < deadline:
            for worker, keys in client.processing().items():
                if any(k.startswith("export") for k in keys):
                    pid = client.run(os.getpid, workers=[worker])[worker]
                    time.sleep(0.5)  # into the export
                    os.kill(pid, signal.SIGKILL)
                    killed.append((worker, keys))
                    return
            time.sleep(0.05)

    killer = threading.Thread(target=kill_the_first_busy_worker)
    killer.start()
    result = run_doit(tmp_path, ["export"], model="tiny-qwen2", cluster=address, jobs=4)
    killer.join()
    assert killed and result.code == 0, result.output
    submitted = re.findall(r"\[cluster\] export (\S+): to a worker", result.output)
    done = re.findall(r"\[cluster\] export (\S+): done on", result.output)
    assert sorted(submitted) == sorted(done) == sorted(set(done)) and len(done) == PIECES
    assert len(_exported(tmp_path)) == PIECES


def test_no_scheduler_there_is_a_clear_error(tmp_path):
    result = run_doit(tmp_path, ["export"], model="tiny-qwen2", cluster="tcp://127.0.0.1:9")
    assert result.code != 0
    assert "cluster=tcp://127.0.0.1:9: no Dask scheduler answers there" in result.output
    assert "Traceback" not in result.output
