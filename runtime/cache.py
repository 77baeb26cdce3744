"""The project's cache folder outside any checkout: the TPU-MLIR toolchain, converted checkpoints."""
import os
from pathlib import Path


def cache_dir() -> Path:
    return Path(os.environ.get("QWEN_TPU_CACHE") or Path.home() / ".cache" / "qwen-tpu").expanduser()
