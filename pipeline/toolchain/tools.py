"""Running the toolchain: its Python tools through one long-lived process (worker.py),
its binaries as subprocesses; each run with its own log, failures quoting the log's relevant lines."""
import atexit
import os
import subprocess
from pathlib import Path

from runtime.toolchain import ToolchainError

from ..errors import PipelineError
from .install import ensure_toolchain
from .logs import relevant_lines
from .process import ToolchainProcess

_worker = None


def tool_failure(what: str, log: Path) -> PipelineError:
    return PipelineError(f"{what} failed; from its log:\n{relevant_lines(log)}\n(full log: {log})")


class Worker(ToolchainProcess):
    """The build's toolchain process; a failed request becomes a PipelineError quoting the log."""

    def request(self, **request) -> dict:
        try:
            return super().request(**request)
        except ToolchainError as err:
            log = Path(request.get("log", self.log))
            raise PipelineError(f"{err}; its log:\n{relevant_lines(log)}\n(logs: {log} {self.log})") from None


def worker(log_dir: Path) -> Worker:
    """This process's worker for the configured toolchain (started on first need; doit -n N
    forks: each child gets its own)."""
    global _worker
    toolchain = ensure_toolchain()
    if _worker is None or not _worker.alive() or _worker.prefix != toolchain.prefix:
        if _worker is not None and _worker.pid == os.getpid():
            _worker.close()
        _worker = Worker(toolchain.prefix, Path(log_dir).resolve() / f"toolchain-worker-{os.getpid()}.log")
        atexit.register(_worker.close)
    return _worker


# A tool that handled a full-width piece leaves the worker's heap large (a 7B-wide embedding: 8 GiB
# kept after the transform, which the next stage, transformers' reference run, needed). Above this,
# the worker is replaced after the tool (a new one costs ~5 s). Replacing it gives all of it back,
# which glibc's malloc_trim in a long-lived worker does not promise.
RECYCLE_RSS = 2 * 2**30


def run_python_tool(tool: str, argv: list[str], cwd: Path, log: Path, log_dir: Path) -> None:
    """model_transform / model_deploy, in the worker; raises with the log's relevant lines."""
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_text(f"$ {tool}.py {' '.join(argv)}\n(in {cwd})\n")
    process = worker(log_dir)
    answer = process.request(op="tool", tool=tool, argv=argv, cwd=str(Path(cwd).resolve()), log=str(log.resolve()))
    if _resident_bytes(process) > RECYCLE_RSS:
        process.close()
    if answer["code"] != 0:
        raise tool_failure(f"{tool}.py {' '.join(argv[:4])} ...", log)


def _resident_bytes(process: Worker) -> int:
    import psutil

    try:
        return psutil.Process(process.process.pid).memory_info().rss
    except psutil.Error:
        return 0


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
