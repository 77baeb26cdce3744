"""What reruns, up to verified ONNX (no compiler): nothing when nothing changed; never the export
for mode/devices/chip; everything for a new seq while the other seq stays valid; only a layer's
pieces when that layer changes. tests/test_compile.py checks the compiled stages' rules."""
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from .conftest import onnx_verify_task, run_doit

pytestmark = pytest.mark.fast
MODEL = "tiny-qwen2"
ONNX = [onnx_verify_task(MODEL)]
N_PIECES = 9  # embedding, embedding_cache, 2 x (block, block_cache), lm_head, greedy_head, sample_head


def test_rebuild_rules(tmp_path):
    first = run_doit(tmp_path, ONNX, model=MODEL)
    assert first.code == 0, first.output
    assert len(first.ran_basename("export")) == N_PIECES

    again = run_doit(tmp_path, ONNX, model=MODEL)
    assert again.code == 0 and again.ran == [], again.ran

    for variables in ({"mode": "int4"}, {"mode": "bf16", "devices": 2}, {"devices": 8, "chip": "bm1688"}):
        other = run_doit(tmp_path, ONNX, model=MODEL, **variables)
        assert other.code == 0 and other.ran == [], (variables, other.ran)

    seq64 = run_doit(tmp_path, [onnx_verify_task(MODEL, 64)], model=MODEL, seq=64)
    assert seq64.code == 0, seq64.output
    assert sorted(seq64.ran_basename("export")) == sorted(t.replace("seq32", "seq64") for t in
                                                          first.ran_basename("export"))
    assert seq64.ran_basename("checkpoint") == [] and "map:tiny-qwen2/weights" not in seq64.ran
    assert (tmp_path / MODEL / "seq32" / "onnx" / "block_0.onnx").exists()

    back = run_doit(tmp_path, ONNX, model=MODEL, seq=32)
    assert back.code == 0 and back.ran == [], back.ran


@pytest.mark.parametrize("layer", [0, 1])  # layer 0's pieces are the templates of layer 1's
def test_changed_layer_reexports_only_its_pieces(tmp_path, generated_checkpoint, layer):
    user = tmp_path / "user-checkpoint"
    shutil.copytree(generated_checkpoint, user)
    build_dir = tmp_path / "build"
    assert run_doit(build_dir, ONNX, model=MODEL, path=user).code == 0

    name = f"model.layers.{layer}.mlp.up_proj.weight"
    shard = next(f for f in sorted(user.glob("*.safetensors")) if name in load_file(f))
    tensors = load_file(shard)
    tensors[name] = tensors[name] * 1.5
    save_file(tensors, shard, metadata={"format": "pt"})

    rebuilt = run_doit(build_dir, ONNX, model=MODEL, path=user)
    assert rebuilt.code == 0, rebuilt.output
    assert sorted(rebuilt.ran_basename("export")) == [f"export:{MODEL}/seq32/block_{layer}",
                                                      f"export:{MODEL}/seq32/block_cache_{layer}"]
    assert rebuilt.ran_basename("verify") == [f"verify:{MODEL}/seq32"]


def test_touched_but_identical_checkpoint_reexports_nothing(tmp_path, generated_checkpoint):
    """New file times with the same bytes (a fresh copy, a CI cache restore): re-check only."""
    user = tmp_path / "user-checkpoint"
    shutil.copytree(generated_checkpoint, user)
    build_dir = tmp_path / "build"
    assert run_doit(build_dir, ONNX, model=MODEL, path=user).code == 0
    for f in user.iterdir():
        f.touch()
    again = run_doit(build_dir, ONNX, model=MODEL, path=user)
    assert again.code == 0
    assert again.ran_basename("export") == [] and again.ran_basename("verify") == []
    assert again.ran_basename("checkpoint") == [f"checkpoint:{MODEL}"]


def test_failed_export_leaves_no_artifact(tmp_path, monkeypatch):
    def broken_export(*args, **kwargs):
        raise RuntimeError("exporter crashed")

    assert run_doit(tmp_path, ["map"], model=MODEL).code == 0
    monkeypatch.setattr(torch.onnx, "export", broken_export)
    result = run_doit(tmp_path, ["export"], model=MODEL)
    assert result.code != 0 and "exporter crashed" in result.output
    onnx_dir = tmp_path / MODEL / "seq32" / "onnx"
    names = sorted(p.name for p in onnx_dir.iterdir())
    assert not [n for n in names if n.endswith(".onnx") or n.startswith(".")], names  # no piece, no temp folder
    assert "model.json" in names
    monkeypatch.undo()
    assert run_doit(tmp_path, ["export"], model=MODEL).code == 0
    assert len(list(onnx_dir.glob("*.onnx"))) == N_PIECES
