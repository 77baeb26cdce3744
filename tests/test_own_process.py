"""Large pieces' export and ONNX check in processes of their own (pipeline/graph/own_process.py): the
artifacts are the same, and a failure or a kill there is the task's failure."""
import contextlib
import os
import signal
import threading
import time
from functools import partial

import psutil
import pytest

from pipeline.errors import PipelineError
from pipeline.graph import own_process
from pipeline.graph.build_config import parse_build_config
from pipeline.graph.tasks import stages

from .conftest import ROOT, onnx_verify_task, run_doit

pytestmark = pytest.mark.fast
MODEL = "tiny-qwen2"


def test_every_piece_can_export_and_check_in_a_process_of_its_own(tmp_path, monkeypatch):
    monkeypatch.setattr(own_process, "OWN_PROCESS_BYTES", 0)  # every piece counts as large
    ran, real = [], own_process.run_in_own_process
    monkeypatch.setattr(own_process, "run_in_own_process", lambda work, what: ran.append(what) or real(work, what))
    result = run_doit(tmp_path, [onnx_verify_task(MODEL)], model=MODEL)
    assert result.code == 0, result.output
    exported = result.ran_basename("export")
    assert len(exported) == 9
    assert sorted(w for w in ran if w.startswith("export ")) == sorted(f"export {t.split('/')[-1]}" for t in exported)
    assert "verify on onnxruntime (the whole model, twice: torch and onnxruntime)" in ran
    assert (tmp_path / MODEL / "seq32" / "verify" / "report.json").is_file()
    assert not list((tmp_path / MODEL / "seq32" / "onnx").glob(".*tmp"))  # nothing half-written


def _export_stage(build_dir):
    build = parse_build_config({"model": MODEL, "build_dir": str(build_dir), "dist_dir": str(build_dir / "dist"),
                                "jobs": "1"})
    export = stages(build)["export"]
    return build, export, next(p for p in export.pieces if p.name == "block_0")


def test_a_failure_there_is_the_tasks_failure_with_its_message(tmp_path):
    assert run_doit(tmp_path, [f"map:{MODEL}/seq32"], model=MODEL).code == 0
    build, export, piece = _export_stage(tmp_path)
    (tmp_path / MODEL / "seq32" / "config.json").write_text("{not json")  # the export config, damaged
    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        with pytest.raises(PipelineError, match="JSONDecodeError"):
            own_process.run_in_own_process(partial(export.work, piece, 1), "export block_0")
    finally:
        os.chdir(cwd)


def _cmdline(process) -> list[str]:
    try:
        return process.cmdline()
    except psutil.Error:
        return []  # gone already: not the one to kill


@contextlib.contextmanager
def _acting_on_the_spawned_process(act, after: float):
    """Run the body from the project's root while a thread waits for this process to spawn a piece's
    own process, gives it `after` seconds, and calls `act(process)`."""
    me = psutil.Process()
    before = {c.pid for c in me.children()}  # (earlier tests' toolchain workers, in this pytest process)

    def watch():
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            # the spawned one (not multiprocessing's resource tracker, also a child of this process)
            workers = [c for c in me.children() if c.pid not in before and "spawn_main" in " ".join(_cmdline(c))]
            if workers:
                time.sleep(after)
                act(workers[0])
                return
            time.sleep(0.05)

    watcher = threading.Thread(target=watch)
    watcher.start()
    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        yield
    finally:
        os.chdir(cwd)
        watcher.join()


def test_a_killed_process_is_reported_as_such(tmp_path):
    assert run_doit(tmp_path, [f"map:{MODEL}/seq32"], model=MODEL).code == 0
    build, export, piece = _export_stage(tmp_path)
    with pytest.raises(PipelineError, match=r"the export block_0 process died \(exit -9\) \(SIGKILL.*out-of-memory"), \
            _acting_on_the_spawned_process(lambda process: os.kill(process.pid, signal.SIGKILL), after=0.5):
        own_process.run_in_own_process(partial(export.work, piece, 1), "export block_0")
    assert not (tmp_path / MODEL / "seq32" / "onnx" / "block_0.onnx").exists()  # nothing half-written in place


def test_ctrl_c_stops_the_process_and_leaves_nothing_half_written(tmp_path):
    """A terminal's Ctrl-C reaches the build process and its export process alike: the export stops,
    the build raises KeyboardInterrupt (doit's own Ctrl-C handling follows), and no process is left."""
    assert run_doit(tmp_path, [f"map:{MODEL}/seq32"], model=MODEL).code == 0
    build, export, piece = _export_stage(tmp_path)
    seen = []

    def ctrl_c(process):
        seen.append(process)
        # the terminal sends it to the whole foreground group; the build's first, so that it stops
        # by its own KeyboardInterrupt wherever the export process is
        os.kill(os.getpid(), signal.SIGINT)
        with contextlib.suppress(ProcessLookupError):  # (the build may have stopped it already)
            os.kill(process.pid, signal.SIGINT)

    # as in a terminal: a run started in the background (CI's) inherits SIGINT ignored, and so would
    # the export process, spawned from it
    inherited = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        # 1 s: into its start or its work (its imports take ~3 s)
        with pytest.raises(KeyboardInterrupt), _acting_on_the_spawned_process(ctrl_c, after=1.0):
            own_process.run_in_own_process(partial(export.work, piece, 1), "export block_0")
    finally:
        signal.signal(signal.SIGINT, inherited)
    assert seen and not seen[0].is_running()
    assert not (tmp_path / MODEL / "seq32" / "onnx" / "block_0.onnx").exists()  # nothing half-written in place
