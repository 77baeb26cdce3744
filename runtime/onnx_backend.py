"""The onnxruntime backend: runs the exported pieces on the CPU, one session per piece. The engine
walks it with HostWalk: on the CPU, onnxruntime reads numpy inputs in place and hands its outputs
over without copying them, so binding the cache and activations (I/O binding, as the device walk
does on a TPU) saved nothing measurable (benchmarks/onnx_walk.py; README, "On the device")."""
import json
import re
from pathlib import Path

import numpy as np
import onnxruntime as ort

MANIFEST = "model.json"


class OnnxBackend:
    """Pieces in a folder with a model.json (dims of the net interface), as the export writes."""

    def __init__(self, folder: Path, threads: int = 1, chunk: int | None = None):
        """`chunk`: which history prefill pieces to use where several were exported (default: the
        largest); none are used with 0."""
        self.folder = Path(folder)
        self.info = json.loads((self.folder / MANIFEST).read_text(encoding="utf-8"))
        self.threads = threads
        self._sessions = {}
        chunks = history_chunks(self.folder)
        if chunk and chunk not in chunks:
            raise FileNotFoundError(f"{self.folder} has no history prefill pieces of chunk {chunk} "
                                    f"(block_kv_0_c{chunk}.onnx; exported: {chunks or 'none'})")
        self.info["history"] = chunk if chunk is not None else max(chunks, default=0)

    def _file(self, net: str) -> Path:
        if net.startswith("block_kv_"):
            return self.folder / f"{net}_c{self.info['history']}.onnx"
        return self.folder / f"{net}.onnx"

    def session(self, net: str) -> ort.InferenceSession:
        if net not in self._sessions:
            options = ort.SessionOptions()
            # Dozens of sessions on 2 cores: spinning threads make a decode loop 10x slower.
            options.intra_op_num_threads = self.threads
            options.inter_op_num_threads = 1
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
            self._sessions[net] = ort.InferenceSession(str(self._file(net)), options,
                                                       providers=["CPUExecutionProvider"])
        return self._sessions[net]

    def run(self, net: str, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        return self.session(net).run(None, feeds)

    def close(self, net: str | None = None) -> None:
        for name in [net] if net else list(self._sessions):
            self._sessions.pop(name, None)


def history_chunks(folder: Path) -> list[int]:
    """The chunk lengths of the history prefill pieces exported into `folder` (`history=1 chunk=C`)."""
    return sorted(int(m[1]) for f in Path(folder).glob("block_kv_0_c*.onnx")
                  if (m := re.fullmatch(r"block_kv_0_c(\d+)\.onnx", f.name)))
