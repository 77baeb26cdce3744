"""A deployed piece's weights as TPU-MLIR quantized them, back in float: the net a quantized bmodel
really computes, to tell a mode's cost from a build defect.

A W8/W4 bmodel's matmuls use weights rounded to 8 or 4 bits. Where such a piece misses its mode's
thresholds against fp32, the question is whose error it is. TPU-MLIR lowers the piece once more
without generating code (`model_deploy.py --not_gen_bmodel`, the deploy's own flags), which leaves
the quantized weights in `<name>_<chip>_<mode>_tpu_weights.npz` (`_tpu_qtable_weights.npz` with a
quantize table). Per matmul op (named by its MLIR location) they are:
  `<op>_uint`        the values, one per byte (W8) or two (W4, low nibble first), [N, K] row-major
  `<op>_zp`          a zero point per output column and group (asymmetric: the default)
  `<op>_scale_bf16`  a scale per output column and group, [N, K / group] (`_scale_f16` in W*F16)
  `<op>_dequant_bf16` instead of the three, for a matmul too small to quantize: the rounded weights
They are dequantized and put in place of the piece's ONNX weights; onnxruntime on that net is what
the bmodel should compute up to its activations' float type. Measured on tiny-qwen3.5's `block_0`
(int8): against fp32 the simulator has cosine 0.99591 and the dequantized net 0.99707, while the
simulator against the dequantized net has 0.99977 (bf16's own rounding: 0.99982).
"""
import re
from pathlib import Path
from typing import NamedTuple

import numpy as np

from ..errors import PipelineError
from ..toolchain.tools import run_python_tool
from .compile import deploy_scratch

# deploy flags about addresses, not weights: a lowering without code generation reads no address file
ADDRESS_FLAGS = ("--save_io_alone_config", "--use_io_alone_config")


def lowered_weights(name: str, mlir_dir: Path, deploy_args: list[str], scratch_in: Path, log: Path,
                    log_dir: Path) -> dict:
    """The quantized weights of the piece whose top-level MLIR is `<mlir_dir>/<name>.mlir`, as
    model_deploy.py with these flags quantizes them (in a scratch folder in `scratch_in`, removed after)."""
    args = [a for i, a in enumerate(deploy_args)
            if a not in ADDRESS_FLAGS and (i == 0 or deploy_args[i - 1] not in ADDRESS_FLAGS)]
    with deploy_scratch(mlir_dir, scratch_in, f"{name}.lowered") as scratch:
        run_python_tool("model_deploy", ["--mlir", f"{name}.mlir", *args, "--model", f"{name}.bmodel",
                                         "--not_gen_bmodel"], scratch, log, log_dir)
        found = sorted(scratch.glob(f"{name}_*_tpu_*weights.npz"))  # `_tpu_qtable_weights` with a quantize table
        if not found:
            raise PipelineError(f"model_deploy.py --not_gen_bmodel left no quantized weights for {name} (log: {log})")
        with np.load(found[0]) as npz:
            return {k: npz[k] for k in npz.files}


def matmul_weights(mlir_text: str) -> dict[str, str]:
    """Each matmul op of a top-level MLIR whose right operand is a weight: op name -> weight name."""
    locs = dict(re.findall(r'^#(loc\d+) = loc\("([^"]+)"\)', mlir_text, re.M))
    weights = {m[1]: locs.get(m[2]) for m in re.finditer(r'(%\d+) = "top.Weight"\(\).*loc\(#(loc\d+)\)', mlir_text)}
    found = {}
    for m in re.finditer(r'"top.MatMul"\((%\d+), (%\d+)[^)]*\) \{([^}]*)\}.*loc\(#(loc\d+)\)', mlir_text):
        if m[2] in weights and "right_transpose = false" in m[3]:
            found[locs[m[4]]] = weights[m[2]]
    return found


def _bf16_or_f16(values: np.ndarray, key: str) -> np.ndarray:
    if key.endswith("bf16"):
        return (values.astype(np.uint32) << 16).view(np.float32)
    return values.view(np.float16).astype(np.float32)


