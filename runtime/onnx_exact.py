"""A prefill piece whose lengths follow its inputs: one rule for the export and for onnxruntime.

torch's static export folds every shape into the graph: repeat_kv's Expand and Reshape targets
hold the prompt's length as a number. The export frees them (free_lengths in
pipeline/stages/export.py) and keeps the declared shapes static: the TPU compiler gets a static piece, and a dynamic bmodel compiled from it finds
the length by the inputs, not by value (a value equal to the head size was taken for both). On
onnxruntime, OnnxBackend loads block_i and block_kv_i through exact_rows, which also makes the
declared lengths symbolic, so a 16-token prompt runs at 16 rows on a seq-128 export."""
import math

import numpy as np


def load_graph(path: str):
    """The graph and its small constants; the weights stay in their file until the session reads them."""
    import onnx

    return onnx.load(path, load_external_data=False)


def exact_rows(model):
    """A prefill piece (block_i, block_kv_i), made in place to run at the rows it is given: the
    prompt's tokens L, and block_kv's history H. What holds a length is freed:
      - an Expand target (repeat_kv's [1,KVH,n_rep,S,D], S = the keys) keeps only the dims it
        broadcasts: a 1 takes the input's dim, whatever its length;
      - dim 1 of each input and output (the tokens; history_k/v's slots) and the mask's rows and
        keys become symbolic;
      - a Reshape target gets its -1 at the dim that takes its input's varying one (the export
        wrote -1 at dim 1 of [1,L,...] only; repeat_kv's [1,H,S,D] has the keys at dim 2);
      - a Slice along dims that do not vary gets its bounds as constants (torch.chunk's are
        computed from the shape: Qwen3.5 splits its query from its gate so).
    Raises ValueError where ONNX's shape inference sees an output keep the exported length (a
    length held by another constant; what it cannot see, onnxruntime refuses at run time)."""
    graph, shapes = model.graph, _shapes(model)
    for node in graph.node:
        if node.op_type == "Expand":
            source, target = shapes[node.input[0]], _constant(model, node.input[1])
            source = [1] * (len(target) - len(source)) + source
            node.input[1] = _initializer(graph, node.output[0] + "_free_shape",
                                         [b if a == 1 else 1 for a, b in zip(source, target)])
    exported = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim] for v in graph.input}
    del graph.value_info[:]  # the export's lengths, if any were recorded
    for value in [*graph.input, *graph.output]:
        dims = value.type.tensor_type.shape.dim
        for axis in (1, 2, 3) if value.name == "attention_mask" else (1,):
            dims[axis].dim_param = f"{value.name}_{axis}"
    # a freed Reshape's output varies now: a Reshape or Slice after it may need freeing too
    while _fix_slices(model, _shapes(model, exported)) or _free_reshapes(model, _shapes(model, exported)):
        pass
    shapes = _shapes(model)
    pinned = [o.name for o in graph.output if shapes[o.name][1] is not None]
    if pinned:
        raise ValueError(f"{pinned} keep the exported length: a constant other than a Reshape or "
                         "Expand target holds it")
    _drop_unused(graph)
    return model


def _drop_unused(graph) -> None:
    """The replaced targets, and the nodes that computed them (onnxruntime warns of each left)."""
    used = {o.name for o in graph.output}
    for i in reversed(range(len(graph.node))):  # the nodes are in topological order
        if used.isdisjoint(graph.node[i].output):
            del graph.node[i]
        else:
            used.update(graph.node[i].input)
    for i in reversed([i for i, t in enumerate(graph.initializer) if t.name not in used]):
        del graph.initializer[i]


def _free_reshapes(model, static: dict) -> bool:
    """Each Reshape whose input varies gets its -1 where that dim goes; True if one changed."""
    graph, shapes, changed = model.graph, _shapes(model), False
    for node in graph.node:
        varying = [k for k, d in enumerate(shapes[node.input[0]]) if d is None] if node.op_type == "Reshape" else []
        if len(varying) > 1:
            raise ValueError(f"reshape {node.name}: its input varies in more than one dim")
        if varying:
            target = list(static[node.output[0]])
            target[free_dim(static[node.input[0]], varying[0], target)] = -1
            if _constant(model, node.input[1]) != target:
                node.input[1], changed = _initializer(graph, node.output[0] + "_free_shape", target), True
    return changed


