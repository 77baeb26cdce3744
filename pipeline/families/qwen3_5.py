"""Qwen3.5 (dense): transformers' own Qwen3_5 text layers. Three of every four layers are Gated
DeltaNet linear attention (a convolution state and a recurrent state instead of a K/V cache), the
fourth gated full attention with partial RoPE. Published checkpoints are the multimodal model: the
text config under `text_config`, its tensors under `model.language_model.` (patches/qwen3_5.yaml);
the vision tower is not built (text only).

The linear layers' prefill runs transformers' chunked delta rule, exported with three things the
TPU compiler needs (measured in notes/qwen3_5/qwen35_export_spike.md):
  - transformers' export branch of the rule (forward substitution: linalg.solve_triangular has no
    ONNX op at opset 15), at a chunk of LINEAR_WINDOW tokens (one chunk per net; 7.5x faster to
    transform than transformers' 64, the same numbers);
  - two graph rewrites for TPU-MLIR 1.30.2 defects: its Trilu ignores k (tril(-1) became tril(0)),
    and a -inf constant before Exp gives NaN on the BF16 bmodel;
  - model_transform.py's ONNX simplification, which the other pieces skip: without it the
    transform aborts on the Pad's computed pads, or (pads fixed) the bmodel is wrong (cosine 0.22).
Deployed, the delta rule's own ops (everything in linear_attn but its projections, which hold the
weights the mode quantizes) stay float32, and so do the states between runs (pipeline/stages/compile.py):
in bf16 on the TPU a window's recurrent state came out at cosine 0.9989 against onnxruntime, where
torch's bf16 gives 0.99998; in float32, 0.99998.
"""
import contextlib
import functools

from runtime.nets import LINEAR_KINDS, LINEAR_WINDOW

from .base import Family, FamilyClasses

NEG_INF_STANDIN = -1e4  # exp() of it is 0 in float32 and bf16, as exp(-inf)
# a vision tower for the generated checkpoint, as small as transformers allows: the published
# layout carries one, and the build must ignore it
TINY_VISION = dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=4, temporal_patch_size=2,
                   spatial_merge_size=2, num_position_embeddings=16)