class Dequantized(NamedTuple):
    values: np.ndarray  # [K, N], as the bmodel computes with them
    levels: int         # of its grid: 255 (8 bits) or 15 (4 bits)
    group: int          # rows of K sharing a scale


def dequantize(lowered: dict, op: str, shape: tuple[int, int]) -> Dequantized | None:
    """The [K, N] weight of matmul `op` as the bmodel holds it; None if TPU-MLIR left it float."""
    k, n = shape
    for kept in (f"{op}_dequant_bf16", f"{op}_dequant_f16"):  # rounded to a grid we are not told: 4 bits at most
        if kept in lowered:
            return Dequantized(_bf16_or_f16(lowered[kept], kept).reshape(shape), 15, k)
    if f"{op}_uint" not in lowered:
        return None
    scale_key = next((s for s in (f"{op}_scale_bf16", f"{op}_scale_f16") if s in lowered), None)
    if scale_key is None or f"{op}_zp" not in lowered:
        raise PipelineError(f"{op}: quantized weights without a scale or a zero point (symmetric quantization "
                            f"is not read here)")
    values, levels = lowered[f"{op}_uint"], 255
    if values.size * 2 == k * n:  # W4: two values per byte, the low nibble first
        values, levels = np.stack([values & 15, values >> 4], axis=-1), 15
    scale = _bf16_or_f16(lowered[scale_key], scale_key).reshape(n, -1)
    group = k // scale.shape[1]
    zero = lowered[f"{op}_zp"].astype(np.float32).reshape(n, -1)
    rows = (values.reshape(n, k).astype(np.float32) - np.repeat(zero, group, axis=1)) * np.repeat(scale, group, axis=1)
    return Dequantized(rows.T, levels, group)


# A rounding stays within half a step of its grid, one with the scale rounded to 16 bits; more is
# not a rounding of that weight (measured on tiny-qwen3.5: at most 1.0 step in int8 and int4).
MAX_STEPS = 1.5


def steps_off(original: np.ndarray, d: Dequantized) -> float:
    """The largest error of the dequantized weight, in steps of its group's grid."""
    k, n = original.shape
    groups = original.reshape(k // d.group, d.group, n)
    step = (groups.max(axis=1) - groups.min(axis=1)) / d.levels
    error = np.abs(d.values - original).reshape(groups.shape).max(axis=1)
    return float(np.max(error / np.maximum(step, np.finfo(np.float32).tiny)))


def dequantized_onnx(onnx_path: Path, mlir_path: Path, lowered: dict):
    """The piece's ONNX model with each quantized matmul weight replaced by what the bmodel holds;
    the number of weights replaced. Raises if a quantized op cannot be found in the ONNX model, or
    if its weight is not a rounding of the ONNX one (the transform's weights were not the ONNX
    net's: then this net would inherit the defect it is meant to tell apart)."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(onnx_path))
    initializers = {i.name: i for i in model.graph.initializer}
    replaced = 0
    for op, weight in matmul_weights(Path(mlir_path).read_text(encoding="utf-8")).items():
        if not any(key.startswith(op + "_") for key in lowered):
            continue  # kept float32 (the family's quantize table)
        if weight not in initializers:
            raise PipelineError(f"{op}: its weight {weight!r} is not one of {onnx_path.name}'s initializers")
        original = numpy_helper.to_array(initializers[weight])
        found = dequantize(lowered, op, original.shape)
        if found is None:
            continue
        if (off := steps_off(original, found)) > MAX_STEPS:
            raise PipelineError(f"{op}: the bmodel's weight is not a rounding of {onnx_path.name}'s {weight!r} "
                                f"(off by {off:.3g} steps of its {found.levels + 1}-level grid)")
        initializers[weight].CopyFrom(numpy_helper.from_array(found.values.astype(original.dtype), weight))
        replaced += 1
    return model, replaced
