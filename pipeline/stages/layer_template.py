"""Every layer of a kind is the same program: one export and one transform serve them all.

The pieces of one kind (block_0 ... block_N-1, each block_cache stage, ...) differ only in their
weights. The first piece of a kind (the template) is exported and transformed as any piece; the
later ones are made from it, in a second or two instead of a full export and transform (20 s each
for a Qwen-7B-wide block):

- export: the template's exporter records which of its module's tensors each float weight of the
  graph is (by name, or by value: torch folds each linear weight's transpose into a new one);
  a later layer gets the template's graph with its own tensors put in by that plan. Integer
  initializers are shapes, the same in every layer.
- transform: model_transform.py's weight file for the template must be exactly its ONNX
  initializers (nothing folded, cast or reordered: the MLIR then cannot depend on the values); a
  later piece with the same graph gets the template's MLIR, renamed, and its own initializers.

Anything that does not match (a weight no single tensor explains, another graph, a weight the
transform changed, the name elsewhere in the MLIR) falls back to the exporter or model_transform.py,
and says why. The ONNX verification then checks every piece against torch with its own weights.
"""
import hashlib
import json
import re
from pathlib import Path

import numpy as np

from runtime.nets import Piece


def program_key(piece: Piece) -> tuple:
    """The pieces with one key are one compiled program at the same shapes: the layers of a kind
    differ only in their weights."""
    return piece.kind, piece.chunk, piece.stage


def same_program(pieces: list[Piece]) -> dict[Piece, Piece]:
    """Each piece whose program an earlier piece has -> that first one (its template)."""
    firsts, followers = {}, {}
    for piece in pieces:
        first = firsts.setdefault(program_key(piece), piece)
        if first is not piece:
            followers[piece] = first
    return followers


RECORD = "template.json"  # beside the template's MLIR
PLAN_SUFFIX = ".plan.json"  # beside the template's ONNX file: <piece>.onnx.plan.json


def _is_weight(t) -> bool:
    """A float initializer (a weight, in the plan); the others are integer shapes."""
    from onnx import TensorProto

    return t.data_type in (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16, TensorProto.DOUBLE)


def weights_plan(model, state: dict[str, np.ndarray]) -> dict | str:
    """Each float initializer of `model` -> [tensor name in `state`, transposed]; or why no plan."""
    from onnx import numpy_helper

    plan = {}
    for t in model.graph.initializer:
        if not _is_weight(t):
            continue  # a shape
        value = numpy_helper.to_array(t)
        mine = state.get(t.name)
        if mine is not None and mine.shape == value.shape and np.array_equal(mine, value):
            plan[t.name] = [t.name, False]
            continue
        found = [[k, False] for k, v in state.items() if v.shape == value.shape and np.array_equal(v, value)]
        found += [[k, True] for k, v in state.items()
                  if v.ndim == 2 and v.shape[::-1] == value.shape and np.array_equal(v.T, value)]
        if len(found) != 1:
            return f"weight {t.name} is {'none' if not found else 'more than one'} of the module's tensors"
        plan[t.name] = found[0]
    return plan


def write_plan(path: Path, state: dict[str, np.ndarray]) -> None:
    """The plan of the exported (and rewritten) graph at `path`, beside it."""
    import onnx

    model = onnx.load(str(path))
    # the graph's digest: the later layers depend on this file, which changes with the graph, not
    # with the template's weights (its own layer's new weights re-export only its own pieces)
    record = {"graph": graph_digest(model), "plan": weights_plan(model, state)}
    Path(str(path) + PLAN_SUFFIX).write_text(json.dumps(record) + "\n", encoding="utf-8")


