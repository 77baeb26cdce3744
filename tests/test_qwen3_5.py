"""Qwen3.5: the published checkpoint layout, the registry's sizes, and the linear-attention layers'
state carried through windows, single tokens and decode (onnxruntime against transformers)."""
import json

import numpy as np
import pytest

from pipeline.families import get_family
from pipeline.families.base import THRESHOLDS
from pipeline.model.checkpoint import Checkpoint
from pipeline.model.config import known_models, load_model_config
from pipeline.stages.mapping import canonical_config, tensor_map
from runtime.engine import Engine
from runtime.nets import LINEAR_WINDOW
from runtime.onnx_backend import OnnxBackend

MODEL = "tiny-qwen3.5"


@pytest.mark.fast
def test_published_layout_maps_onto_the_text_model(tiny_builds):
    """config under text_config, tensors under model.language_model.; the vision tower is left out."""
    build_dir, _ = tiny_builds
    ckpt = Checkpoint(build_dir / MODEL / "checkpoint")
    assert ckpt.config["model_type"] == "qwen3_5" and "text_config" in ckpt.config
    assert any(name.startswith("model.visual.") for name in ckpt.tensor_index)
    config = canonical_config(ckpt.config, "qwen3_5")
    assert config["model_type"] == "qwen3_5_text" and config["layer_types"][:4] == ["linear_attention"] * 3 + [
        "full_attention"]
    mapping = tensor_map(ckpt, config, "qwen3_5")
    assert mapping["model.layers.0.linear_attn.A_log"]["name"] == "model.language_model.layers.0.linear_attn.A_log"
    assert mapping["model.layers.3.self_attn.q_norm.weight"]["name"] == \
        "model.language_model.layers.3.self_attn.q_norm.weight"
    assert not any("visual" in m["name"] for m in mapping.values())


@pytest.mark.fast
@pytest.mark.parametrize("name", [m for m in known_models() if m.startswith("qwen3.5-")])
def test_registered_sizes_round_trip_through_a_checkpoint_config(name):
    """Each registered size's numbers written as its published config.json would hold them
    (the family's own test config) and read back by the family: the same architecture."""
    model = load_model_config(name)
    family = get_family(model.family)
    text = family.test_config_fields(model.model_copy(update={"source": load_model_config(MODEL).source}))
    source = {"model_type": "qwen3_5", "tie_word_embeddings": model.architecture.tie_word_embeddings,
              "text_config": {**text, "model_type": "qwen3_5_text"}}
    again = family.architecture(canonical_config(source, "qwen3_5"))
    assert {k: again[k] for k in again} == {k: v for k, v in model.architecture.model_dump().items() if k in again}
    assert len(model.architecture.linear_layers) == model.architecture.num_layers * 3 // 4


@pytest.fixture(scope="module")
def saved_alone(tiny_builds, tmp_path_factory):
    """The tiny model as a user's text-only fine-tune is saved: transformers' Qwen3_5ForCausalLM,
    loaded from the published layout and saved again (model_type qwen3_5_text), with its tokenizer."""
    import shutil

    import torch
    from transformers import AutoModelForCausalLM

    build_dir, results = tiny_builds
    assert results[MODEL].code == 0, results[MODEL].output
    published = build_dir / MODEL / "checkpoint"
    folder = tmp_path_factory.mktemp("user") / "My-Qwen3.5-text"
    AutoModelForCausalLM.from_pretrained(published, dtype=torch.bfloat16).save_pretrained(folder)
    for tokenizer_file in published.glob("tokenizer*"):
        shutil.copy(tokenizer_file, folder)
    return folder


CONFIG_BOOKKEEPING = ("architectures", "dtype", "torch_dtype", "transformers_version", "use_cache")


