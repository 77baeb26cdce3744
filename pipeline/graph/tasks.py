"""The doit task graph for one build configuration (model, seq; mode/devices/chip come in with
the compiler stages). Task generators are small classes with a `tasks()` each; dodo.py only
collects them. Every artifact is keyed so that:
  - nothing reruns when nothing changed (targets + file_dep + uptodate on every task),
  - mode / devices never re-export (export keys hold neither),
  - a seq has its own folder and task names, so switching seq keeps the other seq's artifacts valid,
  - a layer's pieces re-export only when that layer's weight fingerprint changes,
  - a stage reruns when any project module its work imports changes (code_keys.py),
  - a killed build resumes, and two builds of one folder share the work (task_state.py).
"""
import math
import threading
import time
from functools import partial
from importlib.metadata import version
from pathlib import Path

from doit.tools import config_changed

from runtime.nets import model_pieces

from .. import PROJECT_ROOT
from ..families import get_family
from ..fsutil import ensure_writable_dir, read_json
from ..progress import say
from ..stages.layer_template import same_program
from ..toolchain.install import expected_version
from .build_config import BuildConfig
from .code_keys import source_files
from .file_digest import ContentChecker
from .task_state import stop_quietly_on_ctrl_c, task_action


def portable(path: Path) -> Path:
    """Paths inside the checkout relative to it (doit runs from the checkout's root), so that the
    state of a build folder restored into a fresh clone at another path still matches."""
    path = Path(path)
    try:
        return path.resolve().relative_to(PROJECT_ROOT)
    except ValueError:
        return path


# What each stage's action runs: its code key is these modules' source files and everything they
# import, transitively (pipeline/graph/code_keys.py), plus the data files it reads.
STAGE_MODULES = {
    "checkpoint": ["pipeline.stages.checkpoint_source"],
    "map": ["pipeline.stages.mapping"],
    "export": ["pipeline.stages.export"],
    "transform": ["pipeline.stages.compile"],
    "deploy": ["pipeline.stages.compile"],
    "combine": ["pipeline.stages.compile"],
    "verify": ["pipeline.stages.verify"],
    "verify_sim": ["pipeline.stages.verify_sim", "pipeline.stages.quantized_weights"],
    "quality": ["pipeline.stages.quality", "pipeline.stages.verify", "pipeline.stages.quantized_weights", "runtime.engine",
                "pipeline.toolchain.isolated_backend"],
}
STAGE_DATA = {"map": [Path("patches/overrides.yaml")]}
CODE = {stage: [*source_files(*modules), *STAGE_DATA.get(stage, [])] for stage, modules in STAGE_MODULES.items()}
TOOL_VERSIONS = {name: version(name) for name in ("torch", "transformers", "onnx")}
COMPILER = {"tpu-mlir": expected_version()}  # part of every compiled artifact's key


class Stage:
    """A task generator: its actions run under the task's lock, leftovers of killed runs removed."""
    build: BuildConfig
    paths: "Paths"
    stage = ""  # the heavy ones: its name in stages() and pipeline/graph/memory_budget.py's PEAK_FACTORS
    own_heap = False  # its work is in this process's memory (not the toolchain's): see own_process.py

    def action(self, fn):
        return task_action(fn, self.build.build_dir)

    def execute(self, what: str, fp32_bytes: int, work) -> None:
        """`work()` (a heavy action: a picklable callable) where the memory allows: here, once its
        expected peak fits in the build folder's budget (pipeline/graph/memory_budget.py), or with
        `cluster=`, on a worker of the cluster with that much free (pipeline/graph/cluster.py). A large
        piece's work in this process's own memory runs in a process of its own (pipeline/graph/own_process.py)."""
        from .memory_budget import MemoryBudget, expected_peak
        from .own_process import OWN_PROCESS_BYTES, run_in_own_process

        need, label = expected_peak(self.stage, fp32_bytes), f"{self.stage} {what}"
        if self.build.cluster:
            from .cluster import run_on_cluster

            return run_on_cluster(self.build.cluster, work, label, need)
        with MemoryBudget(self.build.build_dir, self.build.memory).reserve(label, need):
            if self.own_heap and need > OWN_PROCESS_BYTES:
                run_in_own_process(work, label)
            else:
                work()