def export_from_template(template: Path, state: dict[str, np.ndarray], out: Path, external: bool) -> str | None:
    """The template's graph with `state`'s tensors written to `out`; None, or why it could not be."""
    import onnx
    from onnx import numpy_helper
    from onnx.external_data_helper import load_external_data_for_tensor, uses_external_data

    plan_file = Path(str(template) + PLAN_SUFFIX)
    if not plan_file.exists():
        return f"{template.name} has no weights plan"
    plan = json.loads(plan_file.read_text(encoding="utf-8"))["plan"]
    if isinstance(plan, str):
        return plan
    try:
        model = onnx.load(str(template), load_external_data=False)
    except Exception as err:  # a damaged template: the exporter makes this piece itself
        return f"{template.name} could not be read ({type(err).__name__})"
    for t in model.graph.initializer:
        if t.name not in plan:
            if _is_weight(t):
                return f"weight {t.name} of {template.name} is not in its plan"
            if uses_external_data(t):
                load_external_data_for_tensor(t, str(template.parent))
            continue  # a shape: the same in every layer
        key, transposed = plan[t.name]
        if key not in state:
            return f"this piece has no tensor {key}"
        value = np.ascontiguousarray(state[key].T if transposed else state[key])
        tensor = numpy_helper.from_array(value, t.name)
        if list(tensor.dims) != list(t.dims) or tensor.data_type != t.data_type:
            return f"its {key} has another shape or type than {template.name}'s"
        t.CopyFrom(tensor)
    if external:
        onnx.save_model(model, str(out), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=out.name + ".data", size_threshold=1024)
    else:
        onnx.save_model(model, str(out))
    return None


def graph_digest(model) -> str:
    """sha256 of an ONNX model without its weights' values (their names, types and shapes kept)."""
    g, h = model.graph, hashlib.sha256()
    h.update(f"{model.ir_version}|{[(o.domain, o.version) for o in model.opset_import]}".encode())
    for part in (g.node, g.input, g.output, g.value_info):
        for item in part:
            h.update(item.SerializeToString(deterministic=True))
    for t in g.initializer:
        h.update(f"{t.name}|{t.data_type}|{list(t.dims)}".encode())
    return h.hexdigest()


def initializers(model) -> dict[str, np.ndarray]:
    from onnx import numpy_helper

    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def _header_pattern(name: str) -> re.Pattern:
    """The two places model_transform.py writes the model's name: the module and its weight file."""
    return re.compile(rf'module @{re.escape(name)} attributes \{{(.*)module\.weight_file = '
                      rf'"{re.escape(name)}_top_f32_all_weight\.npz"')


def record_template(name: str, onnx_model, mlir: Path, weights: Path) -> None:
    """After the template's own transform: can its MLIR serve the other pieces of its graph?"""
    text = mlir.read_text(encoding="utf-8")
    stored = np.load(weights)
    given = initializers(onnx_model)
    why = None
    if not _header_pattern(name).search(text) or text.count(name) != 2:
        why = f"the MLIR names {name} elsewhere than its module and weight file"
    else:
        for key in stored.files:
            value = stored[key]
            if key not in given or given[key].dtype != value.dtype or not np.array_equal(given[key], value):
                why = f"the transform changed or made weight {key}"
                break
    record = {"name": name, "graph": graph_digest(onnx_model), "weights": stored.files, "unusable": why}
    (mlir.parent / RECORD).write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")


def usable(template_dir: Path, onnx_model) -> str | None:
    """None if the template serves this graph, else why not."""
    path = template_dir / RECORD
    if not path.exists():
        return f"the template {template_dir.name} has no {RECORD}"
    record = json.loads(path.read_text(encoding="utf-8"))
    if record["unusable"]:
        return record["unusable"]
    if record["graph"] != graph_digest(onnx_model):
        return f"its graph differs from {record['name']}'s"
    return None


def transform_from_template(template_dir: Path, name: str, onnx_model, out_dir: Path) -> None:
    """`name`'s MLIR and weight file into out_dir: the template's MLIR renamed, its own weights."""
    record = json.loads((template_dir / RECORD).read_text(encoding="utf-8"))
    old = record["name"]
    text = (template_dir / f"{old}.mlir").read_text(encoding="utf-8")
    text = _header_pattern(old).sub(f'module @{name} attributes {{\\1module.weight_file = '
                                    f'"{name}_top_f32_all_weight.npz"', text, count=1)
    (out_dir / f"{name}.mlir").write_text(text, encoding="utf-8")
    given = initializers(onnx_model)
    np.savez(out_dir / f"{name}_top_f32_all_weight.npz", **{key: given[key] for key in record["weights"]})
