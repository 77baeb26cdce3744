import pytest
import yaml

from pipeline.errors import PipelineError
from pipeline.families import FAMILIES, get_family
from pipeline.model import config as model_config
from pipeline.model.config import known_models, load_model_config

pytestmark = pytest.mark.fast

SEED_MODELS = {"qwen-1.8b": (24, 2048), "qwen-7b": (32, 4096), "qwen-14b": (40, 5120)}


def test_every_entry_loads_and_is_consistent():
    names = known_models()
    assert len(names) >= 20
    for name in names:
        config = load_model_config(name)
        arch = config.architecture
        assert config.name == name
        assert config.seq.max <= arch.max_position_embeddings
        if not get_family(config.family).own_head_dim:  # head_dim is hidden / heads except in Qwen3
            assert arch.head_dim * arch.num_heads == arch.hidden_size, name


def test_seed_models_and_every_family_have_entries():
    for name, (layers, hidden) in SEED_MODELS.items():
        arch = load_model_config(name).architecture
        assert (arch.num_layers, arch.hidden_size) == (layers, hidden)
        assert load_model_config(name).family == "qwen"
    for family in FAMILIES.values():  # a generated test model for every family
        test_model = load_model_config(family.test_model)
        assert test_model.generated and test_model.family == family.name
    for prefix in ("qwen1.5-", "qwen2-", "qwen2.5-", "qwen3-"):
        assert any(n.startswith(prefix) for n in known_models()), prefix


def test_shape_models_have_their_base_dimensions():
    shaped = [load_model_config(n) for n in known_models() if load_model_config(n).shape_of]
    assert {m.shape_of for m in shaped} >= {"qwen-7b", "qwen-14b"}
    for model in shaped:
        base = load_model_config(model.shape_of)
        assert model.generated and not base.generated
        assert (model.family, model.architecture, model.seq) == (base.family, base.architecture, base.seq)
        assert model.architecture.vocab_size in (151936, 152064)


def test_unknown_model_lists_known_ones():
    with pytest.raises(PipelineError) as err:
        load_model_config("qwen-15b")
    assert "unknown model 'qwen-15b'" in str(err.value)
    assert "qwen-7b" in str(err.value) and "tiny-qwen2" in str(err.value)


def test_invalid_yaml_is_reported_with_its_path(tmp_path, monkeypatch):
    good = yaml.safe_load((model_config.MODEL_CONFIG_DIR / "tiny-qwen2.yaml").read_text())
    bad = {**good, "name": "broken", "architecture": {**good["architecture"], "hidden_size": "wide"}}
    (tmp_path / "broken.yaml").write_text(yaml.safe_dump(bad))
    extra = {**good, "name": "extra", "colour": "blue"}
    (tmp_path / "extra.yaml").write_text(yaml.safe_dump(extra))
    monkeypatch.setattr(model_config, "MODEL_CONFIG_DIR", tmp_path)
    load_model_config.cache_clear()
    try:
        with pytest.raises(PipelineError, match=r"broken.yaml is not a valid model config(.|\n)*hidden_size"):
            load_model_config("broken")
        with pytest.raises(PipelineError, match=r"colour"):
            load_model_config("extra")
    finally:
        load_model_config.cache_clear()
