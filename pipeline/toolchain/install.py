"""Find or create the TPU-MLIR environment, pinned, outside the checkout.

Settings (environment variables):
  QWEN_TPU_CACHE       cache folder (default ~/.cache/qwen-tpu); the toolchain lives in
                       <cache>/tpu-mlir-<version>/ and is reused by every checkout and CI run
  QWEN_TPU_PYTHON310   the Python 3.10 to build it with (else python3.10, then pyenv's 3.10.x)
  QWEN_TPU_TOOLCHAIN   an existing TPU-MLIR installation to use instead: the prefix (venv or
                       install root) whose bin/ holds python3 and model_transform.py (e.g. the
                       Sophgo docker image's /usr, or a venv with a release installed)
"""
import fcntl
import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from runtime.cache import cache_dir
from runtime.toolchain import MARKER

from ..errors import PipelineError
from .logs import relevant_lines
from .process import toolchain_env

TPU_MLIR_VERSION = "1.30.2"
TORCH_FOR_TOOLCHAIN = "2.11.0"  # the version of the wheel's `torch` extra; its ONNX front end imports torch
CONSTRAINTS = Path(__file__).with_name(f"constraints-tpu-mlir-{TPU_MLIR_VERSION}.txt")
BUNDLED_GLIBC = ("libc.so.6", "libm.so.6", "libpthread.so.0")
_FALLBACK_PYTHONS = ["/usr/bin/python3.10", "/usr/local/bin/python3.10"]


@dataclass(frozen=True)
class Toolchain:
    prefix: Path
    version: str

    @property
    def bin(self) -> Path:
        return self.prefix / "bin"

    @property
    def python(self) -> Path:
        return self.bin / "python3"

    def env(self) -> dict:
        return toolchain_env(self.prefix)


def managed_prefix() -> Path:
    return cache_dir() / f"tpu-mlir-{TPU_MLIR_VERSION}"


