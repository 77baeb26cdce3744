"""A bad `path=` gets a clear error naming the problem; nothing is half-written; the user's
folder is never modified."""
import json
import shutil
import struct

import numpy as np
import pytest
from safetensors.torch import load_file, save_file

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


def _edit_header(edit):
    """Rewrite the first shard's header (a valid JSON header, whatever `edit` makes of it)."""
    def damage(user):
        shard = sorted(user.glob("model-*.safetensors"))[0]
        data = shard.read_bytes()
        (length,) = struct.unpack("<Q", data[:8])
        header = json.dumps(edit(json.loads(data[8:8 + length]))).encode()
        shard.write_bytes(struct.pack("<Q", len(header)) + header + data[8 + length:])
    return damage


def _entry(field, value=None):
    """The embedding's header entry without `field` (value None) or with `field` set to `value`."""
    def edit(header):
        entry = header["model.embed_tokens.weight"]
        if value is None:
            del entry[field]
        else:
            entry[field] = value
        return header
    return _edit_header(edit)


def _shard_is_a_folder(user):
    """No index: every *.safetensors is a shard, and this one cannot be read."""
    (user / "model.safetensors.index.json").unlink()
    (user / "extra.safetensors").mkdir()


def _write(name, text):
    return lambda user: (user / name).write_text(text)


def _edit_config(edit):
    def damage(user):
        config = json.loads((user / "config.json").read_text())
        edit(config)
        (user / "config.json").write_text(json.dumps(config))
    return damage


def _no_tokenizer(user):
    (user / "tokenizer.json").unlink()


def _other_tokenizer(user):
    """A tokenizer whose ids (all shifted by 1000) do not fit the model's 512-token vocabulary."""
    tokenizer = json.loads((user / "tokenizer.json").read_text())
    tokenizer["model"]["vocab"] = {token: i + 1000 for token, i in tokenizer["model"]["vocab"].items()}
    for token in tokenizer["added_tokens"]:
        token["id"] += 1000
    (user / "tokenizer.json").write_text(json.dumps(tokenizer))


SHARD_1 = "{user}/model-00001-of-00002.safetensors"
INDEX = "{user}/model.safetensors.index.json"
EMBED = "tensor model.embed_tokens.weight"


