"""Export stage: one ONNX file per piece, fp32, TorchScript exporter at an opset TPU-MLIR accepts.

Each piece reads only its own tensors. Pieces whose weights exceed what a protobuf can hold
(2 GB) keep their weights in `<piece>.onnx.data` beside the graph (ONNX external data).
"""
import contextlib
import functools
import io
import os
import shutil
import tempfile
import warnings
from pathlib import Path

from runtime.nets import DYNAMIC_KINDS, Dims, Piece, io_spec

from ..families import canonical_family
from ..fsutil import UMASK, require_space
from ..model.checkpoint import Checkpoint
from . import layer_template

OPSET = 15  # TPU-MLIR 1.30 rejects opset 18 (the dynamo exporter's only choice)
EXTERNAL_DATA_BYTES = 1_800_000_000  # below protobuf's 2 GB limit, with room for the graph


def example_inputs(kind: str, dims: Dims):
    import torch

    inputs, _ = io_spec(kind, dims)
    return tuple(torch.zeros(shape, dtype=getattr(torch, dtype)) for _, shape, dtype in inputs)


def export_piece(piece: Piece, config: dict, source: Path, mapping: dict, out: Path, log: Path,
                 external_data_bytes: int = EXTERNAL_DATA_BYTES, template: Path | None = None,
                 is_template: bool = False) -> str:
    """Build the piece's torch module from its own tensors and write `out` atomically: the graph of
    `template` (the first piece of its kind) with this piece's weights when its plan allows, else
    by torch's exporter, which `is_template` then records (layer_template.py). Returns how."""
    import torch

    from ..model.torch_pieces import build_piece

    ckpt, family = Checkpoint(source), canonical_family(config["model_type"])
    module = build_piece(piece.kind, piece.layer, config,
                         lambda name: ckpt.mapped(mapping, name).to(torch.float32))
    dims = Dims.from_config(config, piece.chunk).of(piece)
    inputs, outputs = io_spec(piece.kind, dims)
    out.parent.mkdir(parents=True, exist_ok=True)
    weight_bytes = sum(t.numel() * t.element_size() for t in module.state_dict().values())
    # over the external-data size, the weights are written twice (torch's files, then one .data)
    require_space(out.parent, weight_bytes * (2 if weight_bytes > external_data_bytes else 1), out.name)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    if template:
        try:
            why = layer_template.export_from_template(template, _state(module), tmp / out.name,
                                                      weight_bytes > external_data_bytes)
            if why is None:
                _publish(tmp, out)
                how = f"from {template.name}'s graph, with its own weights"
                log.parent.mkdir(parents=True, exist_ok=True)
                log.write_text(f"{piece.file}: {how}\n", encoding="utf-8")
                return how
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    how = "torch.onnx.export" + (f" ({template.name}'s graph does not serve it: {why})" if template else "")
    captured, caught = io.StringIO(), []
    try:
        with warnings.catch_warnings(record=True) as caught, contextlib.redirect_stdout(captured), \
                contextlib.redirect_stderr(captured), torch.no_grad(), family.export_context(piece.kind):
            warnings.simplefilter("always")
            example = example_inputs(piece.kind, dims)
            torch.onnx.export(module, example, str(tmp / out.name),
                              input_names=[n for n, _, _ in inputs], output_names=outputs,
                              opset_version=OPSET, dynamo=False, do_constant_folding=True)
            fixes = family.onnx_fixes(piece.kind)
            if fixes:  # a graph torch could not infer all shapes of: its outputs' are declared too
                fixes.append(functools.partial(_declare_outputs, shapes=[list(t.shape) for t in module(*example)]))
        state = _state(module) if is_template else None  # (the template's: for its plan, below)
        del module
        if weight_bytes > external_data_bytes:
            _to_single_external_file(tmp / out.name)
        if piece.kind in DYNAMIC_KINDS:
            free_prefill_lengths(tmp / out.name)
        fix_graph(tmp / out.name, fixes)
        if is_template:  # which of the module's tensors each weight of the graph is, for the layers that follow
            layer_template.write_plan(tmp / out.name, state)
            del state
        _publish(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        # The exporter's own messages go to the piece's log, not the terminal.
        log.parent.mkdir(parents=True, exist_ok=True)
        log.write_text(captured.getvalue() + "".join(f"{w.category.__name__}: {w.message}\n" for w in caught),
                       encoding="utf-8")
    return how


def _state(module) -> dict:
    """The module's tensors (parameters and buffers) as numpy arrays, without copies."""
    return {name: t.detach().numpy() for name, t in module.state_dict().items()}


def free_prefill_lengths(path: Path) -> None:
    """The prefill piece's lengths computed from its inputs (runtime/onnx_exact.py, the rule
    onnxruntime's exact prefill uses too): a net compiled dynamic otherwise finds the length by its
    value in the exported targets, and takes any other dim of that value for it (at seq = head
    size, repeat_kv's targets crashed the simulator; a head_dim-16 slice failed at 5 tokens)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    try:
        free_lengths(model)
    except ValueError as e:
        raise ValueError(f"{path.name}: {e}") from None
    onnx.save_model(model, str(path))


def fix_graph(path: Path, fixes: list) -> None:
    """Each of `fixes` edits the graph in place (a family's rewrites for the TPU compiler)."""
    if not fixes:
        return
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    for fix in fixes:
        fix(model)
    onnx.save_model(model, str(path))


def _declare_outputs(model, shapes: list[list[int]]) -> None:
    for output, shape in zip(model.graph.output, shapes, strict=True):
        dims = output.type.tensor_type.shape.dim
        del dims[:]
        for length in shape:
            dims.add().dim_value = length


def _to_single_external_file(path: Path) -> None:
    """Whatever torch wrote (one file per tensor, or inline), keep the weights in one .data file."""
    import onnx

    model = onnx.load(str(path), load_external_data=True)
    for f in path.parent.iterdir():
        f.unlink()
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=path.name + ".data", size_threshold=1024)


def _publish(tmp: Path, out: Path) -> None:
    """Move the data file (and a template's plan) first and the graph last: the graph (the doit
    target) appears only when what it needs is already in place."""
    for suffix in (".data", layer_template.PLAN_SUFFIX):
        made, stale = tmp / (out.name + suffix), out.with_name(out.name + suffix)
        if made.exists():
            os.chmod(made, 0o666 & ~UMASK)  # onnx writes it 0600; an artifact gets the usual permissions
            os.replace(made, stale)
        else:
            stale.unlink(missing_ok=True)
    os.replace(tmp / out.name, out)


def free_lengths(model):
    """A prefill piece (block_i, block_kv_i) made in place to compute every length from its inputs,
    its declared input and output shapes unchanged (the rewrite of exact_rows, then the declared
    lengths put back): TPU-MLIR compiles it dynamic from there."""
    from runtime.onnx_exact import exact_rows

    declared = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim]
                for v in [*model.graph.input, *model.graph.output]}
    exact_rows(model)
    for value in [*model.graph.input, *model.graph.output]:
        for dim, length in zip(value.type.tensor_type.shape.dim, declared[value.name]):
            dim.dim_value = length
    return model
