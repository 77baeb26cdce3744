"""A process running inside the TPU-MLIR toolchain's Python 3.10 (worker.py): the build's tools and
its simulator checks (pyruntime_bm) go through it."""
import json
import os
import signal
import subprocess
from pathlib import Path

from runtime.toolchain import ToolchainError

WORKER_SCRIPT = Path(__file__).with_name("worker.py")


def toolchain_env(prefix: Path) -> dict:
    """Its bin/ first (tools start tools through `#!/usr/bin/env python3`), and its libraries on the
    loader's path from the start (the simulator's runtime opens libcmodel.so by name)."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env["PATH"] = f"{prefix / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    libs = [str(p) for p in prefix.glob("lib/python3*/*-packages/tpu_mlir/lib")]
    env["LD_LIBRARY_PATH"] = os.pathsep.join(libs + [env.get("LD_LIBRARY_PATH", "")]).rstrip(os.pathsep)
    return env


class ToolchainProcess:
    """One long-lived worker.py; requests and answers are JSON lines."""

    def __init__(self, prefix: Path, log: Path):
        log.parent.mkdir(parents=True, exist_ok=True)
        self.prefix, self.log, self.pid = prefix, log, os.getpid()
        env = {**toolchain_env(prefix), "QWEN_TPU_WORKER_LOG": str(log)}
        # A session of its own: Ctrl-C in the terminal interrupts this process (which stops the worker
        # in close()), not the worker in the middle of a tool, which read as a failed tool.
        self.process = subprocess.Popen([str(prefix / "bin" / "python3"), str(WORKER_SCRIPT)], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, env=env, text=True, bufsize=1,
                                        start_new_session=True)
        self.busy = False

    def alive(self) -> bool:
        return self.pid == os.getpid() and self.process.poll() is None

    def request(self, **request) -> dict:
        self.busy = True
        try:
            self.process.stdin.write(json.dumps(request) + "\n")
            self.process.stdin.flush()
            answer = self.process.stdout.readline()
        except (BrokenPipeError, OSError):
            answer = ""
        self.busy = False  # (a KeyboardInterrupt above leaves it True: close() then kills the worker)
        if not answer:
            try:
                code = self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                code = None
            if code == -signal.SIGINT:  # interrupted, not failed
                raise KeyboardInterrupt
            why = (" (SIGKILL: on Linux, most often the out-of-memory killer; see `dmesg`; this piece needs "
                   "more memory than the machine has free)" if code == -9 else "")
            raise ToolchainError(f"the toolchain process died (exit {code}){why} during {request.get('op')} "
                                 f"{request.get('tool', request.get('net', ''))} (log: {request.get('log', self.log)})")
        return json.loads(answer)

    def close(self) -> None:
        if self.process.poll() is None and self.busy:  # interrupted mid-request: its work is not wanted
            self.process.kill()
        if self.process.poll() is None:
            self.process.stdin.close()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
        self.process.stdout.close()
