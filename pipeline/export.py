"""Export stage: one ONNX file per piece, fp32, TorchScript exporter at an opset TPU-MLIR accepts.

Each piece reads only its own tensors. Pieces whose weights exceed what a protobuf can hold
(2 GB) keep their weights in `<piece>.onnx.data` beside the graph (ONNX external data).
"""
import contextlib
import io
import os
import shutil
import tempfile
import warnings
from pathlib import Path

from .checkpoint import Checkpoint
from .fsutil import UMASK, require_space
from .patch import load_tensor
from .pieces import DYNAMIC_KINDS, Dims, Piece, io_spec

OPSET = 15  # TPU-MLIR 1.30 rejects opset 18 (the dynamo exporter's only choice)
EXTERNAL_DATA_BYTES = 1_800_000_000  # below protobuf's 2 GB limit, with room for the graph


def example_inputs(kind: str, dims: Dims):
    import torch

    inputs, _ = io_spec(kind, dims)
    return tuple(torch.zeros(shape, dtype=getattr(torch, dtype)) for _, shape, dtype in inputs)


def export_piece(piece: Piece, config: dict, source: Path, mapping: dict, out: Path, log: Path,
                 external_data_bytes: int = EXTERNAL_DATA_BYTES) -> None:
    """Build the piece's torch module from its own tensors and write `out` atomically."""
    import torch

    from .torch_pieces import build_piece

    ckpt = Checkpoint(source)
    module = build_piece(piece.kind, piece.layer, config,
                         lambda name: load_tensor(ckpt, mapping, name).to(torch.float32))
    dims = Dims.from_config(config, piece.chunk).of(piece)
    inputs, outputs = io_spec(piece.kind, dims)
    out.parent.mkdir(parents=True, exist_ok=True)
    weight_bytes = sum(t.numel() * t.element_size() for t in module.state_dict().values())
    # over the external-data size, the weights are written twice (torch's files, then one .data)
    require_space(out.parent, weight_bytes * (2 if weight_bytes > external_data_bytes else 1), out.name)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    captured, caught = io.StringIO(), []
    try:
        with warnings.catch_warnings(record=True) as caught, contextlib.redirect_stdout(captured), \
                contextlib.redirect_stderr(captured), torch.no_grad():
            warnings.simplefilter("always")
            torch.onnx.export(module, example_inputs(piece.kind, dims), str(tmp / out.name),
                              input_names=[n for n, _, _ in inputs], output_names=outputs,
                              opset_version=OPSET, dynamo=False, do_constant_folding=True)
        del module
        if weight_bytes > external_data_bytes:
            _to_single_external_file(tmp / out.name)
        if piece.kind in DYNAMIC_KINDS:
            explicit_reshapes(tmp / out.name, inputs[0][1][1])  # input_states [1, L, H]
        _publish(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        # The exporter's own messages go to the piece's log, not the terminal.
        log.parent.mkdir(parents=True, exist_ok=True)
        log.write_text(captured.getvalue() + "".join(f"{w.category.__name__}: {w.message}\n" for w in caught),
                       encoding="utf-8")


def explicit_reshapes(path: Path, length: int) -> None:
    """Every Reshape's target written as llm_convert writes its own: -1 at the length (dim 1 of
    [1, L, ...]), every other dim in full, from ONNX's shape inference. A net compiled dynamic
    infers each reshape's output at run time from its target: a -1 elsewhere takes up the change in
    length (a [1,L,512] projection reshaped to [1,SEQ,-1,128] gave [1,SEQ,L/SEQ*4,128]), and a
    length written out in full is found by its value, so another dim of that value varies with it
    (head_dim 16 in a 16-token chunk: a slice of it then failed at 5 tokens)."""
    import numpy as np
    import onnx
    from onnx import numpy_helper, shape_inference

    model = onnx.load(str(path), load_external_data=False)
    inferred = shape_inference.infer_shapes(model)
    shapes = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim]
              for v in [*inferred.graph.value_info, *inferred.graph.output]}
    constants = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    constants.update({n.output[0]: numpy_helper.to_array(n.attribute[0].t) for n in model.graph.node
                      if n.op_type == "Constant" and n.attribute[0].name == "value"})
    for node in model.graph.node:
        if node.op_type != "Reshape":
            continue
        target, out = constants.get(node.input[1]), shapes.get(node.output[0])
        if target is None or not out or 0 in out:
            raise ValueError(f"{path.name}: reshape {node.name} has no constant target or no inferred shape")
        if out[:2] == [1, length]:
            out = [1, -1, *out[2:]]
        if list(target) != out:
            name = f"{node.output[0]}_shape"
            model.graph.initializer.append(numpy_helper.from_array(np.array(out, np.int64), name))
            node.input[1] = name
    used = {name for node in model.graph.node for name in node.input} | {o.name for o in model.graph.output}
    for unused in [t for t in model.graph.initializer if t.name not in used]:  # the replaced targets
        model.graph.initializer.remove(unused)
    for unused in [n for n in model.graph.node if n.op_type == "Constant" and n.output[0] not in used]:
        model.graph.node.remove(unused)
    onnx.save_model(model, str(path))


def _to_single_external_file(path: Path) -> None:
    """Whatever torch wrote (one file per tensor, or inline), keep the weights in one .data file."""
    import onnx

    model = onnx.load(str(path), load_external_data=True)
    for f in path.parent.iterdir():
        f.unlink()
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=path.name + ".data", size_threshold=1024)


def _publish(tmp: Path, out: Path) -> None:
    """Move the data file first and the graph last: the graph (the doit target) appears only
    when its weights are already in place."""
    data = tmp / (out.name + ".data")
    stale = out.with_name(out.name + ".data")
    if data.exists():
        os.chmod(data, 0o666 & ~UMASK)  # onnx writes it 0600; an artifact gets the usual permissions
        os.replace(data, stale)
    else:
        stale.unlink(missing_ok=True)
    os.replace(tmp / out.name, out)
