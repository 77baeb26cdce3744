"""Compile stages, with the TPU-MLIR toolchain:
  transform  ONNX piece -> top-level MLIR (shared by every mode, device count and chip)
  deploy     MLIR -> one-piece bmodel for (mode, devices, chip)
  combine    the pieces -> dist/<model>_<mode>_seq<L>_<N>dev[_<chip>].bmodel + its description

Deploy flags follow Sophgo's Qwen-TPU compile.sh and tpu-mlir's llm_convert: embedding and lm_head
in the mode's float type, blocks in the mode, --quant_input/--quant_output so hidden states and
K/V move between nets as bf16/f16, io_alone addressing for cache blocks. A cache block's deploy
saves its io_alone addresses, and its decode stages are deployed onto them (llm_convert's
--save_io_alone_config / --use_io_alone_config): every stage of the combined net then reads and
writes the one cache.
"""
import hashlib
import json
import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from runtime.nets import DYNAMIC_KINDS, LINEAR_KINDS, Piece

from ..errors import PipelineError
from ..fsutil import atomic_dir, atomic_path, require_space, write_json, write_text
from ..modes import MODES
from ..toolchain.tools import run_binary, run_python_tool

# model_transform.py's ONNX simplification (onnxruntime constant folding, then onnxsim) is skipped:
# torch's exporter has already folded the pieces' constants, so it changes nothing here (the same
# MLIR and weights, checked on every family), but it holds several copies of the weights: a
# Qwen-7B-wide embedding (2.3 GiB) grew past 23 GiB with it and takes 10 GiB without it, and a
# 7B block's transform takes a fraction of the time. (The flag is `type=bool`: only "" is false.)
# A family may need it for some pieces (Family.onnx_sim: Qwen3.5's linear-attention prefill).
TRANSFORM_FLAGS = ["--do_onnx_sim="]
# what model_transform.py leaves beside the mlir and its weights: an intermediate mlir, and for a
# model with external data a second copy of the weights (`<name>_external_data`)
LEFTOVERS = ("*_origin.mlir", "*_external_data")


def transform(piece: Piece, onnx: Path, out_dir: Path, log: Path, log_dir: Path, onnx_sim: bool = False,
              float32_ops=None, template: Path | None = None, is_template: bool = False) -> str:
    """<piece>.mlir + its weight file into `out_dir`, atomically: from `template` (the transform of
    the first piece of its kind) when it serves this graph, else by model_transform.py, which
    `is_template` then records for the pieces that follow (pipeline/stages/layer_template.py). With
    `float32_ops` (a predicate on op names), the quantize table that keeps those ops float32.
    Returns how it was made."""
    from . import layer_template

    model, why = _load_onnx(onnx) if template else (None, None)  # (a template's: after its transform)
    if template and model is not None:
        why = layer_template.usable(template, model)
    with atomic_dir(out_dir) as tmp:
        if template and why is None:
            layer_template.transform_from_template(template, piece.name, model, tmp)
            how = f"from {template.name}'s transform (the same graph), with its own weights"
            log.parent.mkdir(parents=True, exist_ok=True)
            write_text(log, f"{piece.name}: {how}: {onnx}\n")
        else:
            run_python_tool("model_transform", ["--model_name", piece.name, "--model_def", str(onnx.resolve()),
                                                "--mlir", f"{piece.name}.mlir", *([] if onnx_sim else TRANSFORM_FLAGS)],
                            tmp, log, log_dir)
            how = "model_transform.py" + (f" ({template.name}'s transform does not serve it: {why})"
                                          if template and why else "")
            if is_template:  # the ONNX weights loaded only now: the transform's peak is over
                model, unreadable = _load_onnx(onnx)
                if unreadable:
                    raise PipelineError(f"{onnx}: model_transform.py read it, but {unreadable[4:]}")
                layer_template.record_template(piece.name, model, tmp / f"{piece.name}.mlir",
                                               tmp / f"{piece.name}_top_f32_all_weight.npz")
        del model
        if float32_ops:
            write_quantize_table(tmp / f"{piece.name}.mlir", float32_ops, tmp / qtable_name(piece))
        for pattern in LEFTOVERS:
            for leftover in tmp.glob(pattern):
                leftover.unlink()
        weights = tmp / f"{piece.name}_top_f32_all_weight.npz"
        if not weights.exists():  # a piece without weights (the heads): an empty file, for one layout
            np.savez(weights)
    return how