@pytest.mark.parametrize("damage, message", [
    (_no_config, "is not a Hugging Face checkpoint: it has no config.json"),
    (_drop_shard, "is incomplete: model.safetensors.index.json lists 2 shards but 1 are missing"),
    (_truncate_shard, "corrupt safetensors file"),
    (_garbage_header, "corrupt safetensors file"),
    (_no_weights, "has no *.safetensors weights"),
    (_other_layers, "num_hidden_layers is 3 in the checkpoint but 2 in tiny-qwen2.yaml"),
    (_other_hidden, "hidden_size is 128 in the checkpoint but 64 in tiny-qwen2.yaml"),
    (_other_family, "model_type 'llama', but family qwen2 expects 'qwen2'"),
    # a safetensors header that is JSON, but not a header
    pytest.param(_entry("data_offsets"), f"corrupt safetensors file {SHARD_1}: {EMBED} has no data_offsets; "
                 "download it again", id="no-offsets"),
    pytest.param(_entry("shape"), f"corrupt safetensors file {SHARD_1}: {EMBED} has no shape", id="no-shape"),
    pytest.param(_entry("dtype"), f"corrupt safetensors file {SHARD_1}: {EMBED} has no dtype", id="no-dtype"),
    pytest.param(_entry("data_offsets", ["0", "64"]), f"{EMBED} has data_offsets ['0', '64'], not [start, end]",
                 id="offsets-strings"),
    pytest.param(_entry("data_offsets", [0]), f"{EMBED} has data_offsets [0], not [start, end]", id="one-offset"),
    pytest.param(_entry("shape", "512x64"), f"{EMBED} has shape '512x64', not a list of sizes", id="shape-string"),
    pytest.param(_entry("shape", [512, -64]), f"{EMBED} has shape [512, -64], not a list of sizes",
                 id="negative-size"),
    pytest.param(_entry("dtype", "F12"), f"{EMBED} has dtype 'F12', not one of BF16, F16, F32", id="unknown-dtype"),
    pytest.param(_edit_header(lambda h: {**h, "model.embed_tokens.weight": [0, 64]}),
                 f"corrupt safetensors file {SHARD_1}: the header entry of {EMBED} is a JSON list, not an object",
                 id="entry-list"),
    pytest.param(_edit_header(lambda h: list(h)),
                 f"corrupt safetensors file {SHARD_1}: its header is a JSON list, not an object", id="header-list"),
    pytest.param(_shard_is_a_folder, "cannot read {user}/extra.safetensors: Is a directory", id="shard-folder"),
    # the shard index
    pytest.param(_write("model.safetensors.index.json", "{not json"), f"{INDEX} is not valid JSON",
                 id="index-not-json"),
    pytest.param(_write("model.safetensors.index.json", '{"metadata": {}}'),
                 f"{INDEX} has no weight_map (tensor name -> shard file), or an empty one; download it again",
                 id="index-no-weight-map"),
    pytest.param(_write("model.safetensors.index.json", '{"weight_map": ["model-00001-of-00002.safetensors"]}'),
                 f"{INDEX} has no weight_map", id="index-weight-map-list"),
    pytest.param(_write("model.safetensors.index.json", '{"weight_map": {"model.embed_tokens.weight": 1}}'),
                 f"{INDEX}: its weight_map maps model.embed_tokens.weight to 1, not to a shard file name",
                 id="index-shard-number"),
    pytest.param(_write("model.safetensors.index.json", "[]"),
                 f"{INDEX} is not a safetensors index: it holds a JSON list, not an object; download it again",
                 id="index-list"),
    # config.json
    pytest.param(_write("config.json", "[1, 2]"),
                 "{user}/config.json is not a model config: it holds a JSON list, not an object; download it again",
                 id="config-list"),
    pytest.param(_write("config.json", "{not json"), "{user}/config.json is not valid JSON", id="config-not-json"),
    pytest.param(_edit_config(lambda c: c.pop("num_hidden_layers")),
                 "{user}/config.json lacks num_hidden_layers, which a qwen2 config has", id="config-no-layers"),
    pytest.param(_edit_config(lambda c: c.pop("rms_norm_eps")),
                 "{user}/config.json lacks rms_norm_eps, which a qwen2 config has", id="config-no-eps"),
    pytest.param(_edit_config(lambda c: c.pop("model_type")),
                 "{user}/config.json has no model_type; family qwen2 expects 'qwen2'", id="config-no-model-type"),
    pytest.param(_edit_config(lambda c: c.update(num_hidden_layers="2")),
                 "num_hidden_layers is '2' in the checkpoint but 2 in tiny-qwen2.yaml", id="config-layers-string"),
    # the tokenizer
    pytest.param(_no_tokenizer,
                 "checkpoint {user} has no tokenizer: it has neither tokenizer.json nor qwen.tiktoken (Qwen v1)",
                 id="no-tokenizer"),
    pytest.param(_write("tokenizer.json", "{not json"), "the tokenizer {user}/tokenizer.json cannot be loaded",
                 id="tokenizer-not-json"),
    pytest.param(_write("tokenizer.json", "{}"), "the tokenizer {user}/tokenizer.json cannot be loaded",
                 id="tokenizer-empty"),
    pytest.param(_write("tokenizer_config.json", "{not json"), "{user}/tokenizer_config.json is not valid JSON",
                 id="tokenizer-config-not-json"),
    pytest.param(_write("tokenizer_config.json", '"hi"'), "{user}/tokenizer_config.json is not a tokenizer config",
                 id="tokenizer-config-string"),
    pytest.param(_other_tokenizer, "but the model has 512 tokens (vocab_size in {user}/config.json): is it the "
                 "tokenizer of another model?", id="tokenizer-of-another-model"),
])
def test_bad_checkpoint_is_refused_clearly(tmp_path, generated_checkpoint, damage, message):
    user = _user_copy(generated_checkpoint, tmp_path)
    damage(user)
    before = tree_digest(user)
    build_dir = tmp_path / "build"
    result = run_doit(build_dir, [onnx_verify_task(MODEL)], model=MODEL, path=user)
    assert result.code != 0
    assert message.format(user=user) in result.output, result.output
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


@pytest.mark.parametrize("damage, message", [
    (_truncate_shard, "corrupt safetensors file"),
    (_no_tokenizer, "has no tokenizer"),  # the tokenizer is part of the checkpoint's signature
])
def test_corrupted_after_a_good_build_is_noticed(tmp_path, generated_checkpoint, damage, message):
    user = _user_copy(generated_checkpoint, tmp_path)
    build_dir = tmp_path / "build"
    assert run_doit(build_dir, [onnx_verify_task(MODEL)], model=MODEL, path=user).code == 0
    damage(user)
    result = run_doit(build_dir, [onnx_verify_task(MODEL)], model=MODEL, path=user)
    assert result.code != 0 and message in result.output, result.output
    assert result.ran == ["checkpoint:tiny-qwen2"]