@pytest.mark.fast
def test_a_text_model_saved_alone_builds_as_the_published_layout(tiny_builds, saved_alone, tmp_path):
    """A qwen3_5_text checkpoint given by path= alone is a Qwen3.5: the same canonical config and,
    piece by piece, the same weights as the published layout it was saved from; its ONNX pieces
    pass the check against transformers' model of it."""
    from pipeline.graph.build_config import parse_build_config

    from .conftest import onnx_verify_task, run_doit

    build_dir, _ = tiny_builds
    source = Checkpoint(saved_alone).config
    assert source["model_type"] == "qwen3_5_text" and "text_config" not in source
    assert parse_build_config({"path": str(saved_alone)}).model.family == "qwen3_5"
    published = canonical_config(Checkpoint(build_dir / MODEL / "checkpoint").config, "qwen3_5")
    mine = canonical_config(source, "qwen3_5")
    family = get_family("qwen3_5")
    assert family.architecture(mine) == family.architecture(published)
    # (the published config carries transformers' defaults too: only what the saved one holds is compared)
    assert {k: v for k, v in mine.items() if k not in CONFIG_BOOKKEEPING} == \
        {k: published[k] for k in mine if k not in CONFIG_BOOKKEEPING}
    result = run_doit(tmp_path, [onnx_verify_task("My-Qwen3.5-text")], path=str(saved_alone), seq=32)
    assert result.code == 0, result.output
    fingerprints = {folder: {f.name: json.loads(f.read_text())["sha256"]
                             for f in (folder / "canonical" / "weights").glob("*.json")}
                    for folder in (build_dir / MODEL, tmp_path / "My-Qwen3.5-text")}
    mine, published = fingerprints[tmp_path / "My-Qwen3.5-text"], fingerprints[build_dir / MODEL]
    assert len(mine) == 6 and mine == published  # embedding, 4 layers, head


@pytest.fixture(scope="module")
def reference(tiny_builds):
    build_dir, results = tiny_builds
    assert results[MODEL].code == 0, results[MODEL].output
    seq_dir = build_dir / MODEL / "seq32"
    config = json.loads((seq_dir / "config.json").read_text())
    mapping = json.loads((build_dir / MODEL / "canonical" / "tensor_map.json").read_text())
    model = get_family("qwen3_5").reference_model(config, build_dir / MODEL / "checkpoint", mapping)
    return model, seq_dir / "onnx"


def _last_logits(model, ids):
    import torch

    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0, -1].numpy()


@pytest.mark.fast
@pytest.mark.parametrize("length", [3, LINEAR_WINDOW, LINEAR_WINDOW + 5, 31])
def test_prefill_by_windows_and_single_tokens_matches_transformers(reference, length):
    """A prompt of any length: whole windows, then single tokens, then a decoded token."""
    model, onnx_dir = reference
    ids = [int(x) for x in np.random.default_rng(length).integers(3, 500, length)]
    engine = Engine(OnnxBackend(onnx_dir))
    engine.prefill(ids[:-1] if length == 31 else ids)
    if length == 31:  # the last one as a decode step
        engine.decode(ids[-1])
    np.testing.assert_allclose(engine.logits(), _last_logits(model, ids), atol=2e-4, rtol=1e-4)


@pytest.fixture(scope="module")
def history_build(tiny_builds, tmp_path_factory):
    """tiny-qwen3.5 with history nets (block_kv_i for its attention layer), exported and verified
    (the verify walk checks a next turn: the attention layer from its cache, the linear layers from
    their states)."""
    from .conftest import onnx_verify_task, run_doit

    build_dir = tmp_path_factory.mktemp("qwen35-history")
    result = run_doit(build_dir, [onnx_verify_task(MODEL) + "/hist_c8"], model=MODEL, history=1, chunk=8)
    assert result.code == 0, result.output
    return build_dir / MODEL / "seq32" / "onnx"


@pytest.mark.fast
def test_next_turn_continues_the_states_and_the_cache(reference, history_build):
    """A conversation that extends what the engine holds runs only its new tokens: the linear
    layers continue from their states, the attention layer reads its cache (block_kv)."""
    model, _ = reference
    engine = Engine(OnnxBackend(history_build))
    first = [int(x) for x in np.random.default_rng(3).integers(3, 500, 12)]
    answer = engine.greedy(first, 4)
    conversation = first + answer + [int(x) for x in np.random.default_rng(4).integers(3, 500, 9)]
    engine.prefill(conversation)
    assert engine.reused == len(first) + len(answer) - 1  # the answer's last token was never fed
    np.testing.assert_allclose(engine.logits(), _last_logits(model, conversation), atol=2e-4, rtol=1e-4)