def _load_onnx(path: Path) -> tuple:
    """(the model with its weights, None), or (None, why not): model_transform.py then reads it
    itself, and a damaged file fails there, with its log quoted."""
    import onnx

    try:
        return onnx.load(str(path)), None
    except Exception as err:  # a truncated or damaged file: protobuf's DecodeError, a missing .data
        return None, f"its ONNX file could not be read ({type(err).__name__})"


def qtable_name(piece: Piece) -> str:
    return f"{piece.name}.qtable"


def write_quantize_table(mlir: Path, keep, out: Path) -> None:
    """model_deploy.py's --quantize_table: `<op name> F32` for each op of the mlir that `keep` names."""
    names = sorted({m[1] for m in re.finditer(r'loc\("([^"]+)"\)', mlir.read_text(encoding="utf-8")) if keep(m[1])})
    if not names:
        raise PipelineError(f"{mlir.name}: none of its ops is one its family keeps in float32")
    out.write_text("# ops kept in float32 whatever the mode (pipeline/families: float32_ops)\n"
                   + "".join(f"{name} F32\n" for name in names), encoding="utf-8")


def float_type(mode: str) -> str:
    """The float type of a mode: embedding and lm_head are deployed in it."""
    return "F16" if mode in ("f16", "int8f16", "int4f16") else "BF16"


HEADS = ("greedy_head", "sample_head")  # float32 as the logits; on the first device, as llm_convert
FLOAT_TYPED = ("embedding", "embedding_cache", "lm_head")  # in the mode's float type


def weights_quantized(piece: Piece, mode: str) -> bool:
    """Whether the piece's weights are quantized in this mode (every block, in a W8/W4 mode)."""
    return MODES[mode].startswith("W") and piece.kind not in HEADS + FLOAT_TYPED


def deploy_args(piece: Piece, mode: str, devices: int, chip: str, group_size: int, dynamic: bool = False,
                qtable: bool = False) -> list[str]:
    if piece.kind in HEADS:
        return ["--quantize", "F32", "--addr_mode", "io_alone", "--chip", chip]
    if piece.kind in FLOAT_TYPED:
        args = ["--quantize", float_type(mode), "--quant_input"]
        if piece.kind != "lm_head":  # logits stay float32 for host-side sampling
            args.append("--quant_output")
    else:
        quantize = MODES[mode]
        args = ["--quantize", quantize, "--quant_input", "--quant_output"]
        if piece.kind in LINEAR_KINDS:  # the hidden state in the mode's float type,
            args += ["--quant_input_list", "1", "--quant_output_list", "1"]  # the layer's states float32
        if quantize.startswith("W4"):
            args += ["--q_group_size", str(group_size)]
        if piece.kind == "block_cache":  # K/V stay in the net's own input buffers, shared by its stages
            args += ["--addr_mode", "io_alone",
                     "--use_io_alone_config" if piece.stage else "--save_io_alone_config", IO_CONFIG]
        if piece.kind == "linear_cache":  # inputs and outputs of its own, as every decode net's
            args += ["--addr_mode", "io_alone"]
        if qtable:  # ops its family keeps float32 (in the deploy's folder, beside the mlir)
            args += ["--quantize_table", qtable_name(piece)]
        if dynamic and piece.kind in DYNAMIC_KINDS:  # the prefill runs at the prompt's length
            # Without layer groups: TPU-MLIR 1.30.2's grouped attention (MatMul, Softmax, MatMul in
            # local memory), run dynamic, gives NaN or wrong rows at most lengths between 3/4 of the
            # compiled length and that length (benchmarks/dynamic_lengths.py)
            args += ["--dynamic", "--disable_layer_group"]
    args += ["--chip", chip, "--high_precision", "--disable_gdma_check"]
    if devices > 1:
        args += ["--num_device", str(devices)]
    return args