def _set_layer_1(fill, names=("mlp.down_proj.weight",), index=None):
    """Layer 1's tensors `names` filled with `fill` (or only their value at flat `index`)."""
    def damage(user):
        shard = sorted(user.glob("model-*.safetensors"))[-1]
        tensors = load_file(shard)
        for name in names:
            tensor = tensors[f"model.layers.1.{name}"]
            if index is None:
                tensor.fill_(fill)
            else:
                tensor.view(-1)[index] = fill
        save_file(tensors, shard, metadata={"format": "pt"})
    return damage


@pytest.mark.parametrize("damage, count", [
    (_set_layer_1(float("nan"), index=5), 1),
    (_set_layer_1(float("inf")), 8192),
    (_set_layer_1(float("-inf"), index=0), 1),
])
def test_non_finite_weights_are_named_at_the_patch_stage(tmp_path, generated_checkpoint, damage, count):
    """Not 17 tasks later as NaN outputs: the fingerprint reads every tensor, and checks it."""
    user = _user_copy(generated_checkpoint, tmp_path)
    damage(user)
    result = run_doit(tmp_path / "build", [onnx_verify_task(MODEL)], model=MODEL, path=user)
    assert result.code != 0
    assert (f"checkpoint {user} has corrupt weights: NaN or inf in tensor model.layers.1.mlp.down_proj.weight (in "
            f"model-00002-of-00002.safetensors): {count} of 8192 values; download model-00002-of-00002.safetensors "
            "again") in result.output, result.output
    assert "Traceback" not in result.output
    assert result.ran == ["checkpoint:tiny-qwen2", "map:tiny-qwen2/weights"]  # nothing exported


def test_non_finite_outputs_fail_verification_saying_so(tmp_path, generated_checkpoint, monkeypatch):
    """NaN or inf in a piece's outputs (here: injected into onnxruntime's block_1) is reported as
    such, with its count and side, never as a cosine or a max abs error."""
    from runtime.onnx_backend import OnnxBackend

    run = OnnxBackend.run

    def with_nan(self, net, feeds):
        outputs = run(self, net, feeds)
        if net == "block_1":
            outputs[0].reshape(-1)[:3] = [np.nan, np.inf, -np.inf]
        return outputs

    monkeypatch.setattr(OnnxBackend, "run", with_nan)
    result = run_doit(tmp_path / "build", [onnx_verify_task(MODEL)], model=MODEL, path=generated_checkpoint)
    assert result.code != 0
    failures = [line.strip() for line in result.output.splitlines() if line.startswith("  ")]
    assert failures == ["block_1.hidden_states: NaN or inf: none in the reference (torch), 3 of 2048 values in the "
                        "candidate (onnxruntime)"], result.output  # block_1's k and v, every other piece: fine
    assert "Traceback" not in result.output
    report = (tmp_path / "build" / MODEL / "seq32" / "verify" / "report.md").read_text()
    assert "| block_1 | hidden_states | - | - | - | **NO**: NaN or inf in 0 reference and 3 candidate values" in report


def test_all_zero_outputs_are_identical(tmp_path, generated_checkpoint):
    """A zeroed projection makes past_v all zeros on both sides: identical (cosine 1), where the
    cosine formula alone gave 0 and failed it as 'cosine 0.000000, max abs 0'."""
    user = _user_copy(generated_checkpoint, tmp_path)
    _set_layer_1(0.0, names=("self_attn.v_proj.weight", "self_attn.v_proj.bias"))(user)
    build_dir = tmp_path / "build"
    result = run_doit(build_dir, [onnx_verify_task(MODEL)], model=MODEL, path=user)
    assert result.code == 0, result.output
    report = json.loads((build_dir / MODEL / "seq32" / "verify" / "report.json").read_text())
    for net in ("block_1", "block_cache_1"):
        assert report["pieces"][net]["past_v"] == {"cosine": 1.0, "max_abs": 0.0, "ref_max": 1.0, "ok": True}


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


def test_non_finite_part_of_a_fused_tensor_is_named_with_its_rows(tmp_path):
    """Qwen v1's c_attn holds q, k and v: the part read (here k, rows 64..128) is named."""
    assert run_doit(tmp_path / "gen", ["checkpoint"], model="tiny-qwen-v1").code == 0
    user = _user_copy(tmp_path / "gen" / "tiny-qwen-v1" / "checkpoint", tmp_path)
    name = "transformer.h.1.attn.c_attn.weight"
    shard = next(p for p in sorted(user.glob("model-*.safetensors")) if name in load_file(p))
    tensors = load_file(shard)
    tensors[name][70, 3] = float("nan")
    save_file(tensors, shard, metadata={"format": "pt"})
    result = run_doit(tmp_path / "build", ["map"], model="tiny-qwen-v1", path=user)
    assert result.code != 0
    assert (f"has corrupt weights: NaN or inf in rows 64..128 of tensor {name} (in {shard.name}): 1 of 4096 "
            "values") in result.output, result.output
