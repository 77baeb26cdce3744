"""The doit task graph for one build configuration (model, seq; mode/devices/chip come in with
the compiler stages). Task generators are small classes with a `tasks()` each; dodo.py only
collects them. Every artifact is keyed so that:
  - nothing reruns when nothing changed (targets + file_dep + uptodate on every task),
  - mode / devices never re-export (export keys hold neither),
  - a seq has its own folder and task names, so switching seq keeps the other seq's artifacts valid,
  - a layer's pieces re-export only when that layer's weight fingerprint changes.
"""
import sys
import time
from importlib.metadata import version
from pathlib import Path

from doit.exceptions import TaskFailed
from doit.tools import config_changed

from . import PROJECT_ROOT
from .build_config import BuildConfig
from .errors import PipelineError
from .fsutil import read_json, write_json, write_json_if_changed
from .pieces import Dims, model_pieces

P = PROJECT_ROOT / "pipeline"
CODE = {
    "checkpoint": [P / "download.py", P / "checkpoint.py", P / "patch.py"],
    "patch": [P / "patch.py", P / "checkpoint.py", P / "families.py", PROJECT_ROOT / "patches" / "overrides.yaml"],
    "export": [P / "export.py", P / "torch_pieces.py", P / "pieces.py", P / "families.py", P / "patch.py"],
    "verify": [P / "verify.py", PROJECT_ROOT / "runtime" / "engine.py", PROJECT_ROOT / "runtime" / "onnx_backend.py",
               PROJECT_ROOT / "runtime" / "tokenizer.py"],
}
TOOL_VERSIONS = {name: version(name) for name in ("torch", "transformers", "onnx")}


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def guarded(fn):
    """A doit python-action that turns PipelineError into a clean task failure (no traceback)."""
    def action(*args, **kwargs):
        try:
            result = fn(*args, **kwargs)
        except PipelineError as err:
            return TaskFailed(str(err))
        return result if isinstance(result, dict) else None
    action.__name__ = fn.__name__
    return action


class Paths:
    """Where each artifact of a build lives."""

    def __init__(self, build: BuildConfig):
        self.model, self.seq = build.model_dir, build.seq_dir
        self.source = self.model / "source.json"
        self.canonical_config = self.model / "patched" / "config.json"
        self.tensor_map = self.model / "patched" / "tensor_map.json"
        self.weights = self.model / "patched" / "weights"
        self.export_config = self.seq / "config.json"
        self.onnx = self.seq / "onnx"
        self.logs = self.seq / "logs"
        self.report = self.seq / "verify" / "report.json"

    def fingerprint(self, group: str) -> Path:
        return self.weights / f"{group}.json"


class CheckpointTasks:
    """download: resolve the checkpoint and check it; re-checks when its files change."""

    def __init__(self, build: BuildConfig, paths: Paths):
        self.build, self.paths = build, paths

    def tasks(self):
        """find (download, generate or take path=) and check the checkpoint"""
        from .download import source_spec

        spec = source_spec(self.build)
        file_dep = [self.build.model.yaml_path, *CODE["checkpoint"]]
        if spec["kind"] == "generated":
            file_dep.append(P / "generate.py")
        yield {"name": self.build.model.name,
               "doc": "find (download, generate or take path=) and check the checkpoint",
               "actions": [guarded(self.run)], "file_dep": file_dep, "targets": [self.paths.source],
               "uptodate": [config_changed(spec), self.files_unchanged], "clean": True}

    def run(self):
        from .download import check, fetch, source_spec

        say(f"[checkpoint] {self.build.model.name}: {source_spec(self.build)['kind']}")
        folder = fetch(self.build)
        signature = check(self.build, folder)
        write_json(self.paths.source, {"folder": str(folder), "signature": signature,
                                       "spec": source_spec(self.build)})

    def files_unchanged(self, task, values):
        from .download import current_signature

        if not self.paths.source.exists():
            return False
        recorded = read_json(self.paths.source)
        return current_signature(recorded["folder"]) == recorded["signature"]