IO_CONFIG = "io_alone_config.json"  # in the deploy's working folder (the args name no path)


def io_config_of(piece: Piece, deploy_dir: Path) -> Path | None:
    """Where a cache block's io_alone addresses are kept: beside its whole-cache bmodel."""
    return deploy_dir / f"{piece.name}.io_alone.json" if piece.kind == "block_cache" else None


@contextmanager
def deploy_scratch(mlir_dir: Path, within: Path, name: str):
    """A scratch folder in `within` for model_deploy.py on the MLIR in `mlir_dir`, removed after:
    the MLIR names its weight file relative to the working folder, so the folder's files are linked in."""
    within.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{name}.", suffix=".tmp", dir=within))
    try:
        for f in Path(mlir_dir).iterdir():
            (scratch / f.name).symlink_to(f.resolve())
        yield scratch
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def deploy(piece: Piece, mlir_dir: Path, args: list[str], out: Path, log: Path, log_dir: Path,
           io_config: Path | None = None) -> None:
    """model_deploy.py in a scratch folder; only the bmodel (and the io_alone addresses it saves)
    are kept, renamed into place, the bmodel last."""
    with deploy_scratch(mlir_dir, out.parent, out.name) as scratch:
        if "--use_io_alone_config" in args:
            (scratch / IO_CONFIG).symlink_to(io_config.resolve())
        run_python_tool("model_deploy", ["--mlir", f"{piece.name}.mlir", *args,
                                         "--model", f"{piece.name}.bmodel"], scratch, log, log_dir)
        built = scratch / f"{piece.name}.bmodel"
        if not built.exists():
            raise PipelineError(f"model_deploy.py reported success but wrote no {built.name} (log: {log})")
        if "--save_io_alone_config" in args:
            if not (scratch / IO_CONFIG).exists():
                raise PipelineError(f"model_deploy.py wrote no {IO_CONFIG} for {piece.file} (log: {log})")
            os.replace(scratch / IO_CONFIG, io_config)
        os.replace(built, out)


def combine(bmodels: list[Path], out: Path, expected_nets: list[str], log: Path) -> dict:
    """model_tool --combine; the result is published only if it holds exactly the expected nets."""
    needed = combined_bytes([b.stat().st_size for b in bmodels])
    require_space(out.parent, needed, f"the combined {out.name}")
    with atomic_path(out) as tmp:
        run_binary(["model_tool", "--combine", *(str(b.resolve()) for b in bmodels), "-o", str(tmp.resolve())],
                   out.parent, log)
        try:
            info = bmodel_info(tmp, log.with_name(log.stem + ".info.log"))
        except PipelineError:  # model_tool --combine exits 0 on a file it could not finish
            require_space(out.parent, needed - tmp.stat().st_size, f"the combined {out.name}")
            raise
        nets = [net["name"] for net in info["nets"]]
        if set(nets) != set(expected_nets):
            missing, extra = sorted(set(expected_nets) - set(nets)), sorted(set(nets) - set(expected_nets))
            raise PipelineError(f"the combined bmodel does not hold the nets of the contract: missing {missing}, "
                                f"unexpected {extra} (log: {log})")
    return info


# Every one-piece bmodel embeds the kernel module (about 5.4 MiB for the BM1684X); the combined file
# keeps one copy.
KERNEL_MODULE_BYTES = 5 * 2**20


def combined_bytes(piece_sizes: list[int]) -> int:
    """About the size of the combined bmodel (at least that; at least its largest piece)."""
    return max(max(piece_sizes), sum(piece_sizes) - (len(piece_sizes) - 1) * KERNEL_MODULE_BYTES)


