"""Each family's tiny model through checkpoint, patch, export and verification."""
import json

import onnx
import pytest

from pipeline.model.config import load_model_config
from pipeline.stages.export import OPSET
from runtime.nets import LINEAR_WINDOW, TOP_K_MAX, Dims, io_spec, model_pieces

from .conftest import TINY_MODELS

pytestmark = pytest.mark.fast
MODELS = TINY_MODELS


def pieces_of(model: str):
    arch = load_model_config(model).architecture
    return model_pieces(arch.num_layers, linear_layers=arch.linear_layers)
ONNX_TYPES = {"float32": onnx.TensorProto.FLOAT, "int32": onnx.TensorProto.INT32}


@pytest.mark.parametrize("model", MODELS)
def test_build_passes_verification_with_exact_tokens(tiny_builds, model):
    build_dir, results = tiny_builds
    assert results[model].code == 0, results[model].output
    report = json.loads((build_dir / model / "seq32" / "verify" / "report.json").read_text())
    pieces = [p.name for p in pieces_of(model)]
    assert sorted(report["pieces"]) == sorted(pieces)
    for net, outputs in report["pieces"].items():
        for name, r in outputs.items():
            assert r["ok"] and r["cosine"] > 0.99999 and r["max_abs"] < 1e-3 * r["ref_max"], (net, name, r)
    decode = report["decode"]
    assert decode["run"] and decode["match"]
    assert len(decode["onnx"]) == 16 and decode["onnx"] == decode["reference"]
    # a random model that repeats one token would make the match meaningless
    assert len(set(decode["reference"])) > 3
    assert "PASS" in (build_dir / model / "seq32" / "verify" / "report.md").read_text()


def test_shortest_seq_verifies_with_half_the_window_for_the_prompt(tmp_path):
    """At seq=16 (the least allowed) the prompt keeps 8 tokens and the decode checks 8 more."""
    from .conftest import onnx_verify_task, run_doit

    result = run_doit(tmp_path, [onnx_verify_task("tiny-qwen2", 16)], model="tiny-qwen2", seq=16)
    assert result.code == 0, result.output
    report = json.loads((tmp_path / "tiny-qwen2" / "seq16" / "verify" / "report.json").read_text())
    assert len(report["prompt_ids"]) == 8 and report["decode"]["match"] and len(report["decode"]["onnx"]) == 8


@pytest.mark.parametrize("model", MODELS)
def test_onnx_pieces_follow_the_net_interface(tiny_builds, model):
    build_dir, _ = tiny_builds
    seq_dir = build_dir / model / "seq32"
    config = json.loads((seq_dir / "config.json").read_text())
    dims = Dims.from_config(config)
    arch = load_model_config(model).architecture
    assert (dims.hidden, dims.kv_heads, dims.head_dim, dims.seq) == (arch.hidden_size, arch.num_kv_heads,
                                                                     arch.head_dim, 32)
    for piece in pieces_of(model):
        graph = onnx.load(str(seq_dir / "onnx" / f"{piece.name}.onnx"))
        assert graph.opset_import[0].version == OPSET
        inputs, outputs = io_spec(piece.kind, dims)
        got = [(i.name, tuple(d.dim_value for d in i.type.tensor_type.shape.dim), i.type.tensor_type.elem_type)
               for i in graph.graph.input]
        assert got == [(n, s, ONNX_TYPES[t]) for n, s, t in inputs], piece.name
        assert [o.name for o in graph.graph.output] == outputs
        out_shapes = [tuple(d.dim_value for d in o.type.tensor_type.shape.dim) for o in graph.graph.output]
        kv_new = (1, 1 if piece.kind == "block_cache" else dims.seq, dims.kv_heads, dims.head_dim)
        expected = {"embedding": [(1, dims.seq, dims.hidden)], "embedding_cache": [(1, 1, dims.hidden)],
                    "block": [(1, dims.seq, dims.hidden), kv_new, kv_new],
                    "block_cache": [(1, 1, dims.hidden), kv_new, kv_new], "lm_head": [(1, dims.vocab)],
                    "greedy_head": [(1, 1)], "sample_head": [(1, TOP_K_MAX + 1)] * 2}
        if dims.linear:  # a linear-attention layer returns its states where the others return K/V
            states = [(1, dims.linear.conv_dim, dims.linear.kernel),
                      (1, dims.linear.v_heads, dims.linear.k_dim, dims.linear.v_dim)]
            expected.update(linear_block=[(1, LINEAR_WINDOW, dims.hidden), *states],
                            linear_cache=[(1, 1, dims.hidden), *states])
        assert out_shapes == expected[piece.kind], piece.name


def test_qwen_v1_patch_maps_onto_qwen2_without_touching_the_checkpoint(tiny_builds):
    build_dir, _ = tiny_builds
    config = json.loads((build_dir / "tiny-qwen-v1" / "canonical" / "config.json").read_text())
    source = json.loads((build_dir / "tiny-qwen-v1" / "checkpoint" / "config.json").read_text())
    assert config["model_type"] == "qwen2" and source["model_type"] == "qwen"
    assert config["intermediate_size"] * 2 == source["intermediate_size"]
    assert config["num_key_value_heads"] == source["num_attention_heads"]
    assert config["rope_theta"] == source["rotary_emb_base"]
    mapping = json.loads((build_dir / "tiny-qwen-v1" / "canonical" / "tensor_map.json").read_text())
    h = source["hidden_size"]
    assert mapping["model.layers.1.self_attn.k_proj.bias"] == {"name": "transformer.h.1.attn.c_attn.bias",
                                                              "rows": [h, 2 * h]}
    assert mapping["model.layers.0.mlp.gate_proj.weight"]["name"] == "transformer.h.0.mlp.w2.weight"
    export = json.loads((build_dir / "tiny-qwen-v1" / "seq32" / "config.json").read_text())
    assert (export["seq_length"], export["max_position_embeddings"], export["dtype"]) == (32, 32, "float32")