class Paths:
    """Where each artifact of a build lives."""

    def __init__(self, build: BuildConfig):
        self.model, self.seq = portable(build.model_dir), portable(build.seq_dir)
        self.source = self.model / "source.json"
        self.canonical_config = self.model / "canonical" / "config.json"
        self.tensor_map = self.model / "canonical" / "tensor_map.json"
        self.weights = self.model / "canonical" / "weights"
        self.export_config = self.seq / "config.json"
        self.onnx = self.seq / "onnx"
        self.logs = self.seq / "logs"
        # the ONNX check walks the pieces there are: with history nets, a report of its own
        self.report = self.seq / "verify" / f"report{build.chunk_suffix}.json"
        self.layers_plot = self.seq / "verify" / "layers.png"
        self.transform = self.seq / "transform"
        self.deploy = self.seq / "deploy" / build.variant
        self.dist = portable(build.dist_dir) / f"{build.dist_name}.bmodel"

    def fingerprint(self, group: str) -> Path:
        return self.weights / f"{group}.json"

    def fp32_bytes(self, groups: list[str]) -> int:
        """The weight groups' size in fp32 (their tensors' shapes in the checkpoint): what a
        piece's memory follows."""
        from ..model.checkpoint import Checkpoint

        mapping, checkpoint = read_json(self.tensor_map), Checkpoint(Path(read_json(self.source)["folder"]))
        total = 0
        for group in groups:
            for name in read_json(self.fingerprint(group))["tensors"]:
                entry = mapping[name]
                shape = checkpoint.shape(entry["name"])
                rows = entry["rows"][1] - entry["rows"][0] if entry["rows"] else (shape[0] if shape else 1)
                total += 4 * rows * math.prod(shape[1:])
        return total

    def piece_bytes(self, piece) -> int:
        """A piece's weights in fp32 (the heads that choose a token have none)."""
        return 0 if piece.kind in ("greedy_head", "sample_head") else self.fp32_bytes([piece.group])


class CheckpointTasks(Stage):
    """download: resolve the checkpoint and check it; re-checks when its files change."""

    def __init__(self, build: BuildConfig, paths: Paths):
        self.build, self.paths = build, paths

    def tasks(self):
        """find (download, generate or take path=) and check the checkpoint"""
        from ..stages.checkpoint_source import source_spec

        spec = source_spec(self.build)
        yaml = self.build.model.yaml_path
        file_dep = [*([portable(yaml)] if yaml else []), *CODE["checkpoint"]]
        yield {"name": self.build.model.name,
               "doc": "find (download, generate or take path=) and check the checkpoint",
               "actions": [self.action(self.run)], "file_dep": file_dep, "targets": [self.paths.source],
               "meta": {"outputs": [self.paths.source, self.build.model_dir / "checkpoint"]},
               "uptodate": [config_changed(spec), self.files_unchanged], "clean": True}

    def run(self):
        from ..stages.checkpoint_source import resolve

        resolve(self.build, self.paths.source)

    def files_unchanged(self, task, values):
        from ..stages.checkpoint_source import current_signature

        if not self.paths.source.exists():
            return False
        recorded = read_json(self.paths.source)
        return current_signature(recorded["folder"]) == recorded["signature"]


class MapTasks(Stage):
    """map: canonical config, tensor map and weight fingerprints (per model), export config (per seq)."""

    def __init__(self, build: BuildConfig, paths: Paths):
        self.build, self.paths = build, paths
        self.groups = ["embed", "head"] + [f"layer_{i}" for i in range(build.model.architecture.num_layers)]

    def tasks(self):
        """canonical config, tensor map, weight fingerprints, export config"""
        name = self.build.model.name
        family_rules = get_family(self.build.model.family).patch_file.relative_to(PROJECT_ROOT)
        yield {"name": f"{name}/weights",
               "doc": "map the checkpoint onto the canonical layout; fingerprint each weight group",
               "actions": [self.action(self.map_weights)],
               "file_dep": [self.paths.source, family_rules, *CODE["map"]],
               "targets": [self.paths.canonical_config, self.paths.tensor_map,
                           *(self.paths.fingerprint(g) for g in self.groups)], "clean": True}
        yield {"name": f"{name}/seq{self.build.seq}",
               "doc": "the export config for this seq_length",
               "actions": [self.action(self.map_seq)],
               "file_dep": [self.paths.canonical_config, *CODE["map"]],
               "targets": [self.paths.export_config, self.paths.onnx / "model.json"], "clean": True}

    def map_weights(self):
        from ..stages.mapping import map_weights

        map_weights(self.build.model.name, self.build.model.family, self.paths)

    def map_seq(self):
        from ..stages.mapping import map_seq

        map_seq(self.build.model.name, self.build.seq, self.paths)


