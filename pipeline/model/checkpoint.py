"""A local Hugging Face checkpoint folder: completeness checks and lazy tensor access.

Only safetensors are read (lazily, one tensor at a time), so the memory a stage needs follows
the tensors it asks for, not the size of the checkpoint. Nothing here writes to the folder.
"""
import json
import math
import struct
from functools import cached_property
from pathlib import Path

from ..errors import PipelineError

INDEX_FILE = "model.safetensors.index.json"
# Every dtype safetensors' torch loader reads, with its size in bytes.
DTYPE_BYTES = {"BF16": 2, "F16": 2, "F32": 4, "F64": 8, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
               "U16": 2, "U32": 4, "U64": 8, "C64": 8,
               "F8_E4M3": 1, "F8_E5M2": 1, "F8_E4M3FNUZ": 1, "F8_E5M2FNUZ": 1}
# What the verify stage and the runtime read besides config and weights (part of the signature).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "qwen.tiktoken",
                   "generation_config.json")


def json_kind(value) -> str:
    """What a parsed JSON value is, in JSON's words (for messages)."""
    kinds = {dict: "object", list: "list", str: "string", bool: "boolean", int: "number", float: "number"}
    return kinds.get(type(value), "null")


def read_json_object(path: Path, what: str) -> dict:
    """A JSON object file of the checkpoint, or an error naming the file, the problem and the fix."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as err:
        raise PipelineError(f"cannot read {path}: {err.strerror}; check that it is a readable file") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise PipelineError(f"{path} is not valid JSON ({err}); download it again") from None
    if not isinstance(data, dict):
        raise PipelineError(f"{path} is not a {what}: it holds a JSON {json_kind(data)}, not an object; "
                            "download it again")
    return data


def read_safetensors_header(path: Path) -> dict:
    """Parse and check a safetensors header: every entry well formed, its bytes inside the file."""
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            (header_len,) = struct.unpack("<Q", f.read(8))
            if header_len > size - 8:
                raise ValueError(f"header length {header_len} exceeds the file ({size} bytes)")
            header = json.loads(f.read(header_len))
    except OSError as err:
        raise PipelineError(f"cannot read {path}: {err.strerror}; check that it is a readable file") from None
    except (struct.error, ValueError, UnicodeDecodeError) as err:
        raise _corrupt(path, str(err)) from None
    if not isinstance(header, dict):
        raise _corrupt(path, f"its header is a JSON {json_kind(header)}, not an object")
    header.pop("__metadata__", None)
    for name, info in header.items():
        _check_entry(path, name, info, size - 8 - header_len)
    return header


def _corrupt(path: Path, problem: str) -> PipelineError:
    return PipelineError(f"corrupt safetensors file {path}: {problem}; download it again")


def _int_list(value, length: int | None = None) -> bool:
    """A list of non-negative ints (JSON true/false are not counts)."""
    return (isinstance(value, list) and (length is None or len(value) == length)
            and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value))


ENTRY_FIELDS = {  # field of a header entry: (is it valid, what it should be)
    "dtype": (lambda v: isinstance(v, str) and v in DTYPE_BYTES, f"one of {', '.join(DTYPE_BYTES)}"),
    "shape": (_int_list, "a list of sizes"),
    "data_offsets": (lambda v: _int_list(v, 2), "[start, end]"),
}


def _check_entry(path: Path, name: str, info, data_size: int) -> None:
    """One tensor's header entry: its fields present and sound, its bytes inside the file (a
    malformed entry would otherwise fail later, as a traceback in whatever reads it)."""
    if not isinstance(info, dict):
        raise _corrupt(path, f"the header entry of tensor {name} is a JSON {json_kind(info)}, not an object")
    for field, (valid, want) in ENTRY_FIELDS.items():
        if field not in info:
            raise _corrupt(path, f"tensor {name} has no {field}")
        if not valid(info[field]):
            raise _corrupt(path, f"tensor {name} has {field} {info[field]!r}, not {want}")
    start, end = info["data_offsets"]
    expected = math.prod(info["shape"]) * DTYPE_BYTES[info["dtype"]]
    if end > data_size or end - start != expected:
        raise _corrupt(path, f"tensor {name} needs bytes {start}..{end} ({expected} expected) but the file holds "
                             f"{data_size} data bytes (truncated?)")


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
        return read_json_object(path, "model config")

    @cached_property
    def weight_map(self) -> dict[str, str] | None:
        """The index's tensor name -> shard file, or None for a folder without an index."""
        path = self.folder / INDEX_FILE
        if not path.is_file():
            return None
        weight_map = read_json_object(path, "safetensors index").get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise PipelineError(f"{path} has no weight_map (tensor name -> shard file), or an empty one; "
                                "download it again")
        bad = [name for name, shard in weight_map.items() if not isinstance(shard, str) or not shard]
        if bad:
            raise PipelineError(f"{path}: its weight_map maps {bad[0]} to {weight_map[bad[0]]!r}, not to a shard "
                                f"file name ({len(bad)} of {len(weight_map)} entries are like that); download it again")
        return weight_map

    @cached_property
    def weight_files(self) -> list[Path]:
        if self.weight_map is not None:
            files = sorted(set(self.weight_map.values()))
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
        if self.weight_map is not None:
            absent = [n for n, f in self.weight_map.items() if index.get(n, (None,))[0] != self.folder / f]
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
        names = ["config.json", INDEX_FILE, *TOKENIZER_FILES] + [p.name for p in self.weight_files]
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

    def mapped(self, tensor_map: dict, canonical: str):
        """The tensor (or rows of one) that the tensor map (the mapping stage's) gives a canonical name."""
        entry = tensor_map[canonical]
        return self.load(entry["name"], tuple(entry["rows"]) if entry["rows"] else None)
