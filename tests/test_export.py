"""Export details: ONNX external data for pieces too big for one protobuf, and atomic results."""
import json

import numpy as np
import onnxruntime as ort
import pytest
import torch

from pipeline.model.checkpoint import Checkpoint
from pipeline.model.torch_pieces import build_piece
from pipeline.stages.export import example_inputs, export_piece
from runtime.nets import Dims, model_pieces

pytestmark = pytest.mark.fast


def test_large_piece_keeps_weights_in_one_external_data_file(tiny_builds, tmp_path):
    build_dir, _ = tiny_builds
    model_dir = build_dir / "tiny-qwen3"
    config = json.loads((model_dir / "seq32" / "config.json").read_text())
    mapping = json.loads((model_dir / "canonical" / "tensor_map.json").read_text())
    source = model_dir / "checkpoint"
    lm_head = next(p for p in model_pieces(2) if p.name == "lm_head")
    out = tmp_path / "lm_head.onnx"
    # a threshold of 0 bytes takes the path a 7B model's 2.5 GB embedding takes
    export_piece(lm_head, config, source, mapping, out, tmp_path / "lm_head.log", external_data_bytes=0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lm_head.log", "lm_head.onnx", "lm_head.onnx.data"]
    assert out.stat().st_size < 10_000 < (tmp_path / "lm_head.onnx.data").stat().st_size
    # both get the usual permissions (onnx writes the data 0600; another user could not read it)
    assert (tmp_path / "lm_head.onnx.data").stat().st_mode & 0o777 == out.stat().st_mode & 0o777

    ckpt = Checkpoint(source)
    module = build_piece("lm_head", None, config, lambda n: ckpt.mapped(mapping, n).float())
    x = np.random.default_rng(0).standard_normal((1, config["hidden_size"])).astype(np.float32)
    (got,) = ort.InferenceSession(str(out)).run(None, {"hidden_states": x})
    with torch.no_grad():
        want = module(torch.from_numpy(x)).numpy()
    assert np.abs(got - want).max() < 1e-4


def test_example_inputs_have_interface_dtypes():
    dims = Dims(seq=32, num_layers=2, hidden=64, kv_heads=2, head_dim=16, vocab=512)
    ids, = example_inputs("embedding", dims)
    assert ids.dtype == torch.int32 and tuple(ids.shape) == (1, 32)
    states, positions, mask, hk, hv = example_inputs("block_cache", dims)
    assert tuple(mask.shape) == (1, 1, 1, 33) and tuple(hk.shape) == (1, 32, 2, 16)


def test_fingerprinting_keeps_one_group_of_the_checkpoint_mapped(generated_checkpoint):
    """A fingerprint reads its tensors through mmap; the pages read stay resident while a file is
    open, so each group's files are unmapped once hashed (a whole 28 GB checkpoint stayed resident
    otherwise) and hashing again gives the same digest."""
    from pipeline.stages.mapping import canonical_config, fingerprint, tensor_map

    ckpt = Checkpoint(generated_checkpoint)
    config = canonical_config(ckpt.config, "qwen2")
    mapping = tensor_map(ckpt, config, "qwen2")
    names = [n for n in mapping if n.startswith("model.layers.0.")]
    digest = fingerprint(ckpt, mapping, names)
    assert ckpt._handles == {}
    assert fingerprint(ckpt, mapping, names) == digest