class ExportTasks(Stage):
    """export: one task per piece; its key is the export config (seq), its weight group's
    fingerprint, the export code and the tool versions: never mode or devices."""
    stage, own_heap = "export", True

    def __init__(self, build: BuildConfig, paths: Paths):
        self.build, self.paths = build, paths
        self.pieces = model_pieces(build.model.architecture.num_layers, build.history_chunk, build.stages,
                                   build.model.architecture.linear_layers)
        # the first piece of each kind and shape: the later ones reuse its export and transform
        self.followers = same_program(self.pieces)
        self.templates = set(self.followers.values())

    def whole_model(self) -> int:
        """Every piece's weights in fp32: what a check of the whole model holds."""
        return self.paths.fp32_bytes(sorted({p.group for p in self.pieces}))

    def target(self, piece) -> Path:
        return self.paths.onnx / f"{piece.file}.onnx"

    def plan(self, piece) -> Path:
        """A template's weights plan (layer_template.py)."""
        from ..stages.layer_template import PLAN_SUFFIX

        return self.paths.onnx / f"{piece.file}.onnx{PLAN_SUFFIX}"

    def tasks(self):
        """one ONNX file per piece of the net interface"""
        for k, piece in enumerate(self.pieces, 1):
            template = self.followers.get(piece)
            yield {"name": f"{self.build.model.name}/seq{self.build.seq}/{piece.file}",
                   "doc": f"export {piece.file} to ONNX", "actions": [(self.action(self.run), [piece, k])],
                   "file_dep": [self.paths.export_config, self.paths.tensor_map,
                                self.paths.fingerprint(piece.group), *CODE["export"],
                                *([self.plan(template)] if template else [])],  # its graph, not its weights
                   "targets": [self.target(piece), *([self.plan(piece)] if piece in self.templates else [])],
                   "uptodate": [config_changed(TOOL_VERSIONS)], "clean": True}

    def run(self, piece, index):
        self.execute(piece.file, self.paths.piece_bytes(piece), partial(self.work, piece, index))

    def work(self, piece, index):
        from ..stages.export import export_piece

        start, log = time.perf_counter(), self.paths.logs / "export" / f"{piece.file}.log"
        say(f"[export {index}/{len(self.pieces)}] {piece.file} ...")
        template = self.followers.get(piece)
        how = export_piece(piece, read_json(self.paths.export_config), Path(read_json(self.paths.source)["folder"]),
                           read_json(self.paths.tensor_map), self.target(piece), log,
                           template=self.target(template) if template else None, is_template=piece in self.templates)
        say(f"[export {index}/{len(self.pieces)}] {piece.file} done in {time.perf_counter() - start:.1f} s, {how} "
            f"(log {log})")


