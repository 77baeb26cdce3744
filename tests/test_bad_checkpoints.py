"""A bad `path=` gets a clear error naming the problem; nothing is half-written; the user's
folder is never modified."""
import json
import shutil

import pytest

from .conftest import onnx_verify_task, run_cli, run_doit, tree_digest

pytestmark = pytest.mark.fast
MODEL = "tiny-qwen2"


def _user_copy(generated_checkpoint, tmp_path):
    user = tmp_path / "user"
    shutil.copytree(generated_checkpoint, user)
    return user


def _drop_shard(user):
    next(iter(sorted(user.glob("model-*.safetensors")))).unlink()


def _truncate_shard(user):
    shard = sorted(user.glob("model-*.safetensors"))[-1]
    shard.write_bytes(shard.read_bytes()[:-100])


def _garbage_header(user):
    shard = sorted(user.glob("model-*.safetensors"))[0]
    shard.write_bytes(b"\xff" * 8 + shard.read_bytes()[8:])


def _no_config(user):
    (user / "config.json").unlink()


def _other_layers(user):
    config = json.loads((user / "config.json").read_text())
    config["num_hidden_layers"] = 3
    (user / "config.json").write_text(json.dumps(config))


def _other_hidden(user):
    config = json.loads((user / "config.json").read_text())
    config["hidden_size"] = 128
    (user / "config.json").write_text(json.dumps(config))


def _other_family(user):
    config = json.loads((user / "config.json").read_text())
    config["model_type"] = "llama"
    (user / "config.json").write_text(json.dumps(config))


def _no_weights(user):
    for f in user.glob("*.safetensors*"):
        f.unlink()


@pytest.mark.parametrize("damage, message", [
    (_no_config, "is not a Hugging Face checkpoint: it has no config.json"),
    (_drop_shard, "is incomplete: model.safetensors.index.json lists 2 shards but 1 are missing"),
    (_truncate_shard, "corrupt safetensors file"),
    (_garbage_header, "corrupt safetensors file"),
    (_no_weights, "has no *.safetensors weights"),
    (_other_layers, "num_hidden_layers is 3 in the checkpoint but 2 in tiny-qwen2.yaml"),
    (_other_hidden, "hidden_size is 128 in the checkpoint but 64 in tiny-qwen2.yaml"),
    (_other_family, "model_type 'llama', but family qwen2 expects 'qwen2'"),
])
def test_bad_checkpoint_is_refused_clearly(tmp_path, generated_checkpoint, damage, message):
    user = _user_copy(generated_checkpoint, tmp_path)
    damage(user)
    before = tree_digest(user)
    build_dir = tmp_path / "build"
    result = run_doit(build_dir, [onnx_verify_task(MODEL)], model=MODEL, path=user)
    assert result.code != 0
    assert message in result.output, result.output
    assert "Traceback" not in result.output
    assert result.ran == ["checkpoint:tiny-qwen2"]  # stopped at the first stage
    assert not (build_dir / MODEL / "source.json").exists()
    leftovers = sorted(p.name for p in (build_dir / MODEL).rglob("*")) if (build_dir / MODEL).exists() else []
    assert leftovers == []  # no source.json, no temp file
    assert tree_digest(user) == before


def test_good_path_build_never_modifies_the_checkpoint(tmp_path, generated_checkpoint):
    user = _user_copy(generated_checkpoint, tmp_path)
    before = tree_digest(user)
    assert run_doit(tmp_path / "build", [onnx_verify_task(MODEL)], model=MODEL, path=user).code == 0
    assert tree_digest(user) == before


def test_corrupted_after_a_good_build_is_noticed(tmp_path, generated_checkpoint):
    user = _user_copy(generated_checkpoint, tmp_path)
    build_dir = tmp_path / "build"
    assert run_doit(build_dir, [onnx_verify_task(MODEL)], model=MODEL, path=user).code == 0
    _truncate_shard(user)
    result = run_doit(build_dir, [onnx_verify_task(MODEL)], model=MODEL, path=user)
    assert result.code != 0 and "corrupt safetensors file" in result.output


def test_offline_hub_says_how_to_pass_a_local_checkpoint(tmp_path):
    result = run_cli(["build", "model=qwen2.5-0.5b", f"build_dir={tmp_path}"],
                     env={"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")})
    assert result.returncode != 0
    out = result.stdout + result.stderr
    assert "cannot download Qwen/Qwen2.5-0.5B-Instruct" in out
    assert "doit build model=qwen2.5-0.5b path=/path/to/Qwen2.5-0.5B-Instruct" in out
    assert not (tmp_path / "qwen2.5-0.5b" / "source.json").exists()


def test_unreachable_hub_says_how_to_pass_a_local_checkpoint(tmp_path):
    """No offline switch: the real network attempt fails (no hub here) with the same advice."""
    result = run_cli(["build", "model=qwen3-0.6b", f"build_dir={tmp_path}"],
                     env={"HF_HOME": str(tmp_path / "hf"), "HF_HUB_ETAG_TIMEOUT": "5",
                          "HF_ENDPOINT": "http://127.0.0.1:9"})
    out = result.stdout + result.stderr
    assert result.returncode != 0
    assert "cannot download Qwen/Qwen3-0.6B" in out and "path=/path/to/Qwen3-0.6B" in out