def _fix_slices(model, static: dict) -> bool:
    """Each Slice whose bounds are computed (from shapes) along dims that do not vary gets them
    as constants, their values at the exported shapes; True if one changed."""
    graph, shapes, initializers, changed = model.graph, None, {t.name for t in model.graph.initializer}, False
    for node in graph.node:
        params = node.input[1:]
        if node.op_type != "Slice" or all(not p or p in initializers for p in params):
            continue
        shapes = shapes or _shapes(model)
        source = shapes.get(node.input[0])
        if not source:
            continue
        axes = _constant(model, params[2], static) if len(params) > 2 and params[2] else range(len(source))
        if any(source[a] is None for a in axes):
            continue  # along a varying dim the bounds may follow the length: left as they are
        for k, param in enumerate(params):
            if param and param not in initializers:
                node.input[k + 1] = _initializer(graph, f"{node.name}_fixed_{k}", _constant(model, param, static))
                changed = True
    return changed


def free_dim(source: list[int], k: int, target: list[int]) -> int:
    """The dim of a Reshape's target that takes dim k of its source, in row-major order: the dims
    before it hold some of the source's dims before k, those after it some of those after k. Only
    one can (with a length of 2 or more); a length at any other dim of the target would have had to
    be split."""
    before, after = math.prod(source[:k]), math.prod(source[k + 1:])
    for j, dim in enumerate(target):
        head, tail = math.prod(target[:j]), math.prod(target[j + 1:])
        if before % head == 0 and after % tail == 0 and dim == before // head * source[k] * (after // tail):
            return j
    raise ValueError(f"a reshape of {source} to {target} splits the varying dim {k}")


def _shapes(model, inputs: dict | None = None) -> dict[str, list[int | None]]:
    """Every tensor's dims by ONNX's shape inference (None: symbolic or unknown), inferred on a copy
    without the weights (only their shapes matter) and without the outputs' declared shapes; the
    inputs at their declared shapes, or at `inputs` (name -> dims)."""
    from onnx import helper, shape_inference

    graph = model.graph
    weights = {t.name for t in graph.initializer if math.prod(t.dims) > 64}  # not shapes nor indices
    given = [helper.make_tensor_value_info(v.name, v.type.tensor_type.elem_type, inputs[v.name]) if inputs else v
             for v in graph.input]
    skeleton = helper.make_model(helper.make_graph(
        graph.node, graph.name,
        [*given, *(helper.make_tensor_value_info(t.name, t.data_type, t.dims)
                         for t in graph.initializer if t.name in weights)],
        [helper.make_tensor_value_info(o.name, o.type.tensor_type.elem_type, None) for o in graph.output],
        [t for t in graph.initializer if t.name not in weights]), opset_imports=model.opset_import)
    skeleton.ir_version = model.ir_version
    inferred = shape_inference.infer_shapes(skeleton).graph
    return {v.name: [d.dim_value if d.HasField("dim_value") else None for d in v.type.tensor_type.shape.dim]
            for v in [*inferred.input, *inferred.value_info, *inferred.output]}


def _constant(model, name: str, static: dict | None = None) -> list:
    """The value of a tensor computed from constants only (the export leaves an Expand's target as
    Where(Equal(c, -1), 1, c)), by onnx's reference evaluator on the nodes that lead to it. With
    `static` (every tensor's exported shape), a Shape is a constant too: its value at export."""
    from onnx import helper, numpy_helper
    from onnx.reference import ReferenceEvaluator

    graph = model.graph
    initializers = {t.name: t for t in graph.initializer}
    if name in initializers:
        return numpy_helper.to_array(initializers[name]).tolist()
    producers = {out: i for i, node in enumerate(graph.node) for out in node.output}
    needed, todo, shapes = set(), [name], {}
    while todo:
        tensor = todo.pop()
        if tensor and tensor not in initializers and tensor not in shapes:
            if tensor not in producers:
                raise ValueError(f"{name} is computed from the input {tensor}, not from constants")
            node = graph.node[producers[tensor]]
            exported = static.get(node.input[0]) if static is not None and node.op_type == "Shape" else None
            if exported and None not in exported and not node.attribute:
                shapes[tensor] = numpy_helper.from_array(np.array(exported, np.int64), tensor)
                continue
            needed.add(producers[tensor])
            todo += node.input
    nodes = [graph.node[i] for i in sorted(needed)]
    used = {tensor for node in nodes for tensor in node.input}
    sub = helper.make_graph(nodes, "constant", [], [helper.make_empty_tensor_value_info(name)],
                            [t for t in graph.initializer if t.name in used] + list(shapes.values()))
    return ReferenceEvaluator(helper.make_model(sub, opset_imports=model.opset_import)).run(None, {})[0].tolist()


def _initializer(graph, name: str, values: list[int]) -> str:
    from onnx import numpy_helper

    for i in reversed([i for i, t in enumerate(graph.initializer) if t.name == name]):
        del graph.initializer[i]
    graph.initializer.append(numpy_helper.from_array(np.array(values, np.int64), name))
    return name