class PatchTasks:
    """patch: canonical config, tensor map and weight fingerprints (per model), export config (per seq)."""

    def __init__(self, build: BuildConfig, paths: Paths):
        self.build, self.paths = build, paths
        self.groups = ["embed", "head"] + [f"layer_{i}" for i in range(build.model.architecture.num_layers)]

    def tasks(self):
        """canonical config, tensor map, weight fingerprints, export config"""
        name = self.build.model.name
        family_rules = PROJECT_ROOT / "patches" / f"{self.build.model.family}.yaml"
        yield {"name": f"{name}/weights",
               "doc": "map the checkpoint onto the canonical layout; fingerprint each weight group",
               "actions": [guarded(self.patch_weights)],
               "file_dep": [self.paths.source, family_rules, *CODE["patch"]],
               "targets": [self.paths.canonical_config, self.paths.tensor_map,
                           *(self.paths.fingerprint(g) for g in self.groups)], "clean": True}
        yield {"name": f"{name}/seq{self.build.seq}",
               "doc": "the export config for this seq_length",
               "actions": [guarded(self.patch_seq)],
               "file_dep": [self.paths.canonical_config, *CODE["patch"]],
               "targets": [self.paths.export_config, self.paths.onnx / "model.json"], "clean": True}

    def patch_weights(self):
        from .checkpoint import Checkpoint
        from .patch import canonical_config, fingerprint, tensor_map, weight_groups

        start = time.perf_counter()
        ckpt = Checkpoint(Path(read_json(self.paths.source)["folder"]))
        config = canonical_config(ckpt.config, self.build.model.family)
        mapping = tensor_map(ckpt, config, self.build.model.family)
        groups = weight_groups(config["num_hidden_layers"], mapping)
        changed = []
        for k, (group, names) in enumerate(groups.items(), 1):
            if write_json_if_changed(self.paths.fingerprint(group), {"sha256": fingerprint(ckpt, mapping, names),
                                                                    "tensors": names}):
                changed.append(group)
            say(f"[patch] fingerprint {group} ({k}/{len(groups)})")
        write_json_if_changed(self.paths.tensor_map, mapping)
        write_json_if_changed(self.paths.canonical_config, config)
        say(f"[patch] {self.build.model.name}: {len(mapping)} tensors mapped, "
            f"{len(changed)} weight groups new or changed, {time.perf_counter() - start:.1f} s")

    def patch_seq(self):
        from .patch import export_config

        config = export_config(read_json(self.paths.canonical_config), self.build.seq)
        write_json(self.paths.export_config, config)
        dims = Dims.from_config(config)
        write_json(self.paths.onnx / "model.json", {
            "model": self.build.model.name, "seq": dims.seq, "num_layers": dims.num_layers,
            "hidden_size": dims.hidden, "kv_heads": dims.kv_heads, "head_dim": dims.head_dim,
            "vocab_size": dims.vocab})


class ExportTasks:
    """export: one task per piece; its key is the export config (seq), its weight group's
    fingerprint, the export code and the tool versions: never mode or devices."""

    def __init__(self, build: BuildConfig, paths: Paths):
        self.build, self.paths = build, paths
        self.pieces = model_pieces(build.model.architecture.num_layers)

    def target(self, piece) -> Path:
        return self.paths.onnx / f"{piece.name}.onnx"

    def tasks(self):
        """one ONNX file per piece of the net interface"""
        for k, piece in enumerate(self.pieces, 1):
            yield {"name": f"{self.build.model.name}/seq{self.build.seq}/{piece.name}",
                   "doc": f"export {piece.name} to ONNX", "actions": [(guarded(self.run), [piece, k])],
                   "file_dep": [self.paths.export_config, self.paths.tensor_map,
                                self.paths.fingerprint(piece.group), *CODE["export"]],
                   "targets": [self.target(piece)], "uptodate": [config_changed(TOOL_VERSIONS)], "clean": True}

    def run(self, piece, index):
        from .export import export_piece

        start = time.perf_counter()
        log = self.paths.logs / "export" / f"{piece.name}.log"
        say(f"[export {index}/{len(self.pieces)}] {piece.name} ...")
        export_piece(piece, read_json(self.paths.export_config), Path(read_json(self.paths.source)["folder"]),
                     read_json(self.paths.tensor_map), self.target(piece), log)
        say(f"[export {index}/{len(self.pieces)}] {piece.name} done in {time.perf_counter() - start:.1f} s (log {log})")