class TransformTasks(Stage):
    """transform: model_transform.py per piece, shared by every mode, device count and chip."""
    stage = "transform"

    def __init__(self, build: BuildConfig, paths: Paths, export: ExportTasks):
        self.build, self.paths, self.export = build, paths, export

    def mlir(self, piece) -> Path:
        return self.paths.transform / piece.file / f"{piece.name}.mlir"

    def template_record(self, piece) -> Path:
        from ..stages.layer_template import RECORD

        return self.mlir(piece).parent / RECORD

    def weights(self, piece) -> Path:
        """The weight file the mlir names (model_transform's convention)."""
        return self.paths.transform / piece.file / f"{piece.name}_top_f32_all_weight.npz"

    def qtable(self, piece) -> list[Path]:
        """The quantize table of a piece whose family keeps some of its ops float32 (none or one)."""
        from ..stages.compile import qtable_name

        keep = get_family(self.build.model.family).float32_ops(piece.kind)
        return [self.paths.transform / piece.file / qtable_name(piece)] if keep else []

    def tasks(self):
        """model_transform.py per piece (one long-lived toolchain process for all)"""
        for k, piece in enumerate(self.export.pieces, 1):
            template = self.export.followers.get(piece)
            yield {"name": f"{self.build.model.name}/seq{self.build.seq}/{piece.file}",
                   "doc": f"transform {piece.file} to MLIR", "actions": [(self.action(self.run), [piece, k])],
                   "file_dep": [self.export.target(piece), *CODE["transform"],
                                *([self.mlir(template), self.template_record(template)] if template else [])],
                   "targets": [self.mlir(piece), self.weights(piece), *self.qtable(piece),
                               *([self.template_record(piece)] if piece in self.export.templates else [])],
                   "meta": {"outputs": [self.mlir(piece).parent]},
                   "uptodate": [config_changed(COMPILER)], "clean": [(_rmtree, [self.mlir(piece).parent])]}

    def run(self, piece, index):
        self.execute(piece.file, self.paths.piece_bytes(piece), partial(self.work, piece, index))

    def work(self, piece, index):
        from ..stages.compile import transform

        start, total = time.perf_counter(), len(self.export.pieces)
        log, family = self.paths.logs / "transform" / f"{piece.file}.log", get_family(self.build.model.family)
        say(f"[transform {index}/{total}] {piece.file} ...")
        template = self.export.followers.get(piece)
        how = transform(piece, self.export.target(piece), self.mlir(piece).parent, log, self.paths.logs,
                        onnx_sim=family.onnx_sim(piece.kind), float32_ops=family.float32_ops(piece.kind),
                        template=self.mlir(template).parent if template else None,
                        is_template=piece in self.export.templates)
        say(f"[transform {index}/{total}] {piece.file} done in {time.perf_counter() - start:.1f} s, {how} (log {log})")


class DeployTasks(Stage):
    """deploy: model_deploy.py per (piece, mode, devices, chip)."""
    stage = "deploy"

    def __init__(self, build: BuildConfig, paths: Paths, transform: TransformTasks):
        self.build, self.paths, self.transform = build, paths, transform
        self.pieces = transform.export.pieces

    def bmodel(self, piece) -> Path:
        return self.paths.deploy / f"{piece.file}.bmodel"

    def io_config(self, piece) -> Path | None:
        """A cache net's io_alone addresses, saved by its whole-cache deploy and used by its decode
        stages' (so that every stage reads the cache where stage 0 keeps it)."""
        from ..stages.compile import io_config_of

        return io_config_of(piece, self.paths.deploy)

    def args(self, piece) -> list[str]:
        from ..stages.compile import deploy_args

        b = self.build
        return deploy_args(piece, b.mode, b.devices, b.chip, b.group_size, b.dynamic, bool(self.transform.qtable(piece)))

    def dequantized_net(self, piece):
        """The piece's ONNX model with the weights its bmodel holds (pipeline/stages/quantized_weights.py)."""
        from ..stages.quantized_weights import dequantized_onnx, lowered_weights

        mlir, log = self.transform.mlir(piece), self.paths.logs / "deploy" / self.build.variant / f"{piece.file}.lowered.log"
        weights = lowered_weights(piece.name, mlir.parent, self.args(piece), self.paths.deploy, log, self.paths.logs)
        return dequantized_onnx(self.transform.export.target(piece), mlir, weights)

    def tasks(self):
        """model_deploy.py per piece for this mode, device count and chip"""
        b = self.build
        for k, piece in enumerate(self.pieces, 1):
            qtable = self.transform.qtable(piece)
            args = self.args(piece)
            config = self.io_config(piece)  # saved by a cache net's whole-cache deploy, used by its stages'
            saved = [config] if config and not piece.stage else []
            used = [config] if config and piece.stage else []
            yield {"name": f"{b.model.name}/seq{b.seq}/{b.variant}/{piece.file}",
                   "doc": f"deploy {piece.file} ({b.mode}, {b.devices} device(s), {b.chip})",
                   "actions": [(self.action(self.run), [piece, args, k])],
                   "file_dep": [self.transform.mlir(piece), self.transform.weights(piece), *qtable, *used,
                                *CODE["deploy"]],
                   "targets": [self.bmodel(piece), *saved],
                   "uptodate": [config_changed({**COMPILER, "args": args})], "clean": True}

    def run(self, piece, args, index):
        self.execute(piece.file, self.paths.piece_bytes(piece), partial(self.work, piece, args, index))

    def work(self, piece, args, index):
        from ..stages.compile import deploy

        start, total = time.perf_counter(), len(self.pieces)
        log = self.paths.logs / "deploy" / self.build.variant / f"{piece.file}.log"
        say(f"[deploy {index}/{total}] {piece.file} {' '.join(args[:2])} ...")
        deploy(piece, self.transform.mlir(piece).parent, args, self.bmodel(piece), log, self.paths.logs,
               self.io_config(piece))
        say(f"[deploy {index}/{total}] {piece.file} done in {time.perf_counter() - start:.1f} s (log {log})")


