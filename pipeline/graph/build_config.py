"""The build's variables (`doit build model=X mode=Y ...`), parsed and validated in one place."""
import math
import os
import sys
from dataclasses import dataclass, replace
from pathlib import Path

from doit import get_var

from runtime.nets import decode_stages

from .. import PROJECT_ROOT
from ..errors import PipelineError
from ..model.config import ModelConfig, load_model_config
from ..model.local import local_model
from ..modes import MODES

DEFAULT_MODEL = "tiny-qwen2"  # builds anywhere: the project generates its weights
DEVICE_COUNTS = (1, 2, 4, 8)
CHIPS = ("bm1684x", "bm1688", "cv186x")
SEQ_MULTIPLE = 8
SEQ_MIN = 16
VARIABLES = ("model", "mode", "devices", "seq", "chip", "path", "name", "group_size", "build_dir", "dist_dir",
             "layers", "sim_tokens", "dynamic", "history", "chunk", "jobs", "memory", "cluster", "modes",
             "quality_tokens")
# greedy steps of the whole-bmodel decode in `doit verify` on the simulator: as many as the ONNX
# check's (verify.NEW_TOKENS, at most), or fewer (0: the pieces only), since a full-width block takes
# minutes a step there
SIM_TOKENS_MAX = 16


@dataclass(frozen=True)
class BuildConfig:
    model: ModelConfig
    mode: str
    devices: int
    seq: int
    chip: str
    path: Path | None
    group_size: int
    build_dir: Path
    dist_dir: Path
    sim_tokens: int = SIM_TOKENS_MAX
    dynamic: bool = True  # prefill nets compiled dynamic: run at the prompt's length (llm_convert --dynamic)
    history: bool = False  # block_kv nets: prefill against the cache (llm_convert --use_history_kv)
    chunk: int = 0         # block_kv's tokens per run and the first decode stage (llm_convert --chunk_length)
    jobs: int = 1          # tasks at once (doit's processes): the cores, by default
    memory: int = 2**62    # bytes the tasks running at once may take together (pipeline/graph/memory_budget.py)
    cluster: str = ""      # a Dask scheduler's address: the heavy actions run on its workers (pipeline/graph/cluster.py)
    # modes=: the (mode, group size) pairs this command builds, and `doit quality` scores; default: mode= alone
    modes: tuple[tuple[str, int], ...] = ()
    quality_tokens: int = 512  # the tokens `doit quality` scores per mode, at least

    def with_mode(self, mode: str, group_size: int) -> "BuildConfig":
        """The same build in another mode."""
        return replace(self, mode=mode, group_size=group_size)

    @property
    def other_modes(self) -> list["BuildConfig"]:
        """The builds of modes= other than this one."""
        return [b for b in (self.with_mode(m, g) for m, g in self.modes) if b.target != self.target]

    @property
    def model_dir(self) -> Path:
        """Everything built for this model (any seq, mode, device count)."""
        return self.build_dir / self.model.name

    @property
    def seq_dir(self) -> Path:
        """What depends on the checkpoint and seq only: shared by every mode and device count."""
        return self.model_dir / f"seq{self.seq}"

    @property
    def variant(self) -> str:
        """What a compiled piece depends on beyond its MLIR (group size only matters for int4)."""
        group = f"_g{self.group_size}" if MODES[self.mode].startswith("W4") else ""
        return f"{self.mode}{group}_{self.devices}dev_{self.chip}{'_dyn' if self.dynamic else ''}"

    @property
    def history_chunk(self) -> int:
        """block_kv's tokens per run; 0 without history nets."""
        return self.chunk if self.history else 0

    @property
    def stages(self) -> tuple[int, ...]:
        """The decode stages' cache lengths below SEQ (C, 2C, 4C ...); none with chunk=0."""
        return decode_stages(self.seq, self.chunk)

    @property
    def chunk_suffix(self) -> str:
        """What the chunk's nets add to the names of what holds them: `_hist_c<C>` (history prefill
        and decode stages), `_c<C>` (decode stages), or nothing."""
        if not self.chunk:
            return ""
        return f"_hist_c{self.chunk}" if self.history else f"_c{self.chunk}"

    @property
    def target(self) -> str:
        """The combined bmodel's key: the variant, and the nets added to it (the deployed pieces of
        one variant are shared whatever is added)."""
        return self.variant + self.chunk_suffix

    @property
    def mode_label(self) -> str:
        """int8, int4, int4_g128: the mode, and an int4 build's group size when not the default."""
        group = "" if self.group_size == 64 or not MODES[self.mode].startswith("W4") else f"_g{self.group_size}"
        return f"{self.mode}{group}"

    @property
    def dist_name(self) -> str:
        chip = "" if self.chip == "bm1684x" else f"_{self.chip}"
        dynamic = "_dyn" if self.dynamic else ""
        return (f"{self.model.name}_{self.mode_label}_seq{self.seq}_{self.devices}dev{chip}{dynamic}"
                f"{self.chunk_suffix}")


