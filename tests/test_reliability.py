"""Builds that survive a kill, two builds of one folder at once, and code keys that follow imports:
real `doit` processes on a real tiny build, killed with SIGKILL as an OOM killer or a CI time-out
would, in the middle of each stage."""
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.graph.code_keys import source_files

from .conftest import ROOT

DOIT = Path(sys.executable).parent / "doit"
MODEL, VARIANT, DIST = "tiny-qwen2", "int8_1dev_bm1684x_dyn", "tiny-qwen2_int8_seq32_1dev_dyn"


def ran(output: str) -> list[str]:
    return re.findall(r"^\.  (\S+)", output, re.M)


def leftovers(*folders: Path) -> list[Path]:
    return [p for folder in folders if folder.exists() for p in folder.rglob(".*")
            if p.name.endswith((".tmp", ".old"))]


def doit(args: list[str], cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([str(DOIT), *args], cwd=cwd, capture_output=True, text=True, timeout=900,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"})


def doit_killed(args: list[str], trigger: str, leftover: str | None, build_dir: Path) -> str:
    """Run doit until `trigger` is printed (and, if given, a temporary file matching `leftover`
    exists: the kill lands mid-write), then SIGKILL doit and its toolchain process."""
    process = subprocess.Popen([str(DOIT), *args], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, start_new_session=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    lines = []
    for line in process.stdout:
        lines.append(line)
        if trigger in line:
            deadline = time.monotonic() + 30
            while leftover and not list(build_dir.glob(leftover)) and time.monotonic() < deadline:
                time.sleep(0.001)
            os.killpg(process.pid, signal.SIGKILL)
            break
    lines += process.stdout.read()
    process.wait()
    output = "".join(lines)
    assert process.returncode == -signal.SIGKILL, f"the build ended before the trigger {trigger!r}:\n{output}"
    if leftover:
        assert list(build_dir.glob(leftover)), f"killed, but no temporary file {leftover} was being written"
    return output


# (what the kill interrupts, the one task asked for, the line that starts it, the temporary file it
# writes meanwhile). Each run asks for one task (and so its unfinished dependencies): doit's order
# among ready tasks changes from run to run, and a whole build could finish a stage before its kill.
SEQ, NETS = f"{MODEL}/seq32", f"{MODEL}/seq32/{VARIANT}"
KILLS = [
    ("export", f"export:{SEQ}/block_0", "[export 3/9] block_0 ...", f"{SEQ}/onnx/.block_0.onnx.*.tmp"),
    # (block_0: model_transform.py runs for it; block_1 is made from it in milliseconds)
    ("transform", f"transform:{SEQ}/block_0", "[transform 3/9] block_0 ...", f"{SEQ}/transform/.block_0.*.tmp"),
    ("onnx verification", f"verify:{SEQ}", "[verify 1/9]", None),
    ("deploy", f"deploy:{NETS}/block_cache_0", "[deploy 4/9] block_cache_0 --quantize",
     f"{SEQ}/deploy/{VARIANT}/.block_cache_0.bmodel.*.tmp"),
    ("combine", f"combine:{NETS}", f".  combine:{NETS}", f"dist/.{DIST}.bmodel.*.tmp"),
    ("simulator verification", f"verify:{NETS}", "[verify int8 on the simulator 1/9]", None),
]


@pytest.mark.sim
def test_a_build_killed_in_every_stage_resumes_with_exactly_the_unfinished_tasks(tmp_path):
    # one process: each kill must land on the one task asked for (a parallel build's kill has a
    # test of its own below)
    variables = [f"model={MODEL}", f"build_dir={tmp_path}", f"dist_dir={tmp_path / 'dist'}", "jobs=1"]
    args = ["verify", *variables]
    done: list[str] = []
    for stage, task, trigger, leftover in KILLS:
        started = ran(doit_killed([task, *variables], trigger, leftover, tmp_path))
        assert started and started[-1] == task, f"killed in {stage}, but the last task started was not {task}"
        assert not set(started) & set(done), f"killed in {stage}: tasks finished before a kill ran again"
        done += started[:-1]  # every task but the one killed was recorded when it ended
    final = doit(args)
    assert final.returncode == 0, final.stdout + final.stderr
    again = ran(final.stdout)
    assert not set(again) & set(done), "tasks finished before a kill ran again"
    assert "[verify int8 on the simulator] PASS" in final.stderr  # every ONNX piece and bmodel loads and runs
    assert leftovers(tmp_path) == []
    assert doit(args).stdout.count("\n.  ") == 0  # and now everything is recorded


@pytest.mark.fast
def test_a_parallel_build_killed_takes_its_workers_with_it_and_resumes(tmp_path):
    """A build runs jobs= processes by default: SIGKILL of doit alone (as an OOM killer picks one
    process) leaves no worker of it waiting for work forever, and the same command resumes."""
    import psutil

    args = ["export", f"model={MODEL}", f"build_dir={tmp_path}", f"dist_dir={tmp_path / 'dist'}", "jobs=2"]
    process = subprocess.Popen([str(DOIT), *args], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, start_new_session=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    lines = []
    for line in process.stdout:
        lines.append(line)
        if re.match(r"\[export \d+/9\] \S+ \.\.\.", line):
            break
    workers = psutil.Process(process.pid).children(recursive=True)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert workers, "".join(lines)
    _, alive = psutil.wait_procs(workers, timeout=20)
    assert not alive, [p.cmdline() for p in alive]
    resumed = doit(args)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert len(list((tmp_path / MODEL / "seq32" / "onnx").glob("*.onnx"))) == 9 and leftovers(tmp_path) == []


@pytest.mark.sim
def test_two_builds_of_one_folder_at_once_share_the_work(tmp_path):
    args = ["build", "model=tiny-llama", f"build_dir={tmp_path}", f"dist_dir={tmp_path / 'dist'}"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    builds = [subprocess.Popen([str(DOIT), *args], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, env=env) for _ in range(2)]
    outputs = [b.communicate(timeout=900)[0] for b in builds]
    assert [b.returncode for b in builds] == [0, 0], "\n".join(outputs)
    made = [line.split(" done in")[0] for o in outputs for line in o.splitlines() if " done in " in line]
    assert len(made) == 27 and len(set(made)) == len(made), made  # each piece exported, transformed, deployed once
    assert "[wait]" in "".join(outputs)  # they did meet on a task
    assert leftovers(tmp_path) == []
    assert ran(doit(args).stdout) == []


@pytest.mark.fast
def test_code_keys_follow_imports_transitively():
    compile_key = {str(p) for p in source_files("pipeline.stages.compile")}
    # compile -> toolchain/tools -> toolchain/process -> worker.py (named, run as a script)
    # -> runtime/native_output.py (imported by the script)
    assert {"pipeline/toolchain/logs.py", "pipeline/toolchain/worker.py", "runtime/native_output.py"} <= compile_key
    assert "pipeline/stages/verify.py" not in compile_key and "pipeline/stages/export.py" not in compile_key
    export_key = {str(p) for p in source_files("pipeline.stages.export")}
    assert {"pipeline/model/torch_pieces.py", "pipeline/model/checkpoint.py", "pipeline/fsutil.py"} <= export_key
    assert "runtime/serve.py" not in {str(p) for p in source_files("pipeline.stages.verify_sim")}


@pytest.mark.sim
def test_editing_a_module_deep_in_a_stages_imports_reruns_that_stage_only(tmp_path):
    project = tmp_path / "project"  # a copy of the project's code, to edit
    project.mkdir()
    for item in ("dodo.py", "pyproject.toml"):
        shutil.copy2(ROOT / item, project / item)
    for item in ("pipeline", "runtime", "patches", "model_configs"):
        shutil.copytree(ROOT / item, project / item, ignore=shutil.ignore_patterns("__pycache__"))
    args = ["build", f"build_dir={tmp_path / 'build'}", f"dist_dir={tmp_path / 'dist'}"]

    def edit_and_build(module: str) -> list[str]:
        with open(project / module, "a") as f:
            f.write("\n# edited\n")
        result = doit(args, cwd=project)
        assert result.returncode == 0, result.stdout + result.stderr
        return ran(result.stdout)

    first = doit(args, cwd=project)
    assert first.returncode == 0, first.stdout + first.stderr
    assert edit_and_build("runtime/serve.py") == []  # no stage imports the server
    rerun = edit_and_build("runtime/native_output.py")  # four imports deep under transform and deploy
    assert sorted({t.split(":")[0] for t in rerun}) == ["combine", "deploy", "transform"]
    assert len([t for t in rerun if t.startswith(("transform:", "deploy:"))]) == 18
    rerun = edit_and_build("pipeline/model/torch_pieces.py")  # export's, and the ONNX verification's
    assert {t.split(":")[0] for t in rerun} >= {"export", "verify"}
    assert not [t for t in rerun if t.startswith("checkpoint") or t.startswith("map")]


@pytest.mark.sim
@pytest.mark.parametrize("jobs", ["1", "2"])
def test_ctrl_c_stops_the_build_as_interrupted_not_failed(tmp_path, jobs):
    """One process, or several (the default): the task, or the build, says it was interrupted."""
    args = ["build", "model=tiny-qwen3", f"build_dir={tmp_path}", f"dist_dir={tmp_path / 'dist'}", f"jobs={jobs}"]
    # as from a terminal: Ctrl-C's default action (a test run started in the background, `cmd &` in a
    # script, inherits SIGINT ignored, and so would the build)
    process = subprocess.Popen([str(DOIT), *args], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, start_new_session=True, env={**os.environ, "PYTHONUNBUFFERED": "1"},
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    lines = []
    for line in process.stdout:
        lines.append(line)
        if "[deploy 3/9] block_0 --quantize" in line:  # mid-tool
            time.sleep(0.05)
            os.killpg(process.pid, signal.SIGINT)  # what Ctrl-C in a terminal sends: the whole group
            break
    output = "".join(lines) + process.stdout.read()
    process.wait()
    assert process.returncode == 130, output
    assert ("[interrupted] deploy:tiny-qwen3/seq32/int8_1dev_bm1684x_dyn/block_0 stopped by Ctrl-C" if jobs == "1"
            else "[interrupted] the build stopped by Ctrl-C") in output
    assert "Traceback" not in output and "failed" not in output, output
    resumed = doit(args)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "deploy:tiny-qwen3/seq32/int8_1dev_bm1684x_dyn/block_0" in ran(resumed.stdout)
    # what was done before the Ctrl-C is not done again (one process: every export, for the ONNX
    # verification that comes first, and block_0's transform, for the deploy that was stopped)
    done = {f"{stage}:tiny-qwen3/seq32/{piece}"
            for stage, piece in re.findall(r"^\[(export|transform) \d+/9\] (\S+) done in", output, re.M)}
    if jobs == "1":
        exports = {t for t in done if t.startswith("export:")}
        assert len(exports) == 9 and "transform:tiny-qwen3/seq32/block_0" in done, sorted(done)
    assert done
    assert not done & set(ran(resumed.stdout))