class CombineTasks(Stage):
    """combine: one bmodel in dist/, with a description beside it."""

    def __init__(self, build: BuildConfig, paths: Paths, deploy: DeployTasks):
        self.build, self.paths, self.deploy = build, paths, deploy

    def tasks(self):
        """model_tool --combine into dist/, checked against the net contract, with a description"""
        b = self.build
        yield {"name": f"{b.model.name}/seq{b.seq}/{b.target}", "doc": f"combine into {self.paths.dist.name}",
               "actions": [self.action(self.run)],
               "file_dep": [*(self.deploy.bmodel(p) for p in self.deploy.pieces), *CODE["combine"]],
               "targets": [self.paths.dist, self.paths.dist.with_suffix(".json"), self.paths.dist.with_suffix(".md")],
               "uptodate": [config_changed(COMPILER)], "clean": True}

    def run(self):
        from ..stages.compile import combine, describe
        from ..stages.mapping import copy_tokenizer
        from .build_config import unquantized_widths

        start, b = time.perf_counter(), self.build
        pieces = self.deploy.pieces
        log = self.paths.logs / "combine" / f"{b.target}.log"
        info = combine([self.deploy.bmodel(p) for p in pieces], self.paths.dist, [p.name for p in pieces], log)
        tokenizer = f"{b.model.name}-tokenizer"  # shared by this model's bmodels
        copy_tokenizer(self.paths.onnx, self.paths.dist.parent / tokenizer)
        build = {"model": b.model.name, "display_name": b.model.display_name, "family": b.model.family,
                 "mode": b.mode, "group_size": b.group_size, "devices": b.devices, "chip": b.chip, "seq": b.seq,
                 "dynamic": b.dynamic, "history": b.history, "chunk": b.chunk, "stages": list(b.stages),
                 "tokenizer": tokenizer,
                 "unquantized": unquantized_widths(b.model.architecture, b.mode, b.group_size),
                 "tools": {**TOOL_VERSIONS, **COMPILER}}
        fingerprints = {g.stem: read_json(g)["sha256"] for g in sorted(self.paths.weights.glob("*.json"))}
        described = describe(self.paths.dist, info, build, read_json(self.paths.source)["folder"], fingerprints)
        say(f"[combine] {self.paths.dist} ({described['bytes'] / 2**20:.1f} MiB, {len(info['nets'])} nets) "
            f"in {time.perf_counter() - start:.1f} s")


def _rmtree(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)


