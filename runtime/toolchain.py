"""Where the TPU-MLIR toolchain is: the runtime loads the simulator's BM runtime from it (on a
board, libsophon's). The build installs it (pipeline/toolchain/install.py writes MARKER) and runs
its tools (pipeline/toolchain/process.py)."""
import os
from pathlib import Path

from .cache import cache_dir

MARKER = ".qwen-tpu-toolchain.json"


class ToolchainError(RuntimeError):
    pass


def find_toolchain() -> Path:
    """QWEN_TPU_TOOLCHAIN, else the newest complete toolchain the build installed in the cache."""
    if os.environ.get("QWEN_TPU_TOOLCHAIN"):
        return Path(os.environ["QWEN_TPU_TOOLCHAIN"]).expanduser()
    found = sorted(p.parent for p in cache_dir().glob(f"tpu-mlir-*/{MARKER}"))
    if not found:
        raise ToolchainError(f"no TPU-MLIR toolchain in {cache_dir()}: running a .bmodel needs one (`doit build` "
                             "installs it), or set QWEN_TPU_TOOLCHAIN to an installation's prefix")
    return found[-1]