@pytest.mark.fast
def test_a_shorter_prompt_starts_over_the_states_hold_every_token(reference, history_build):
    """A linear layer's state cannot step back: after a longer prompt, a prompt that shares only
    its start is prefilled from the beginning, and answers as transformers does."""
    model, _ = reference
    engine = Engine(OnnxBackend(history_build))
    long = [int(x) for x in np.random.default_rng(7).integers(3, 500, 20)]
    engine.prefill(long)
    engine.decode(11)
    short = long[:9] + [42]
    assert engine.reusable(short) == 0
    engine.prefill(short)
    np.testing.assert_allclose(engine.logits(), _last_logits(model, short), atol=2e-4, rtol=1e-4)


SIM_TOKENS = 16  # what `doit verify` decodes by default


@pytest.fixture(scope="module")
def sim_build_dir(tmp_path_factory):
    """One build folder for every mode: they share the export and the transform."""
    return tmp_path_factory.mktemp("qwen35-sim")


def _variant(mode: str) -> str:
    return f"{mode}{'_g64' if mode == 'int4' else ''}_1dev_bm1684x_dyn"


def _simulator_check(build_dir, mode: str, sim_tokens: int) -> dict:
    """tiny-qwen3.5 built and verified on the simulator; its report. Every piece output within the
    mode's thresholds against fp32, or, below them, matching the same net with the weights the
    bmodel holds within the float type's (the loss then the quantization's, which alone falls below
    the mode's threshold); the combined bmodel decoding on the device walk."""
    from .conftest import run_doit

    result = run_doit(build_dir, ["verify"], model=MODEL, mode=mode, sim_tokens=sim_tokens)
    assert result.code == 0, result.output
    report = json.loads((build_dir / MODEL / "seq32" / "verify" / _variant(mode) / "report.json").read_text())
    min_cosine, _ = get_family("qwen3_5").thresholds[mode]
    float_cosine, _ = THRESHOLDS["bf16"]
    for net, outputs in report["pieces"].items():
        for name, r in outputs.items():
            assert r["ok"], (net, name, r)
            if r["cosine"] < min_cosine:
                q = r["quantization"]
                assert q["ok"] and q["cosine"] >= float_cosine and q["weights_cosine"] < min_cosine, (net, name, r)
    assert report["decode"]["run"] and len(report["decode"]["simulator"]) == sim_tokens
    return report


@pytest.mark.sim
def test_bf16_passes_the_simulator_with_the_states_on_the_device(sim_build_dir):
    """bf16: the same greedy choices as onnxruntime wherever fp32's are not near-ties."""
    report = _simulator_check(sim_build_dir, "bf16", SIM_TOKENS)
    assert report["decode"]["decisive_disagreements"] == [] and report["decode"]["agree"] >= SIM_TOKENS - 1
    assert not report.get("quantization_explained")  # nothing is quantized: nothing to explain


@pytest.mark.sim
@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_quantized_modes_pass_the_simulator_their_loss_the_quantizations(sim_build_dir, mode):
    """int8 and int4: block_0's hidden state is below the mode's cosine against fp32 (a head near zero
    before the gated norm amplifies the projections' rounding: README, Qwen3.5), and within bf16's
    against the same net with the bmodel's own quantized weights."""
    report = _simulator_check(sim_build_dir, mode, SIM_TOKENS)
    assert report["quantization_explained"] >= 1
    assert "quantization" in report["pieces"]["block_0"]["hidden_states"]