class VerifyTasks(Stage):
    """verify: each ONNX piece against torch, then greedy decode against transformers; and on the
    simulator, each deployed piece against onnxruntime, then the combined bmodel's greedy decode."""
    stage, own_heap = "verify", True

    def __init__(self, build: BuildConfig, paths: Paths, export: ExportTasks, deploy: DeployTasks):
        self.build, self.paths, self.export, self.deploy = build, paths, export, deploy
        self.sim_report = paths.seq / "verify" / build.target / "report.json"

    @property
    def name(self) -> str:
        """The ONNX check's task: per seq, and per chunk (it walks those pieces too)."""
        b = self.build
        return f"{b.model.name}/seq{b.seq}" + (f"/{b.chunk_suffix[1:]}" if b.chunk else "")

    def tasks(self):
        """onnxruntime vs torch per piece, greedy decode vs transformers"""
        yield {"name": self.name,
               "doc": "onnxruntime vs torch per piece; greedy decode vs transformers generate()",
               "actions": [self.action(self.run)],
               "file_dep": [*(self.export.target(p) for p in self.export.pieces), self.paths.tensor_map,
                            *CODE["verify"]],
               "targets": [self.paths.report, self.paths.report.with_suffix(".md")],
               "uptodate": [config_changed({**TOOL_VERSIONS, "prompts": self.build.model.verify_prompts})],
               "clean": True}
        yield {"name": f"{self.build.model.name}/seq{self.build.seq}/{self.build.target}",
               "doc": "on the simulator: each deployed piece vs onnxruntime; combined bmodel's greedy decode",
               "actions": [self.action(self.run_simulator)],
               "file_dep": [self.paths.dist, *(self.deploy.bmodel(p) for p in self.export.pieces),
                            *(self.export.target(p) for p in self.export.pieces), self.paths.report,
                            *CODE["verify_sim"]],
               "targets": [self.sim_report, self.sim_report.with_suffix(".md")],
               "meta": {"outputs": [self.sim_report, self.sim_report.with_suffix(".md"), self.paths.layers_plot]},
               "uptodate": [config_changed({**COMPILER, "sim_tokens": self.build.sim_tokens})], "clean": True}

    def run(self):
        self.execute("on onnxruntime (the whole model, twice: torch and onnxruntime)", 2 * self.export.whole_model(),
                     self.check_onnx)

    def run_simulator(self):
        self.execute(f"{self.build.mode} on the simulator", self.export.whole_model(), self.check_simulator)

    def check_onnx(self):
        from ..stages import verify

        verify.run(self.build, self.paths, self.export.pieces, TOOL_VERSIONS)

    def check_simulator(self):
        from ..stages import verify_sim

        verify_sim.run(self.build, self.paths, self.export.pieces, self.sim_report, {**TOOL_VERSIONS, **COMPILER},
                       self.deploy.dequantized_net)


