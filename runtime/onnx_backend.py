"""The onnxruntime backend: runs the exported pieces on the CPU, one session per piece. The engine
walks it with HostWalk: on the CPU, onnxruntime reads numpy inputs in place and hands its outputs
over without copying them, so binding the cache and activations (I/O binding, as the device walk
does on a TPU) saved nothing measurable (benchmarks/onnx_walk.py; README, "On the device").

The prefill pieces are exported static (the TPU compiler gets them so); the backend loads them
rewritten in memory to run at the rows they are given (onnx_exact.exact_rows), so a 16-token prompt
on a seq-128 export runs 16 rows, not 128. The files on disk stay as exported."""
import importlib.util
import json
import re
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnxruntime as ort

from .nets import ModelInfo

MANIFEST = "model.json"


class OnnxBackend:
    """Pieces in a folder with a model.json (dims of the net interface), as the export writes."""

    def __init__(self, folder: Path, threads: int = 1, chunk: int | None = None, stages=None, exact: bool = True):
        """`chunk`: which history prefill pieces to use where several were exported (default: the
        largest); none are used with 0. `stages`: the decode stages' cache lengths to use (default:
        every one exported; () for none). `exact`: the prefill pieces run at the prompt's length and
        the cache's filled slots (else at their exported length, padded, as a static bmodel runs)."""
        self.folder = Path(folder)
        manifest = ModelInfo.from_manifest(json.loads((self.folder / MANIFEST).read_text(encoding="utf-8")))
        self.threads = threads
        self.exact = exact and _has_onnx()
        self._sessions = {}
        chunks = history_chunks(self.folder)
        if chunk and chunk not in chunks:
            raise FileNotFoundError(f"{self.folder} has no history prefill pieces of chunk {chunk} "
                                    f"(block_kv_0_c{chunk}.onnx; exported: {chunks or 'none'})")
        history = chunk if chunk is not None else max(chunks, default=0)
        exported = exported_stages(self.folder)
        missing = sorted(set(stages or ()) - set(exported))
        if missing:
            raise FileNotFoundError(f"{self.folder} has no decode stages of cache length {missing} "
                                    f"(block_cache_0_kv<K>.onnx; exported: {exported or 'none'})")
        self.info = replace(manifest, dynamic=self.exact, history_dynamic=self.exact, history=history,
                            stages=(*sorted(exported if stages is None else stages), manifest.seq))

    def _file(self, net: str, feeds: dict) -> Path:
        """The file of a net: a history prefill of the chosen chunk; a decode stage by the history
        it is given."""
        if net.startswith("block_kv_"):
            return self.folder / f"{net}_c{self.info.history}.onnx"
        if net.startswith("block_cache_") and "history_k" in feeds and feeds["history_k"].shape[1] != self.info.seq:
            return self.folder / f"{net}_kv{feeds['history_k'].shape[1]}.onnx"
        return self.folder / f"{net}.onnx"

    def session(self, file: Path) -> ort.InferenceSession:
        if file not in self._sessions:
            options = ort.SessionOptions()
            # Dozens of sessions on 2 cores: spinning threads make a decode loop 10x slower.
            options.intra_op_num_threads = self.threads
            options.inter_op_num_threads = 1
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
            model = str(file)
            if self.exact and PREFILL.fullmatch(file.stem) and not self._linear(file.stem):
                from .onnx_exact import exact_rows, load_graph

                model = exact_rows(load_graph(model)).SerializeToString()
                # weights over the external-data size stay in their .data file beside the graph
                options.add_session_config_entry("session.model_external_initializers_file_folder_path",
                                                 str(file.parent))
            self._sessions[file] = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
        return self._sessions[file]

    def _linear(self, net: str) -> bool:
        """A linear-attention layer's block_i: static, its window of tokens (runtime/nets.py)."""
        m = re.fullmatch(r"block_(\d+)", net)
        return bool(m) and int(m[1]) in self.info.linear_layers

    def run(self, net: str, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        return self.session(self._file(net, feeds)).run(None, feeds)

    def close(self) -> None:
        """Drops every session (they are made again when next run)."""
        self._sessions = {}


def history_chunks(folder: Path) -> list[int]:
    """The chunk lengths of the history prefill pieces exported into `folder` (`history=1 chunk=C`)."""
    return sorted({int(m[1]) for f in Path(folder).glob("block_kv_*_c*.onnx")  # (a linear layer has none)
                   if (m := re.fullmatch(r"block_kv_\d+_c(\d+)\.onnx", f.name))})


def exported_stages(folder: Path) -> list[int]:
    """The cache lengths of the decode stages exported into `folder` (`chunk=C`: C, 2C, 4C ...)."""
    return sorted({int(m[1]) for f in Path(folder).glob("block_cache_*_kv*.onnx")
                   if (m := re.fullmatch(r"block_cache_\d+_kv(\d+)\.onnx", f.name))})


PREFILL = re.compile(r"block_\d+|block_kv_\d+_c\d+")  # the files exact_rows frees: block_i, block_kv_i


def _has_onnx() -> bool:
    """exact_rows edits the graph with the onnx package: a build dependency, not the runtime's (on a
    board without it, the prefill pieces run padded)."""
    return importlib.util.find_spec("onnx") is not None