@pytest.mark.sim
def test_a_build_error_is_not_taken_for_the_quantizations(sim_build_dir):
    """explain_misses passes an output only if it matches the net with the quantized weights: the
    same net's output with its tokens in the wrong order (as a broken causal mask or cache would
    give) still fails, and its failure names both comparisons."""
    import onnxruntime as ort

    from pipeline.graph.build_config import parse_build_config
    from pipeline.graph.tasks import DeployTasks, ExportTasks, Paths, TransformTasks
    from pipeline.stages.verify import piece_failures
    from pipeline.stages.verify_sim import explain_misses

    _simulator_check(sim_build_dir, "int8", SIM_TOKENS)  # built (a no-op when the test above ran)
    build = parse_build_config({"model": MODEL, "mode": "int8", "build_dir": str(sim_build_dir),
                                "dist_dir": str(sim_build_dir / "dist")})
    paths = Paths(build)
    export = ExportTasks(build, paths)
    deploy = DeployTasks(build, paths, TransformTasks(build, paths, export))
    piece = next(p for p in export.pieces if p.name == "block_0")
    rng = np.random.default_rng(0)
    feeds = {"input_states": rng.normal(size=(1, LINEAR_WINDOW, 64)).astype(np.float32),
             "conv_state": np.zeros((1, 128, 4), np.float32), "recurrent_state": np.zeros((1, 4, 16, 16), np.float32)}
    model, replaced = deploy.dequantized_net(piece)
    assert replaced >= 5  # in_proj_qkv, in_proj_z, out_proj and the MLP's three
    right = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)
    wrong = [right[0][:, ::-1].copy(), *right[1:]]
    for got, explained in ((right, True), (wrong, False)):
        results = {"block_0": {"hidden_states": {"ok": False, "cosine": 0.5, "max_abs": 9.0, "ref_max": 9.0},
                               "next_conv_state": {"ok": True}, "next_recurrent_state": {"ok": True}}}
        explain_misses("int8", results, {"block_0": (piece, feeds, got)}, paths.onnx, deploy.dequantized_net)
        assert results["block_0"]["hidden_states"]["ok"] is explained
    assert "against the weights the bmodel holds: cosine" in piece_failures(results)[0]


@pytest.mark.sim
def test_dequantized_weights_are_within_a_step_of_the_originals(sim_build_dir):
    """The quantized weights read back from TPU-MLIR's lowering (layout, nibble order, zero points,
    group scales): each within one quantization step of the fp32 weight it stands for."""
    import onnx
    from onnx import numpy_helper

    from pipeline.graph.build_config import parse_build_config
    from pipeline.graph.tasks import DeployTasks, ExportTasks, Paths, TransformTasks
    from pipeline.stages.quantized_weights import dequantize, lowered_weights, matmul_weights

    for mode, levels in (("int8", 255), ("int4", 15)):
        _simulator_check(sim_build_dir, mode, SIM_TOKENS)
        build = parse_build_config({"model": MODEL, "mode": mode, "build_dir": str(sim_build_dir),
                                    "dist_dir": str(sim_build_dir / "dist")})
        paths = Paths(build)
        export = ExportTasks(build, paths)
        transform = TransformTasks(build, paths, export)
        deploy = DeployTasks(build, paths, transform)
        piece = next(p for p in export.pieces if p.name == "block_3")  # the attention layer: q/k/v/o and MLP
        mlir = transform.mlir(piece)
        lowered = lowered_weights(piece.name, mlir.parent, deploy.args(piece), paths.deploy,
                                  paths.logs / "test-lowered.log", paths.logs)
        weights = {i.name: numpy_helper.to_array(i) for i in onnx.load(str(export.target(piece))).graph.initializer}
        checked = 0
        for op, name in matmul_weights(mlir.read_text()).items():
            w = weights[name]
            found = dequantize(lowered, op, w.shape)
            if found is None:
                continue
            values = found.values
            groups = w.reshape(-1, 64, w.shape[1]) if w.shape[0] % 64 == 0 else w[None]
            step = (groups.max(1) - groups.min(1)) / levels  # per group and column
            error = np.abs(values - w).reshape(groups.shape).max(1)
            assert (error <= step * 1.01 + 1e-6).all(), (mode, op, float((error / step).max()))
            checked += 1
        assert checked >= 6, (mode, checked)