class QualityTasks(Stage):
    """quality: each mode of modes= (its combined bmodel, on the simulator), and the ONNX pieces as
    the control, score a text against the fp32 reference, a task per mode and window
    (pipeline/stages/quality.py); then the report of them all."""
    stage, own_heap = "quality", True

    def __init__(self, build: BuildConfig, paths: Paths, export: ExportTasks):
        self.build, self.paths, self.export = build, paths, export
        self.folder = paths.seq / "quality"
        self.text = self.folder / "text.json"
        self.report = self.folder / "report.json"
        # enough windows of seq tokens for quality_tokens: all but a window's first token are scored
        self.windows = math.ceil(build.quality_tokens / (build.seq - 1))
        self.modes = {b.mode_label: b for b in [build.with_mode(m, g) for m, g in build.modes]}

    def reference(self, k: int) -> Path:
        return self.folder / "reference" / f"w{k}.npz"

    def scored(self, label: str, k: int) -> Path:
        return self.folder / label / f"w{k}.npz"

    def weights_record(self, label: str) -> Path:
        return self.folder / f"{label}-weights" / "net.json"

    def rows(self) -> dict[str, list[Path]]:
        """The report's rows -> what scoring each depends on: the ONNX pieces (the control), each
        mode's bmodel, and for a quantized mode the ONNX pieces with that bmodel's own weights
        (`<mode>-weights`: what the quantization alone costs, in fp32 on onnxruntime)."""
        rows = {"onnx": [self.export.target(p) for p in self.export.pieces]}
        for label, build in self.modes.items():
            rows[label] = [Paths(build).dist]
            if self.quantized(label):
                rows[f"{label}-weights"] = [self.weights_record(label)]
        return rows

    def quantized(self, label: str) -> list:
        """The prefill pieces whose weights the mode quantizes (what a prefill runs: Engine.prompt_logits;
        as compile.weights_quantized: every block in a W8/W4 mode, embedding and lm_head in its float type)."""
        from ..modes import MODES

        if not MODES[self.modes[label].mode].startswith("W"):
            return []
        return [p for p in self.export.pieces if p.kind in ("block", "linear_block")]

    def tasks(self):
        """score a text against the fp32 reference, per mode of modes= and window; the report"""
        b, name = self.build, f"{self.build.model.name}/seq{self.build.seq}"
        yield {"name": f"{name}/text", "doc": "the scoring text, tokenized, in windows of seq",
               "actions": [self.action(self.write_text)], "file_dep": [self.paths.export_config, *CODE["quality"]],
               "targets": [self.text], "uptodate": [config_changed({"tokens": b.quality_tokens})], "clean": True}
        transform = TransformTasks(b, self.paths, self.export)
        for label in self.modes:
            if pieces := self.quantized(label):
                yield {"name": f"{name}/{label}-weights/net", "doc": f"the ONNX pieces with the {label} bmodel's weights",
                       "actions": [(self.action(self.run_weights_net), [label])], "clean": True,
                       "file_dep": [*(f for p in pieces for f in (self.export.target(p), transform.mlir(p),
                                                                 transform.weights(p))), *CODE["quality"]],
                       "targets": [self.weights_record(label)],
                       "uptodate": [config_changed({**COMPILER, "group_size": self.modes[label].group_size})]}
        weights = [self.paths.fingerprint(g) for g in sorted({p.group for p in self.export.pieces})]
        rows = self.rows()
        for k in range(self.windows):
            yield {"name": f"{name}/reference/w{k}", "doc": f"window {k}: the fp32 reference (transformers)",
                   "actions": [(self.action(self.run_reference), [k])], "clean": True,
                   "file_dep": [self.text, self.paths.tensor_map, *weights, *CODE["quality"]],
                   "targets": [self.reference(k)], "uptodate": [config_changed(TOOL_VERSIONS)]}
            for label, dependencies in rows.items():
                yield {"name": f"{name}/{label}/w{k}", "doc": f"window {k}: {label} against the reference",
                       "actions": [(self.action(self.run_score), [label, k])], "clean": True,
                       "file_dep": [self.text, self.reference(k), *dependencies, *CODE["quality"]],
                       "targets": [self.scored(label, k)]}
        scored = {label: [self.scored(label, k) for k in range(self.windows)] for label in rows}
        yield {"name": f"{name}/report", "doc": "the figures per mode: JSON, Markdown, a KL histogram",
               "actions": [(self.action(self.write_report), [scored])], "clean": True,
               "file_dep": [self.text, *(f for files in scored.values() for f in files), *CODE["quality"]],
               "targets": [self.report, self.report.with_suffix(".md"), self.report.with_suffix(".png")]}

    def run_weights_net(self, label):
        self.execute(f"{label}'s weights in fp32", self.export.whole_model(), partial(self.weights_net_work, label))

    def weights_net_work(self, label):
        from ..stages.quality import dequantized_folder

        start, deploy = time.perf_counter(), stages(self.modes[label])["deploy"]
        record = self.weights_record(label)
        dequantized_folder(self.paths.onnx, record.parent / "onnx", self.quantized(label), deploy.dequantized_net, record)
        say(f"[quality] the ONNX pieces with the {label} bmodel's weights, in {time.perf_counter() - start:.1f} s")

    def write_text(self):
        from ..stages.quality import write_windows

        write_windows(self.paths.onnx, self.build.seq, self.windows, self.text)

    def run_reference(self, k):
        self.execute(f"reference w{k}", self.export.whole_model(), partial(self.reference_work, k))

    def reference_work(self, k):
        from ..stages.quality import reference_window
        from ..stages.verify import reference_model

        start = time.perf_counter()
        model = reference_model(read_json(self.paths.export_config), Path(read_json(self.paths.source)["folder"]),
                                read_json(self.paths.tensor_map), self.build.model.family)
        reference_window(model, read_json(self.text)["windows"][k], self.reference(k))
        say(f"[quality] reference w{k + 1}/{self.windows} in {time.perf_counter() - start:.1f} s")

    def run_score(self, label, k):
        self.execute(f"{label} w{k}", self.export.whole_model(), partial(self.score_work, label, k))

    def score_work(self, label, k):
        from runtime.engine import Engine

        from ..stages.quality import score_window

        start, window = time.perf_counter(), read_json(self.text)["windows"][k]
        say(f"[quality] {label} w{k + 1}/{self.windows}: {len(window) - 1} positions ...")
        if label == "onnx" or label.endswith("-weights"):
            from runtime.onnx_backend import OnnxBackend

            folder = self.paths.onnx if label == "onnx" else self.folder / label / "onnx"
            score_window(Engine(OnnxBackend(folder)), window, self.reference(k), self.scored(label, k))
        else:
            from pipeline.toolchain.isolated_backend import IsolatedBmodelBackend

            with IsolatedBmodelBackend(Paths(self.modes[label]).dist) as backend:  # its simulator stops with it
                score_window(Engine(backend), window, self.reference(k), self.scored(label, k))
        say(f"[quality] {label} w{k + 1}/{self.windows} done in {time.perf_counter() - start:.1f} s")

    def write_report(self, scored):
        from ..stages.quality import report

        data = report(self.build.model.name, self.build.seq, read_json(self.text), scored, self.report)
        say(f"[quality] {self.report.with_suffix('.md')}: " + "; ".join(
            f"{mode} ppl x{m['ppl_ratio']:.4f}, KL {m['kl_mean']:.2g}, same top-1 {100 * m['same_top1']:.1f}%"
            for mode, m in data["modes"].items()))


