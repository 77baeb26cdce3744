"""Shared helpers: run the doit graph in-process (as dodo.py would) and see which tasks ran."""
import contextlib
import hashlib
import io
import os
import re
import shutil
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from doit.cmd_base import ModuleTaskLoader
from doit.doit_cmd import DoitMain

from pipeline.families import FAMILIES
from pipeline.graph.build_config import parse_build_config
from pipeline.graph.tasks import doit_config, make_tasks

ROOT = Path(__file__).resolve().parent.parent


class DoitResult:
    def __init__(self, code: int, output: str):
        self.code, self.output = code, output
        self.ran = re.findall(r"^\.  (\S+)", output, re.M)
        self.skipped = re.findall(r"^-- (\S+)", output, re.M)

    def ran_basename(self, basename: str) -> list[str]:
        return [t for t in self.ran if t.split(":")[0] == basename]


def run_doit(build_dir: Path, command: list[str], **variables) -> DoitResult:
    """`doit <command> name=value...` in this process, with the state in build_dir."""
    # one process: this harness captures the output of the tasks it runs (the `doit` command runs
    # jobs= processes, the cores by default: tests of that use run_cli)
    variables = {"jobs": "1", **{k: str(v) for k, v in variables.items()}}
    build = parse_build_config({"dist_dir": str(build_dir / "dist"), **variables, "build_dir": str(build_dir)})
    namespace = {**make_tasks(build), "DOIT_CONFIG": doit_config(build)}
    report = build_dir / "doit-output.txt"  # doit's reporter holds the original stdout
    out = io.StringIO()
    cwd = os.getcwd()
    os.chdir(ROOT)  # as the doit command does: it runs from dodo.py's folder
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            code = DoitMain(ModuleTaskLoader(namespace)).run(["--output-file", str(report), *command])
    finally:
        os.chdir(cwd)
    return DoitResult(code, report.read_text() + out.getvalue())


def run_cli(args: list[str], cwd: Path = ROOT, env: dict | None = None, timeout: float = 900
            ) -> subprocess.CompletedProcess:
    """The real command line: `doit ...` from the project root, as a user types it."""
    doit = Path(sys.executable).parent / "doit"
    return subprocess.run([str(doit), *args], cwd=cwd, capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=timeout)


def tree_digest(folder: Path) -> dict:
    """Content and mtime of every file: proof that a folder was not modified."""
    return {str(p.relative_to(folder)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


TINY_MODELS = tuple(family.test_model for family in FAMILIES.values())  # one generated model per family
# the families test_compile.py builds in every mode: tiny-qwen3.5's simulator checks are in
# tests/test_qwen3_5.py (every mode, in one build folder: they share its export and transform)
SIMULATED_MODELS = tuple(m for m in TINY_MODELS if m != "tiny-qwen3.5")


def onnx_verify_task(model: str, seq: int = 32) -> str:
    """The task that ends the no-compiler part of the chain: export + onnxruntime verification."""
    return f"verify:{model}/seq{seq}"


@pytest.fixture(scope="session")
def tiny_builds(tmp_path_factory):
    """Each tiny family exported and verified in onnxruntime once (no compiler; shared)."""
    build_dir = tmp_path_factory.mktemp("tiny-builds")
    results = {m: run_doit(build_dir, [onnx_verify_task(m)], model=m) for m in TINY_MODELS}
    return build_dir, results


@pytest.fixture(scope="session")
def sim_builds(tiny_builds) -> Path:
    """One build folder for the sim tier's tests whose subject is not the build itself (the fast
    tier's exports, shared): each asks run_doit for what it needs there, and doit makes only what
    no earlier test made. A test that damages, kills or resumes a build works on a copy
    (copy_build) or in a folder of its own."""
    return tiny_builds[0]


@pytest.fixture(scope="session")
def tiny_qwen2_built(sim_builds) -> Path:
    """tiny-qwen2 built with the defaults (int8) in sim_builds: a no-op once a test has built it."""
    result = run_doit(sim_builds, ["build"], model="tiny-qwen2")
    assert result.code == 0, result.output
    return sim_builds


def copy_build(source: Path, dest: Path, model: str) -> Path:
    """`model`'s build in `source` (its artifacts, its dist files, doit's state), copied to `dest` as
    if built there: doit's recorded paths are rewritten, so the copy is up to date and rebuilds
    only what a test changes in it."""
    shutil.copytree(source / model, dest / model, symlinks=True)
    (dest / "dist").mkdir(parents=True, exist_ok=True)
    for item in (source / "dist").glob(f"{model}[_-]*"):
        (shutil.copytree if item.is_dir() else shutil.copy2)(item, dest / "dist" / item.name)
    shutil.copy2(source / ".doit.sqlite3", dest / ".doit.sqlite3")
    with sqlite3.connect(dest / ".doit.sqlite3") as db:  # doit's table: (task_id, task_data as JSON)
        db.execute("update doit set task_data = replace(task_data, ?, ?)", (str(source), str(dest)))
    return dest


@pytest.fixture(scope="session")
def generated_checkpoint(tmp_path_factory):
    """A generated tiny checkpoint folder to use as a user's `path=` (copied per test as needed)."""
    build_dir = tmp_path_factory.mktemp("generated")
    result = run_doit(build_dir, ["checkpoint"], model="tiny-qwen2")
    assert result.code == 0, result.output
    return build_dir / "tiny-qwen2" / "checkpoint"


def idle_cpu_seconds(seconds: float = 3.0) -> float:
    """CPU time this process and its children use over `seconds` with nothing to do. A simulator
    left loaded somewhere spins on both cores (about 2 CPU seconds a second) until its process exits."""
    me = psutil.Process()
    processes = [me, *me.children(recursive=True)]

    def used() -> float:
        total = 0.0
        for process in processes:
            try:
                times = process.cpu_times()
                total += times.user + times.system
            except psutil.Error:
                pass
        return total

    start = used()
    time.sleep(seconds)
    return used() - start
