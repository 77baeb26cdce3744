"""Any checkpoint by its folder: `doit build path=DIR` with no `model=` takes the family and every
number from DIR/config.json and names the build after the folder (or `name=`)."""
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.errors import PipelineError
from pipeline.graph.build_config import parse_build_config
from pipeline.model.config import load_model_config
from pipeline.model.random_checkpoint import generate_checkpoint

from .conftest import ROOT, run_doit

# a Qwen2 no model YAML has: 3 layers, hidden 96, 6 heads over 2 K/V heads, MLP 160
DIMENSIONS = {"num_layers": 3, "hidden_size": 96, "num_heads": 6, "num_kv_heads": 2, "head_dim": 16,
              "intermediate_size": 160}


@pytest.fixture(scope="module")
def finetune(tmp_path_factory) -> Path:
    """A generated Qwen2 checkpoint of its own dimensions, in a folder named as a user's fine-tune."""
    base = load_model_config("tiny-qwen2")
    model = base.model_copy(update={"architecture": base.architecture.model_copy(update=DIMENSIONS)})
    folder = tmp_path_factory.mktemp("user") / "My-Qwen2-finetune"
    generate_checkpoint(model, folder)
    return folder


@pytest.mark.fast
def test_family_and_numbers_come_from_the_folders_config(finetune):
    build = parse_build_config({"path": str(finetune)})
    arch = build.model.architecture
    assert (build.model.name, build.model.family, build.model.local) == ("My-Qwen2-finetune", "qwen2", True)
    assert {k: getattr(arch, k) for k in DIMENSIONS} == DIMENSIONS
    assert (arch.vocab_size, arch.max_position_embeddings, build.seq) == (512, 256, 256)  # seq: min(512, context)
    assert build.dist_name == "My-Qwen2-finetune_int8_seq256_1dev_dyn"
    named = parse_build_config({"path": str(finetune), "name": "mine", "seq": "64", "mode": "int4"})
    assert (named.model.name, named.seq, named.dist_name) == ("mine", 64, "mine_int4_seq64_1dev_dyn")


@pytest.mark.fast
@pytest.mark.parametrize("config, message", [
    ({"model_type": "mistral"},
     "model_type 'mistral' is not supported; supported: qwen, qwen2, qwen3, qwen3_5, qwen3_5_text, llama"),
    ({"hidden_size": 8}, "has no model_type"),
    ({"model_type": "qwen2", "hidden_size": 8}, "lacks num_hidden_layers"),
])
def test_a_config_of_another_architecture_is_refused_with_the_supported_ones(tmp_path, config, message):
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(PipelineError) as err:
        parse_build_config({"path": str(tmp_path)})
    assert message in str(err.value) and str(tmp_path / "config.json") in str(err.value)


@pytest.mark.fast
@pytest.mark.parametrize("variables, message", [
    ({"name": "tiny-qwen2"}, "name='tiny-qwen2' is a registered model: build that model from this folder with "
                             "model=tiny-qwen2 path="),
    ({"name": "a b"}, "name='a b' cannot name a build"),
    ({"name": "x", "path": None}, "name= names a checkpoint given by its folder: use it with path=DIR"),
    ({"name": "x", "model": "tiny-qwen2"}, "name= names a checkpoint given by path= alone"),
    ({"layers": "2"}, "layers= only applies to generated test models"),
])
def test_bad_names_are_refused(finetune, variables, message):
    with pytest.raises(PipelineError) as err:
        parse_build_config({"path": str(finetune), **variables})
    assert message in str(err.value)


@pytest.mark.sim
def test_a_checkpoint_of_new_dimensions_builds_verifies_and_chats_by_its_folder_alone(finetune, tmp_path):
    result = run_doit(tmp_path, ["verify"], path=str(finetune), seq=32)
    assert result.code == 0, result.output
    assert "verify:My-Qwen2-finetune/seq32/int8_1dev_bm1684x_dyn" in result.ran
    report = json.loads((tmp_path / "My-Qwen2-finetune" / "seq32" / "verify" / "int8_1dev_bm1684x_dyn" /
                         "report.json").read_text())
    assert report["simulated"] and report["decode"]["run"] and not report["decode"]["decisive_disagreements"]
    bmodel = tmp_path / "dist" / "My-Qwen2-finetune_int8_seq32_1dev_dyn.bmodel"
    description = json.loads(bmodel.with_suffix(".json").read_text())
    assert (description["model"], description["family"]) == ("My-Qwen2-finetune", "qwen2")
    out = subprocess.run([sys.executable, "-m", "runtime.chat", "--model", str(bmodel), "--max-new-tokens", "4",
                          "--prompt", "Hello"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip() and re.search(r"\[\d+ tokens?, (stop|length);", out.stderr), out.stdout + out.stderr
    assert not any(p.name.startswith(".") for p in finetune.iterdir())  # the user's folder is only read