def stages(build: BuildConfig) -> dict:
    """The task generators of a build, by stage."""
    paths = Paths(build)
    export = ExportTasks(build, paths)
    transform = TransformTasks(build, paths, export)
    deploy = DeployTasks(build, paths, transform)
    return {"checkpoint": CheckpointTasks(build, paths), "map": MapTasks(build, paths), "export": export,
            "transform": transform, "deploy": deploy, "combine": CombineTasks(build, paths, deploy),
            "verify": VerifyTasks(build, paths, export, deploy), "quality": QualityTasks(build, paths, export)}


def make_tasks(build: BuildConfig) -> dict:
    """The `task_*` functions for dodo.py's namespace."""
    by_stage = stages(build)
    verify = by_stage["verify"]

    def task_build():
        """the whole chain for model=, mode=, devices=, seq=, chip= (default task)"""
        return {"actions": None, "task_dep": [f"verify:{verify.name}",
                                              f"combine:{build.model.name}/seq{build.seq}/{build.target}"]}

    namespace = {"task_build": task_build}
    for name, generator in by_stage.items():
        namespace[f"task_{name}"] = generator.tasks
    # modes=: each other mode's deploy and combine (the stages before them are the same tasks)
    others = [stages(other) for other in build.other_modes]
    for name in ("deploy", "combine"):
        namespace[f"task_{name}"] = _chained([by_stage[name], *(s[name] for s in others)])
    return namespace


def _chained(generators: list) -> "callable":
    def tasks():
        for generator in generators:
            yield from generator.tasks()
    tasks.__doc__ = generators[0].tasks.__doc__
    return tasks


def doit_config(build: BuildConfig) -> dict:
    from .build_config import group_size_warning

    if warning := group_size_warning(build):
        say(f"warning: {warning}")
    ensure_writable_dir(build.build_dir, "build_dir")
    ensure_writable_dir(build.dist_dir, "dist_dir", create=False)
    if build.jobs > 1 and threading.current_thread() is threading.main_thread():
        stop_quietly_on_ctrl_c()
    return {"backend": "sqlite3-durable", "dep_file": str(build.build_dir / ".doit.sqlite3"),
            "default_tasks": ["build"], "verbosity": 2, "check_file_uptodate": ContentChecker,
            # a cluster's tasks are waited for by threads; here, processes do the work
            **({"num_process": build.jobs, "par_type": "thread" if build.cluster else "process"}
               if build.jobs > 1 else {})}
