"""The model families the project builds, one module each, registered here and nowhere else.

Adding a family: a module here with its Family (a subclass where its checkpoint or reference
differ), patches/<name>.yaml (how its config and tensors map onto the canonical layout), its entry
in FAMILIES, and a generated test model, model_configs/<test_model>.yaml."""
from ..errors import PipelineError
from .base import Family, FamilyClasses
from .llama import LLAMA
from .qwen import QWEN
from .qwen2 import QWEN2
from .qwen3 import QWEN3
from .qwen3_5 import QWEN3_5

FAMILIES: dict[str, Family] = {f.name: f for f in (QWEN, QWEN2, QWEN3, QWEN3_5, LLAMA)}

__all__ = ["FAMILIES", "Family", "FamilyClasses", "get_family", "family_of_config", "canonical_family", "canonical_classes", "hf_config"]


def get_family(name: str) -> Family:
    if name not in FAMILIES:
        raise PipelineError(f"unknown family {name!r}; supported: {', '.join(FAMILIES)}")
    return FAMILIES[name]


def family_of_config(config: dict, origin: str = "config.json") -> Family:
    """The family of a checkpoint, by its config.json's model_type."""
    model_type = config.get("model_type")
    if model_type is None:
        raise PipelineError(f"{origin} has no model_type: is it a Hugging Face model config?")
    for family in FAMILIES.values():
        if model_type in family.source_model_types:
            return family
    supported = ", ".join(t for f in FAMILIES.values() for t in f.source_model_types)
    raise PipelineError(f"{origin}: model_type {model_type!r} is not supported; supported: {supported}")


def canonical_family(model_type: str) -> Family:
    """The family whose pieces a canonical config (the export's) is built with. Families that share
    a canonical layout (qwen and qwen2) share everything the pieces need."""
    for family in FAMILIES.values():
        if family.canonical_model_type == model_type:
            return family
    raise PipelineError(f"no family runs the canonical model_type {model_type!r}")


def canonical_classes(model_type: str) -> FamilyClasses:
    """transformers' classes that run a canonical config (its model_type names the transformers model)."""
    return canonical_family(model_type).canonical_classes()


def hf_config(canonical: dict, attn: str = "eager"):
    """A transformers config object from a canonical config.json dict (Family.hf_config)."""
    return canonical_family(canonical["model_type"]).hf_config(canonical, attn)