def bmodel_info(path: Path, log: Path) -> dict:
    """Nets with their inputs/outputs (name, dtype, shape; a net of several stages, e.g. a cache net
    with decode stages, lists stage 0's and each stage's input shapes) and the device count, from
    model_tool --info."""
    text = run_binary(["model_tool", "--info", str(Path(path).resolve())], path.parent, log)
    nets, net, stage = [], None, None
    for line in text.splitlines():
        if m := re.match(r"\s*net\s*\d*:\s*\[(\S+)\]", line):  # "net 0: [x] static" / "net: [x] cascade"
            net, stage = {"name": m[1], "inputs": [], "outputs": [], "stages": []}, None
            nets.append(net)
        elif net is not None and re.match(r"\s*stage\s+\d+", line):
            stage = []  # this stage's input shapes
            net["stages"].append(stage)
        elif net is not None and (m := re.match(
                r"\s*(input|output):\s*(?:devid\((\d+)\)\s*)?([^,]+),\s*\[([\w:,\s]*)\],\s*(\w+)", line)):
            # a dynamic net lists its largest shape: "[max:1, max:512]"
            shape = [int(x.split(":")[-1]) for x in m[4].replace(" ", "").split(",") if x]
            tensor = {"name": m[3], "shape": shape, "dtype": m[5]}
            if m[2] is not None:  # multi-device ("cascade") nets list each device's tensors
                tensor["device"] = int(m[2])
            if len(net["stages"]) <= 1:
                net[m[1] + "s"].append(tensor)
            if stage is not None and m[1] == "input":
                stage.append(shape)
    for net in nets:  # one stage is the net itself
        net["stages"] = net["stages"] if len(net["stages"]) > 1 else []
    device = re.search(r"device num:\s*(\d+)", text)
    return {"nets": nets, "devices": int(device[1]) if device else 1, "text": text}


def describe(bmodel: Path, info: dict, build: dict, source_folder: str, fingerprints: dict) -> dict:
    """The bmodel's description beside it (<name>.json and <name>.md): what was built, from what,
    with which tools, and its nets (what the runtime and the user read)."""
    description = {
        **build, "file": bmodel.name, "quantize": MODES[build["mode"]], "bytes": bmodel.stat().st_size,
        "source": {"folder": source_folder,
                   "fingerprint": hashlib.sha256(json.dumps(fingerprints, sort_keys=True).encode()).hexdigest()},
        "device_count_in_file": info["devices"], "nets": info["nets"],
    }
    write_json(bmodel.with_suffix(".json"), description)
    write_text(bmodel.with_suffix(".md"), describe_markdown(description))
    return description


def describe_markdown(d: dict) -> str:
    prefill = " (dynamic: the prefill runs at the prompt's length)" if d.get("dynamic") else ""
    if d.get("history"):
        prefill += f"; history prefill nets block_kv_i, {d['chunk']} tokens a run against the cache"
    if d.get("stages"):
        prefill += f"; decode stages over the first {', '.join(map(str, d['stages']))} cache slots"
    lines = [f"# {d['file']}", "",
             f"{d['display_name']} ({d['family']}), mode {d['mode']} ({d['quantize']}"
             f"{', group ' + str(d['group_size']) if d['quantize'].startswith('W4') else ''}), "
             f"seq {d['seq']}{prefill}, {d['devices']} device(s), chip {d['chip']}, {d['bytes'] / 2**20:.1f} MiB.", "",
             *([f"Kept in bf16: the matmuls of input {', '.join(f'{k} {w}' for k, w in d['unquantized'].items())}, "
                f"which group size {d['group_size']} does not divide (TPU-MLIR quantizes a matmul only "
                "where it does).", ""] if d.get("unquantized") else []),
             f"Source: {d['source']['folder']} (weights fingerprint {d['source']['fingerprint'][:16]}).",
             "Tools: " + ", ".join(f"{k} {v}" for k, v in d["tools"].items()) + ".", "",
             "| net | inputs | outputs |", "|---|---|---|"]

    def tensors(ts):
        return "<br>".join(f"{'device %d: ' % t['device'] if 'device' in t else ''}{t['name']} {t['shape']} "
                           f"{t['dtype']}" for t in ts)

    def stages(n):
        return (f"<br>{len(n['stages'])} stages, history {', '.join(str(s[3][1]) for s in n['stages'])}"
                if n.get("stages") else "")

    lines += [f"| {n['name']} | {tensors(n['inputs'])}{stages(n)} | {tensors(n['outputs'])} |" for n in d["nets"]]
    return "\n".join(lines) + "\n"
