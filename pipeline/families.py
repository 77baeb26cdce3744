"""transformers' own classes for each canonical layout (imported lazily: torch is heavy)."""
import importlib
from dataclasses import dataclass

# canonical model_type -> class-name prefix in transformers.models.<type>.modeling_<type>
PREFIXES = {"qwen2": "Qwen2", "qwen3": "Qwen3", "llama": "Llama"}


@dataclass(frozen=True)
class FamilyClasses:
    config: type
    decoder_layer: type
    rotary_embedding: type
    rms_norm: type
    causal_lm: type


def family_classes(model_type: str) -> FamilyClasses:
    prefix = PREFIXES[model_type]
    modeling = importlib.import_module(f"transformers.models.{model_type}.modeling_{model_type}")
    configuration = importlib.import_module(f"transformers.models.{model_type}.configuration_{model_type}")
    return FamilyClasses(
        config=getattr(configuration, f"{prefix}Config"),
        decoder_layer=getattr(modeling, f"{prefix}DecoderLayer"),
        rotary_embedding=getattr(modeling, f"{prefix}RotaryEmbedding"),
        rms_norm=getattr(modeling, f"{prefix}RMSNorm"),
        causal_lm=getattr(modeling, f"{prefix}ForCausalLM"),
    )


def load_hf_config(config_dict: dict, attn: str = "eager"):
    """A transformers config object from a canonical config.json dict, with eager attention
    (plain MatMul/Add/Softmax in the exported graph)."""
    classes = family_classes(config_dict["model_type"])
    fields = {k: v for k, v in config_dict.items() if k not in ("model_type", "transformers_version")}
    config = classes.config(**fields)
    config._attn_implementation = attn
    return config