def expected_version() -> str:
    """The toolchain version that keys compiled artifacts, known without starting anything."""
    external = os.environ.get("QWEN_TPU_TOOLCHAIN")
    if not external:
        return TPU_MLIR_VERSION
    found = sorted(Path(external).glob("lib/python3*/site-packages/tpu_mlir-*.dist-info"))
    return found[-1].name.removesuffix(".dist-info").split("-")[1] if found else f"external:{external}"


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def ensure_toolchain() -> Toolchain:
    """The toolchain to use: an external one if set, else the managed one (installed on first need)."""
    external = os.environ.get("QWEN_TPU_TOOLCHAIN")
    if external:
        prefix = Path(external).expanduser()
        if not (prefix / "bin" / "model_transform.py").exists():
            raise PipelineError(f"QWEN_TPU_TOOLCHAIN={external} has no bin/model_transform.py: point it at the "
                                "prefix of a TPU-MLIR installation (a venv with tpu_mlir, or the docker image's /usr)")
        return Toolchain(prefix, expected_version())
    prefix = managed_prefix()
    if _marker_ok(prefix):
        return Toolchain(prefix, TPU_MLIR_VERSION)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    with open(prefix.parent / f"{prefix.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another build may be installing it right now
        if not _marker_ok(prefix):
            _install(prefix)
    return Toolchain(prefix, TPU_MLIR_VERSION)


def _marker_ok(prefix: Path) -> bool:
    try:
        return json.loads((prefix / MARKER).read_text())["version"] == TPU_MLIR_VERSION
    except (OSError, ValueError, KeyError):
        return False


def find_python310() -> Path:
    candidates = []
    if os.environ.get("QWEN_TPU_PYTHON310"):
        candidates.append(os.environ["QWEN_TPU_PYTHON310"])
    candidates.append(shutil.which("python3.10") or "")
    if shutil.which("pyenv"):
        versions = subprocess.run(["pyenv", "versions", "--bare"], capture_output=True, text=True).stdout.split()
        for version in sorted((v for v in versions if re.fullmatch(r"3\.10\.\d+", v)),
                              key=lambda v: int(v.split(".")[2]), reverse=True):
            prefix = subprocess.run(["pyenv", "prefix", version], capture_output=True, text=True).stdout.strip()
            candidates.append(f"{prefix}/bin/python3.10")
    candidates += _FALLBACK_PYTHONS
    for candidate in filter(None, candidates):
        try:
            out = subprocess.run([candidate, "-c", "import sys, venv; print(sys.version_info[:2])"],
                                 capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            continue
        if out.returncode == 0 and out.stdout.strip() == "(3, 10)":
            return Path(candidate)
    raise PipelineError(
        f"tpu-mlir {TPU_MLIR_VERSION} needs Python 3.10 (its wheel requires >=3.10,<3.11) and none was found "
        "(tried $QWEN_TPU_PYTHON310, python3.10, pyenv). Install one (e.g. `pyenv install 3.10`, or "
        "`apt-get install python3.10 python3.10-venv`) and/or set QWEN_TPU_PYTHON310=/path/to/python3.10; "
        "or use an existing TPU-MLIR installation with QWEN_TPU_TOOLCHAIN=<prefix>.")


def _install(prefix: Path) -> None:
    """Create the venv in place (venvs are not relocatable); the marker, written last, says it is whole."""
    python = find_python310()
    log = prefix.parent / f"{prefix.name}.install.log"
    shutil.rmtree(prefix, ignore_errors=True)  # a half-made one from an interrupted install
    start = time.perf_counter()
    steps = [
        ("create the Python 3.10 environment", [str(python), "-m", "venv", str(prefix)]),
        (f"install tpu-mlir {TPU_MLIR_VERSION} (about 300 MB)",
         [str(prefix / "bin" / "pip"), "install", "--disable-pip-version-check", "-c", str(CONSTRAINTS),
          f"tpu-mlir[onnx]=={TPU_MLIR_VERSION}", "psutil"]),
        (f"install torch {TORCH_FOR_TOOLCHAIN} for its ONNX front end (about 3 GB)",
         [str(prefix / "bin" / "pip"), "install", "--disable-pip-version-check", "-c", str(CONSTRAINTS),
          f"torch=={TORCH_FOR_TOOLCHAIN}"]),
    ]
    with open(log, "w") as out:
        for k, (what, cmd) in enumerate(steps, 1):
            say(f"[toolchain {k}/{len(steps) + 1}] {what} ...")
            out.write(f"$ {' '.join(cmd)}\n")
            out.flush()
            if subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT).returncode:
                raise PipelineError(f"toolchain install failed at: {what}\n{relevant_lines(log, 12)}\n(full log: {log})")
    fixes = _fix_bundled_glibc(prefix)
    say(f"[toolchain {len(steps) + 1}/{len(steps) + 1}] check the tools ...")
    _check(Toolchain(prefix, TPU_MLIR_VERSION), log)
    (prefix / MARKER).write_text(json.dumps({"version": TPU_MLIR_VERSION, "python": str(python), "fixes": fixes,
                                             "seconds": round(time.perf_counter() - start)}, indent=2))
    say(f"[toolchain] tpu-mlir {TPU_MLIR_VERSION} ready in {prefix} ({time.perf_counter() - start:.0f} s)")


def _site_packages(prefix: Path) -> Path:
    return next(prefix.glob("lib/python3.10/site-packages"))


def _glibc_version(data: bytes) -> tuple[int, int] | None:
    found = re.search(rb"release version (\d+)\.(\d+)", data)
    return (int(found[1]), int(found[2])) if found else None


def _fix_bundled_glibc(prefix: Path) -> list[str]:
    """The wheel bundles glibc 2.35 for its own libraries; on a newer host it breaks every console
    script (`GLIBC_2.36 not found`). Drop it only where the host's is newer."""
    import platform

    third_party = _site_packages(prefix) / "tpu_mlir" / "lib" / "third_party"
    libc = third_party / "libc.so.6"
    if not libc.exists():
        return []
    bundled = _glibc_version(libc.read_bytes())
    name, host = platform.libc_ver()
    host_version = tuple(int(x) for x in host.split(".")[:2]) if name == "glibc" and host else None
    if not bundled or not host_version or host_version <= bundled:
        return []
    for lib in BUNDLED_GLIBC:
        (third_party / lib).unlink(missing_ok=True)
    return [f"removed the bundled glibc {bundled[0]}.{bundled[1]} ({', '.join(BUNDLED_GLIBC)}): "
            f"the host has {host}"]


def _check(toolchain: Toolchain, log: Path) -> None:
    checks = [[str(toolchain.bin / "model_tool"), "--version"],
              [str(toolchain.python), "-c", "import tpu_mlir, pyexpat, psutil, torch; "
               "from tpu_mlir.python.tools import model_transform"]]
    with open(log, "a") as out:
        for cmd in checks:
            out.write(f"$ {' '.join(cmd)}\n")
            out.flush()
            if subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, env=toolchain.env()).returncode:
                raise PipelineError(f"the installed toolchain does not run: {' '.join(cmd[:2])} failed\n"
                                    f"{relevant_lines(log, 12)}\n(full log: {log})")
