"""A local Hugging Face checkpoint folder: completeness checks and lazy tensor access.

Only safetensors are read (lazily, one tensor at a time), so the memory a stage needs follows
the tensors it asks for, not the size of the checkpoint. Nothing here writes to the folder.
"""
import json
import math
import struct
from functools import cached_property
from pathlib import Path

from .errors import PipelineError

INDEX_FILE = "model.safetensors.index.json"
DTYPE_BYTES = {"BF16": 2, "F16": 2, "F32": 4, "F64": 8, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


def read_safetensors_header(path: Path) -> dict:
    """Parse and check a safetensors header: every tensor's bytes must lie inside the file."""
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            (header_len,) = struct.unpack("<Q", f.read(8))
            if header_len > size - 8:
                raise ValueError(f"header length {header_len} exceeds the file ({size} bytes)")
            header = json.loads(f.read(header_len))
    except (struct.error, ValueError, UnicodeDecodeError) as err:
        raise PipelineError(f"corrupt safetensors file {path}: {err}; download it again") from None
    data_size = size - 8 - header_len
    header.pop("__metadata__", None)
    for name, info in header.items():
        start, end = info["data_offsets"]
        expected = math.prod(info["shape"]) * DTYPE_BYTES.get(info["dtype"], 0)
        if end > data_size or end - start != expected:
            raise PipelineError(
                f"corrupt safetensors file {path}: tensor {name} needs bytes {start}..{end} "
                f"({expected} expected) but the file holds {data_size} data bytes (truncated?); download it again")
    return header


class Checkpoint:
    """A checkpoint folder: config.json + safetensors (sharded with an index, or single)."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self._handles = {}

    @cached_property
    def config(self) -> dict:
        path = self.folder / "config.json"
        if not path.is_file():
            raise PipelineError(f"{self.folder} is not a Hugging Face checkpoint: it has no config.json")
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise PipelineError(f"{path} is not valid JSON: {err}") from None

    @cached_property
    def weight_files(self) -> list[Path]:
        index = self.folder / INDEX_FILE
        if index.is_file():
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            files = sorted(set(weight_map.values()))
            missing = [f for f in files if not (self.folder / f).is_file()]
            if missing:
                raise PipelineError(
                    f"checkpoint {self.folder} is incomplete: {INDEX_FILE} lists {len(files)} shards but "
                    f"{len(missing)} are missing ({', '.join(missing[:4])}{' ...' if len(missing) > 4 else ''})")
            return [self.folder / f for f in files]
        files = sorted(self.folder.glob("*.safetensors"))
        if not files:
            other = sorted(p.name for p in self.folder.glob("*.bin"))
            hint = f" (found {', '.join(other[:3])}: convert it to safetensors first)" if other else ""
            raise PipelineError(f"checkpoint {self.folder} has no *.safetensors weights{hint}")
        return files

    @cached_property
    def tensor_index(self) -> dict[str, tuple[Path, dict]]:
        """name -> (file, header entry). Checks every header and the index against the shards."""
        index = {}
        for path in self.weight_files:
            for name, info in read_safetensors_header(path).items():
                index[name] = (path, info)
        index_file = self.folder / INDEX_FILE
        if index_file.is_file():
            weight_map = json.loads(index_file.read_text(encoding="utf-8"))["weight_map"]
            absent = [n for n, f in weight_map.items() if index.get(n, (None,))[0] != self.folder / f]
            if absent:
                raise PipelineError(
                    f"checkpoint {self.folder} is inconsistent: {len(absent)} tensors of {INDEX_FILE} are not "
                    f"in the shard it names (first: {absent[0]})")
        return index

    def validate(self) -> None:
        """Cheap completeness check: config, every shard present, every header sound."""
        _ = self.config, self.tensor_index

    def stat_signature(self) -> list:
        """(name, size, mtime_ns) of the files that matter: cheap change detection, no hashing."""
        names = ["config.json", INDEX_FILE] + [p.name for p in self.weight_files]
        sig = []
        for name in names:
            p = self.folder / name
            if p.is_file():
                st = p.stat()
                sig.append([name, st.st_size, st.st_mtime_ns])
        return sig

    def shape(self, name: str) -> list[int]:
        return self.tensor_index[self._known(name)][1]["shape"]

    def _known(self, name: str) -> str:
        if name not in self.tensor_index:
            raise PipelineError(f"checkpoint {self.folder} has no tensor {name}")
        return name

    def release(self) -> None:
        """Unmap the open files. Tensors are views of the mapped file, and the pages read stay in
        this process's resident memory while a file is open: hashing a whole 28 GB checkpoint
        through open handles showed 22 GiB resident (file pages the kernel could reclaim, but
        counted, and pushed out everything else in the page cache)."""
        self._handles.clear()

    def load(self, name: str, rows: tuple[int, int] | None = None):
        """One tensor (or a slice of rows along dim 0) as a torch tensor in its stored dtype."""
        from safetensors import safe_open

        path = self.tensor_index[self._known(name)][0]
        if path not in self._handles:
            self._handles[path] = safe_open(str(path), framework="pt")
        handle = self._handles[path]
        if rows is None:
            return handle.get_tensor(name)
        return handle.get_slice(name)[rows[0]:rows[1]]