class Qwen3_5(Family):
    def canonical_classes(self) -> FamilyClasses:
        return self.classes("Text")  # Qwen3_5TextConfig, Qwen3_5TextRotaryEmbedding; the layers are shared

    def architecture(self, canonical: dict) -> dict:
        interval = canonical.get("full_attention_interval") or 4
        types = canonical.get("layer_types") or []
        expected = ["full_attention" if (i + 1) % interval == 0 else "linear_attention"
                    for i in range(canonical["num_hidden_layers"])]
        if types and types != expected:
            raise ValueError(f"layer_types {types} are not every {interval}th layer full attention, "
                             "the only pattern supported")
        return {**super().architecture(canonical), "linear_attention": {
            "num_key_heads": canonical["linear_num_key_heads"], "num_value_heads": canonical["linear_num_value_heads"],
            "key_head_dim": canonical["linear_key_head_dim"], "value_head_dim": canonical["linear_value_head_dim"],
            "conv_kernel": canonical["linear_conv_kernel_dim"], "full_attention_interval": interval}}

    def test_config_fields(self, model) -> dict:
        a, lin = model.architecture, model.architecture.linear_attention
        rotary_half = int(a.head_dim * a.partial_rotary_factor) // 2
        sections = [rotary_half - 2 * (rotary_half // 3), rotary_half // 3, rotary_half // 3]  # T, H, W as [11, 11, 10]
        fields = super().test_config_fields(model)
        fields["rope_parameters"] = {"rope_type": "default", "rope_theta": a.rope_theta, "mrope_interleaved": True,
                                     "partial_rotary_factor": a.partial_rotary_factor, "mrope_section": sections}
        return {**fields, "linear_num_key_heads": lin.num_key_heads, "linear_num_value_heads": lin.num_value_heads,
                "linear_key_head_dim": lin.key_head_dim, "linear_value_head_dim": lin.value_head_dim,
                "linear_conv_kernel_dim": lin.conv_kernel, "full_attention_interval": lin.full_attention_interval,
                "layer_types": lin.layer_types(a.num_layers)}

    def test_checkpoint(self, model) -> tuple[dict, dict]:
        """The published layout: the multimodal model's config.json and tensors, a tiny vision tower included."""
        import torch
        from transformers.models.qwen3_5 import configuration_qwen3_5, modeling_qwen3_5

        a = model.architecture
        config = configuration_qwen3_5.Qwen3_5Config(
            text_config=self.test_config_fields(model), tie_word_embeddings=a.tie_word_embeddings,
            vision_config={**TINY_VISION, "out_hidden_size": a.hidden_size})
        with torch.device("meta"):
            shapes = {k: tuple(v.shape) for k, v in
                      modeling_qwen3_5.Qwen3_5ForConditionalGeneration(config).state_dict().items()}
        if a.tie_word_embeddings:
            shapes.pop("lm_head.weight", None)
        config_dict = config.to_dict()
        config_dict["architectures"] = ["Qwen3_5ForConditionalGeneration"]
        return config_dict, shapes

    def export_context(self, kind: str):
        return _export_branch() if kind == "linear_block" else contextlib.nullcontext()

    def onnx_fixes(self, kind: str) -> list:
        return [_trilu_as_mask, _finite_neg_inf] if kind == "linear_block" else []

    def onnx_sim(self, kind: str) -> bool:
        return kind == "linear_block"

    def float32_ops(self, kind: str):
        return _delta_rule_op if kind in LINEAR_KINDS else None


def _delta_rule_op(name: str) -> bool:
    """An op of the linear attention that is not one of its weight-holding projections, or one that
    gives a state output (its op is named after the output). The exporter names ops after their
    module's path in the piece: torch_pieces.LinearBlockNet's `layer.linear_attn`."""
    return name in ("next_conv_state", "next_recurrent_state") or (
        name.startswith("/layer/linear_attn/") and not any(p in name for p in ("/in_proj_", "/out_proj")))


@contextlib.contextmanager
def _export_branch():
    """transformers' chunked delta rule as its export branch runs it, one chunk per window."""
    from transformers.models.qwen3_5 import modeling_qwen3_5 as modeling

    saved = modeling.is_torchdynamo_exporting, modeling.torch_chunk_gated_delta_rule
    modeling.is_torchdynamo_exporting = lambda: True
    modeling.torch_chunk_gated_delta_rule = functools.partial(saved[1], chunk_size=LINEAR_WINDOW)
    try:
        yield
    finally:
        modeling.is_torchdynamo_exporting, modeling.torch_chunk_gated_delta_rule = saved


def _constants(model) -> dict:
    from onnx import numpy_helper

    values = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    values.update({n.output[0]: numpy_helper.to_array(n.attribute[0].t) for n in model.graph.node
                   if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value"})
    return values


def _trilu_as_mask(model) -> None:
    """Trilu(x, k) -> x * a constant 0/1 triangle: TPU-MLIR 1.30.2 reads no k (tril(-1) is tril(0))."""
    import numpy as np
    import onnx
    from onnx import helper, numpy_helper

    shapes = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim]
              for v in onnx.shape_inference.infer_shapes(model).graph.value_info}
    shapes.update({v.name: [d.dim_value for d in v.type.tensor_type.shape.dim] for v in model.graph.input})
    constants, nodes = _constants(model), []
    for node in model.graph.node:
        if node.op_type != "Trilu":
            nodes.append(node)
            continue
        upper = next((a.i for a in node.attribute if a.name == "upper"), 1)
        k = int(constants[node.input[1]]) if len(node.input) > 1 and node.input[1] else 0
        rows, cols = shapes[node.input[0]][-2:]
        if not rows or not cols:
            raise ValueError(f"{node.name}: Trilu on a tensor of unknown shape")
        mask = (np.triu if upper else np.tril)(np.ones((rows, cols), np.float32), k)
        model.graph.initializer.append(numpy_helper.from_array(mask, f"{node.name}_mask"))
        nodes.append(helper.make_node("Mul", [node.input[0], f"{node.name}_mask"], [node.output[0]],
                                      name=f"{node.name}_as_mul"))
    del model.graph.node[:]
    model.graph.node.extend(nodes)


def _finite_neg_inf(model) -> None:
    """-inf constants -> NEG_INF_STANDIN: on the BF16 bmodel exp(-inf) gave NaN."""
    import numpy as np
    from onnx import numpy_helper

    def finite(tensor):
        a = numpy_helper.to_array(tensor)
        if a.dtype.kind == "f" and np.isneginf(a).any():
            tensor.CopyFrom(numpy_helper.from_array(np.where(np.isneginf(a), NEG_INF_STANDIN, a).astype(a.dtype),
                                                    tensor.name))

    for node in model.graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            finite(node.attribute[0].t)
    for tensor in model.graph.initializer:
        finite(tensor)


QWEN3_5 = Qwen3_5(name="qwen3_5", model_type="qwen3_5", canonical="qwen3_5", prefix="Qwen3_5",
                  test_model="tiny-qwen3.5", own_head_dim=True, canonical_type="qwen3_5_text")
