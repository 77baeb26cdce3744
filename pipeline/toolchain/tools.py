"""Running the toolchain: its Python tools through one long-lived worker process (see worker.py),
its binaries as subprocesses; each run with its own log, failures quoting the log's relevant lines."""
import atexit
import json
import os
import re
import subprocess
from pathlib import Path

from ..errors import PipelineError
from .install import Toolchain, ensure_toolchain

WORKER_SCRIPT = Path(__file__).with_name("worker.py")
_worker = None


def relevant_lines(log: Path, count: int = 10) -> str:
    """The lines of a tool's log that say what went wrong (else its last lines)."""
    try:
        lines = log.read_text(errors="replace").splitlines()
    except OSError:
        return "    (no log)"
    pattern = re.compile(r"error|Error|ERROR|failed|Failed|FAIL|Traceback|Exception|not support|Unsupport|Abort")
    picked = [line for line in lines if pattern.search(line)] or lines
    return "\n".join("    " + line[:300] for line in picked[-count:])


def tool_failure(what: str, log: Path) -> PipelineError:
    return PipelineError(f"{what} failed; from its log:\n{relevant_lines(log)}\n(full log: {log})")


class Worker:
    """One toolchain process per build process (doit -n N forks: each child gets its own)."""

    def __init__(self, toolchain: Toolchain, log: Path):
        log.parent.mkdir(parents=True, exist_ok=True)
        self.log, self.pid, self.toolchain = log, os.getpid(), toolchain
        env = {**toolchain.env(), "QWEN_TPU_WORKER_LOG": str(log)}
        # the simulator's runtime opens libcmodel.so by name: the loader only sees a path set at start-up
        libs = [str(p) for p in toolchain.prefix.glob("lib/python3*/*-packages/tpu_mlir/lib")]
        env["LD_LIBRARY_PATH"] = os.pathsep.join(libs + [env.get("LD_LIBRARY_PATH", "")]).rstrip(os.pathsep)
        self.process = subprocess.Popen([str(toolchain.python), str(WORKER_SCRIPT)], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, env=env, text=True, bufsize=1)

    def request(self, **request) -> dict:
        try:
            self.process.stdin.write(json.dumps(request) + "\n")
            self.process.stdin.flush()
            answer = self.process.stdout.readline()
        except (BrokenPipeError, OSError):
            answer = ""
        if not answer:
            code = self.process.poll()
            raise PipelineError(f"the toolchain process died (exit {code}) during {request.get('op')} "
                                f"{request.get('tool', request.get('net', ''))}; its log:\n"
                                f"{relevant_lines(Path(request.get('log', self.log)))}\n"
                                f"(logs: {request.get('log', '')} {self.log})")
        return json.loads(answer)

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.stdin.close()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
        self.process.stdout.close()


def worker(log_dir: Path) -> Worker:
    """This process's worker for the configured toolchain (started on first need)."""
    global _worker
    toolchain = ensure_toolchain()
    if (_worker is None or _worker.pid != os.getpid() or _worker.process.poll() is not None
            or _worker.toolchain != toolchain):
        if _worker is not None and _worker.pid == os.getpid():
            _worker.close()
        _worker = Worker(toolchain, Path(log_dir).resolve() / f"toolchain-worker-{os.getpid()}.log")
        atexit.register(_worker.close)
    return _worker


def run_python_tool(tool: str, argv: list[str], cwd: Path, log: Path, log_dir: Path) -> None:
    """model_transform / model_deploy, in the worker; raises with the log's relevant lines."""
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_text(f"$ {tool}.py {' '.join(argv)}\n(in {cwd})\n")
    answer = worker(log_dir).request(op="tool", tool=tool, argv=argv, cwd=str(Path(cwd).resolve()),
                                     log=str(log.resolve()))
    if answer["code"] != 0:
        raise tool_failure(f"{tool}.py {' '.join(argv[:4])} ...", log)


def run_binary(argv: list[str], cwd: Path, log: Path) -> str:
    """A toolchain binary (model_tool ...) as a subprocess; returns its output."""
    toolchain = ensure_toolchain()
    log.parent.mkdir(parents=True, exist_ok=True)
    result = subprocess.run([str(toolchain.bin / argv[0]), *argv[1:]], cwd=cwd, env=toolchain.env(),
                            capture_output=True, text=True)
    log.write_text(f"$ {' '.join(argv)}\n{result.stdout}{result.stderr}")
    if result.returncode != 0:
        raise tool_failure(" ".join(argv[:2]), log)
    return result.stdout