class VerifyTasks:
    """verify: each ONNX piece against torch, then greedy decode against transformers."""

    def __init__(self, build: BuildConfig, paths: Paths, export: ExportTasks):
        self.build, self.paths, self.export = build, paths, export

    @property
    def name(self) -> str:
        return f"{self.build.model.name}/seq{self.build.seq}"

    def tasks(self):
        """onnxruntime vs torch per piece, greedy decode vs transformers"""
        yield {"name": self.name,
               "doc": "onnxruntime vs torch per piece; greedy decode vs transformers generate()",
               "actions": [guarded(self.run)],
               "file_dep": [*(self.export.target(p) for p in self.export.pieces), self.paths.tensor_map,
                            *CODE["verify"]],
               "targets": [self.paths.report, self.paths.report.with_suffix(".md")],
               "uptodate": [config_changed(TOOL_VERSIONS)], "clean": True}

    def run(self):
        from . import verify
        from .fsutil import write_text

        config, mapping = read_json(self.paths.export_config), read_json(self.paths.tensor_map)
        source = Path(read_json(self.paths.source)["folder"])
        total = len(self.export.pieces)
        done = []

        def progress(net, seconds):
            done.append(net)
            say(f"[verify {len(done)}/{total}] {net} {seconds:.1f} s")

        ids = verify.prompt_ids(source, config["seq_length"], verify.NEW_TOKENS)
        report = {"model": self.build.model.name, "seq": self.build.seq, "prompt_ids": ids, "tools": TOOL_VERSIONS,
                  "pieces": verify.check_pieces(config, source, mapping, self.paths.onnx, ids, progress)}
        say("[verify] greedy decode: onnx pieces vs transformers generate() ...")
        report["decode"] = verify.decode_check(config, source, mapping, self.build.model.family, self.paths.onnx,
                                               ids, verify.NEW_TOKENS)
        write_json(self.paths.report, report)
        write_text(self.paths.report.with_suffix(".md"), verify.markdown(report))
        failures = verify.summarize(report)
        if failures:
            raise PipelineError(f"verification failed ({self.paths.report.with_suffix('.md')}):\n  "
                                + "\n  ".join(failures))
        decode = report["decode"]
        say(f"[verify] PASS: {total} pieces; greedy decode "
            + (f"{len(decode['onnx'])} tokens identical" if decode["run"] else f"not run ({decode['reason']})")
            + f"; report {self.paths.report.with_suffix('.md')}")


def make_tasks(build: BuildConfig) -> dict:
    """The `task_*` functions for dodo.py's namespace."""
    paths = Paths(build)
    export = ExportTasks(build, paths)
    verify = VerifyTasks(build, paths, export)
    generators = [CheckpointTasks(build, paths), PatchTasks(build, paths), export, verify]

    def task_build():
        """the whole chain for model=, mode=, devices=, seq=, chip= (default task)"""
        return {"actions": None, "task_dep": [f"verify:{verify.name}"]}

    namespace = {"task_build": task_build}
    for gen in generators:
        namespace[f"task_{type(gen).__name__.removesuffix('Tasks').lower()}"] = gen.tasks
    return namespace


def doit_config(build: BuildConfig) -> dict:
    build.build_dir.mkdir(parents=True, exist_ok=True)
    return {"backend": "sqlite3", "dep_file": str(build.build_dir / ".doit.sqlite3"),
            "default_tasks": ["build"], "verbosity": 2}