def _int(name: str, value: str) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        raise PipelineError(f"{name}={value!r} is not a whole number") from None


def _choice(name: str, value: str, allowed) -> str:
    if value not in allowed:
        raise PipelineError(f"{name}={value!r} is not allowed; use one of: {', '.join(map(str, allowed))}")
    return value


def _folder(given: str) -> Path:
    path = Path(given).expanduser().resolve()
    if not path.is_dir():
        raise PipelineError(f"path={given!r} is not a folder; pass the folder of a local checkpoint")
    return path


def parse_build_config(variables: dict[str, str | None]) -> BuildConfig:
    """Validate every variable; errors name the variable, the value given and what is allowed."""
    given = {k: v for k, v in variables.items() if v is not None}
    unknown = sorted(set(given) - set(VARIABLES))
    if unknown:
        raise PipelineError(f"unknown variable {', '.join(unknown)}; known variables: {', '.join(VARIABLES)}")
    path = _folder(given["path"]) if "path" in given else None
    if "name" in given and "model" in given:
        raise PipelineError(f"name= names a checkpoint given by path= alone; model={given['model']} has its name")
    if path and "model" not in given:  # any checkpoint by its folder: family and numbers from its config
        model = local_model(path, given.get("name"))
    elif "name" in given:
        raise PipelineError("name= names a checkpoint given by its folder: use it with path=DIR (and no model=)")
    else:
        model = load_model_config(given.get("model", DEFAULT_MODEL))
    if "layers" in given:
        layers = _int("layers", given["layers"])
        if not model.generated or "path" in given:
            raise PipelineError(f"layers= only applies to generated test models, not to {model.name}")
        if layers < 1:
            raise PipelineError(f"layers={layers} is not allowed; use a positive number of layers")
        model = model.with_layers(layers)
    mode = _choice("mode", given.get("mode", "int8"), list(MODES))
    devices = _int("devices", given.get("devices", "1"))
    if devices not in DEVICE_COUNTS:
        raise PipelineError(f"devices={devices} is not allowed; use one of: {', '.join(map(str, DEVICE_COUNTS))}")
    seq = _int("seq", given.get("seq", str(model.seq.default)))
    if not (SEQ_MIN <= seq <= model.seq.max and seq % SEQ_MULTIPLE == 0):
        raise PipelineError(
            f"seq={seq} is not allowed for {model.name}: use a multiple of {SEQ_MULTIPLE} "
            f"from {SEQ_MIN} to {model.seq.max} (the checkpoint's trained context)")
    chip = _choice("chip", given.get("chip", "bm1684x"), CHIPS)
    group_size = _int("group_size", given.get("group_size", "64"))
    if group_size <= 0 or group_size % 32:
        raise PipelineError(f"group_size={group_size} is not allowed; use a positive multiple of 32 (default 64)")
    sim_tokens = _int("sim_tokens", given.get("sim_tokens", str(SIM_TOKENS_MAX)))
    if not 0 <= sim_tokens <= SIM_TOKENS_MAX:
        raise PipelineError(f"sim_tokens={sim_tokens} is not allowed; use 0 (check the pieces only) to "
                            f"{SIM_TOKENS_MAX} (the default)")
    dynamic = _choice("dynamic", given.get("dynamic", "1"), ("0", "1")) == "1"
    history = _choice("history", given.get("history", "0"), ("0", "1")) == "1"
    # as llm_convert: the chunk sets the history prefill's run and the decode stages; history
    # needs one (seq/4 unless given), and it is at most half the window
    chunk = _int("chunk", given.get("chunk", str(seq // 4 if history else 0)))
    if not (1 if history else 0) <= chunk <= seq // 2:
        raise PipelineError(f"chunk={chunk} is not allowed with seq={seq}: use {1 if history else 0} to {seq // 2} "
                            f"(default {'seq/4' if history else '0: no decode stages'})")
    jobs, memory = _parallelism(given)
    modes = _modes(given.get("modes"), mode, group_size)
    quality_tokens = _int("quality_tokens", given.get("quality_tokens", "512"))
    if quality_tokens < 1:
        raise PipelineError(f"quality_tokens={quality_tokens} is not allowed; use a positive number (default 512)")
    build_dir = Path(given.get("build_dir") or os.environ.get("QWEN_TPU_BUILD_DIR") or PROJECT_ROOT / "build")
    dist_dir = Path(given.get("dist_dir") or os.environ.get("QWEN_TPU_DIST_DIR") or PROJECT_ROOT / "dist")
    return BuildConfig(model, mode, devices, seq, chip, path, group_size, build_dir.expanduser().resolve(),
                       dist_dir.expanduser().resolve(), sim_tokens, dynamic, history, chunk, jobs, memory,
                       given.get("cluster", ""), modes, quality_tokens)


def unquantized_widths(architecture, mode: str, group_size: int) -> dict[str, int]:
    """The matmul input widths an int4 build at this group size leaves in bf16: TPU-MLIR 1.30.2
    quantizes a matmul only when the group size divides its input width (seen in `doit quality`'s
    -weights nets: SmolLM2 at group size 128 kept its six matmuls of input 576 whole, and quantized
    the one of input 1536). Empty for other modes."""
    a = architecture
    widths = {"hidden_size": a.hidden_size, "intermediate_size": a.intermediate_size,
              "num_heads x head_dim": a.num_heads * a.head_dim}
    if not MODES[mode].startswith("W4"):
        return {}
    return {k: w for k, w in widths.items() if w % group_size}


def group_size_warning(build: BuildConfig) -> str | None:
    """What an int4 build of these modes leaves in bf16 (`unquantized_widths`), said once a command."""
    a = build.model.architecture
    words = []
    for mode, group in sorted(set(build.modes) | {(build.mode, build.group_size)}):
        if bad := unquantized_widths(a, mode, group):
            words.append(f"{mode} group_size={group} does not divide {', '.join(f'{k} {w}' for k, w in bad.items())}: "
                         f"TPU-MLIR leaves the matmuls of that input width unquantized (bf16), so the bmodel is "
                         f"larger than an int4 one; a group size that divides {a.hidden_size} and "
                         f"{a.intermediate_size} quantizes them all")
    return "; ".join(words) or None


def _modes(given: str | None, mode: str, group_size: int) -> tuple[tuple[str, int], ...]:
    """modes=bf16,int8,int4,int4_g128: each a mode, an int4 one with its group size if not group_size=."""
    if given is None:
        return ((mode, group_size),)
    found = []
    for word in given.split(","):
        name, _, group = word.strip().partition("_g")
        if name not in MODES or (group and not (group.isdigit() and MODES[name].startswith("W4")
                                                and int(group) > 0 and int(group) % 32 == 0)):
            raise PipelineError(f"modes={given!r}: {word.strip()!r} is not a mode; use modes from {', '.join(MODES)}, "
                                f"an int4 one with its group size if not the default (int4_g128), comma-separated")
        found.append((name, int(group) if group else group_size))
    return tuple(dict.fromkeys(found))


# with cluster=: the tasks doit hands to the cluster at once (threads that wait for them); the
# workers' MEMORY resources decide how many of them run
CLUSTER_JOBS = 16


def _parallelism(given: dict) -> tuple[int, int]:
    """jobs= (default: the cores) and memory= in GiB (default: what is available now, less a margin)."""
    from .memory_budget import GIB, default_budget

    default_jobs = CLUSTER_JOBS if given.get("cluster") else os.cpu_count() or 1
    jobs = _int("jobs", given.get("jobs", str(default_jobs)))
    if jobs < 1:
        raise PipelineError(f"jobs={jobs} is not allowed; use a positive number of tasks at once (default: the "
                            f"{os.cpu_count()} cores)")
    if "memory" not in given:
        return jobs, default_budget()
    try:
        memory = float(given["memory"])
    except ValueError:
        memory = 0
    if not (math.isfinite(memory) and memory > 0):
        raise PipelineError(f"memory={given['memory']} is not allowed; use the GiB the build may take at once, "
                            f"e.g. memory=16 (default: what is available when the build starts)")
    return jobs, int(memory * GIB)


def variables_given(argv: list[str] | None = None) -> dict[str, str]:
    """The `name=value` words of the doit command line: the known ones through doit's `get_var`; the
    unknown ones (to report them) found as doit itself finds variables (a word with '=' that does
    not start with '-')."""
    argv = sys.argv[1:] if argv is None else argv
    words = {a.split("=", 1)[0] for a in argv if not a.startswith("-") and "=" in a}
    given = {name: get_var(name) for name in VARIABLES}
    given.update({name: "" for name in words - set(VARIABLES)})
    return {k: v for k, v in given.items() if v is not None}
