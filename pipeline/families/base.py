"""What every family shares. A family is one module in this folder: a Family (or a subclass that
overrides what differs) registered in __init__.py; its mapping data stays in patches/<name>.yaml."""
import importlib
from dataclasses import dataclass
from pathlib import Path

import yaml

from .. import PROJECT_ROOT

PATCH_DIR = PROJECT_ROOT / "patches"
# Per mode: minimum cosine and max abs error relative to max(1, |reference|), for every output of
# every piece. Measured on the tiny models (README): bf16 >= 0.99989, int8 >= 0.9998, int4 0.938
# (tiny-llama's block_0) to 0.97 (random weights quantize badly to 4 bits, and a 64-wide model puts
# a whole row in one group). Measured broken builds: another layer's weights give cosine < 0.1, no
# causal mask 0.54, no RoPE 0.73; all far below every threshold.
THRESHOLDS = {
    "f16": (0.9995, 0.03), "bf16": (0.999, 0.05),
    "int8f16": (0.998, 0.06), "int8": (0.998, 0.08),
    "int4f16": (0.92, 0.5), "int4": (0.92, 0.5),
}


@dataclass(frozen=True)
class FamilyClasses:
    config: type
    decoder_layer: type
    rotary_embedding: type
    rms_norm: type
    causal_lm: type


@dataclass(frozen=True)
class Family:
    name: str        # the model YAML's `family:`, and patches/<name>.yaml
    model_type: str  # what a checkpoint's config.json says
    canonical: str   # the transformers model (transformers.models.<canonical>) its pieces run as
    prefix: str      # that model's class-name prefix: Qwen2 -> Qwen2DecoderLayer
    test_model: str  # the generated test checkpoint of this family (model_configs/<test_model>.yaml)
    own_head_dim: bool = False  # head_dim is its own number, not hidden_size / num_heads (Qwen3)
    canonical_type: str = ""    # the canonical config's model_type, where it is not `canonical` (qwen3_5_text)

    @property
    def canonical_model_type(self) -> str:
        return self.canonical_type or self.canonical

    @property
    def source_model_types(self) -> tuple[str, ...]:
        """The model_types of the checkpoints it takes: its published one, and the canonical one where
        that is its own (a text model saved alone: Qwen3_5ForCausalLM's qwen3_5_text), whose config is
        taken as it is."""
        own = self.canonical_type and self.canonical_type != self.model_type
        return (self.model_type, self.canonical_type) if own else (self.model_type,)

    @property
    def thresholds(self) -> dict[str, tuple[float, float]]:
        """Per mode, what every output of a deployed piece must reach against onnxruntime."""
        return THRESHOLDS

    @property
    def patch_file(self) -> Path:
        return PATCH_DIR / f"{self.name}.yaml"

    def patch_rules(self) -> dict:
        return yaml.safe_load(self.patch_file.read_text(encoding="utf-8"))

    def classes(self, text: str = "") -> FamilyClasses:
        """transformers' own classes for the canonical layout (imported lazily: torch is heavy).
        `text`: the infix of a multimodal model's text classes (Qwen3_5TextConfig)."""
        modeling = importlib.import_module(f"transformers.models.{self.canonical}.modeling_{self.canonical}")
        configuration = importlib.import_module(f"transformers.models.{self.canonical}.configuration_{self.canonical}")
        return FamilyClasses(
            config=getattr(configuration, f"{self.prefix}{text}Config"),
            decoder_layer=getattr(modeling, f"{self.prefix}DecoderLayer"),
            rotary_embedding=getattr(modeling, f"{self.prefix}{text}RotaryEmbedding"),
            rms_norm=getattr(modeling, f"{self.prefix}RMSNorm"),
            causal_lm=getattr(modeling, f"{self.prefix}ForCausalLM"),
        )

    def canonical_classes(self) -> FamilyClasses:
        """The classes that run the canonical config (a multimodal family's text classes)."""
        return self.classes()

    def hf_config(self, canonical: dict, attn: str = "eager"):
        """A transformers config object from a canonical config.json dict, with eager attention
        (plain MatMul/Add/Softmax in the exported graph)."""
        fields = {k: v for k, v in canonical.items() if k not in ("model_type", "transformers_version")}
        config = self.canonical_classes().config(**fields)
        config._attn_implementation = attn
        return config

    def architecture(self, canonical: dict) -> dict:
        """The model's numbers (model_config.Architecture's fields) from its canonical config: what a
        checkpoint given by its folder alone is built with."""
        heads = canonical["num_attention_heads"]
        rope = canonical.get("rope_parameters") or canonical.get("rope_scaling") or {}
        return {
            "num_layers": canonical["num_hidden_layers"], "hidden_size": canonical["hidden_size"],
            "num_heads": heads, "num_kv_heads": canonical.get("num_key_value_heads") or heads,
            "head_dim": canonical.get("head_dim") or canonical["hidden_size"] // heads,
            "intermediate_size": canonical["intermediate_size"], "vocab_size": canonical["vocab_size"],
            "tie_word_embeddings": bool(canonical.get("tie_word_embeddings", False)),
            "rope_theta": float(canonical.get("rope_theta") or rope.get("rope_theta") or 10000.0),
            "rms_norm_eps": canonical["rms_norm_eps"],
            "max_position_embeddings": canonical["max_position_embeddings"],
            "partial_rotary_factor": float(rope.get("partial_rotary_factor", 1.0)),
        }

    def test_config_fields(self, model) -> dict:
        """The transformers config fields of `model`'s generated checkpoint."""
        a = model.architecture
        return dict(
            hidden_size=a.hidden_size, intermediate_size=a.intermediate_size, num_hidden_layers=a.num_layers,
            num_attention_heads=a.num_heads, num_key_value_heads=a.num_kv_heads, head_dim=a.head_dim,
            vocab_size=a.vocab_size, tie_word_embeddings=a.tie_word_embeddings, rms_norm_eps=a.rms_norm_eps,
            rope_parameters={"rope_type": "default", "rope_theta": a.rope_theta},
            max_position_embeddings=a.max_position_embeddings,
            initializer_range=model.source.generate.initializer_range,
            bos_token_id=None, eos_token_id=2, pad_token_id=0)

    def test_checkpoint(self, model) -> tuple[dict, dict]:
        """The config.json and the tensor shapes of `model`'s generated checkpoint, in transformers'
        own layout: names and shapes from the real model class (on the meta device)."""
        import torch

        a, classes = model.architecture, self.classes()
        config = classes.config(**self.test_config_fields(model))
        with torch.device("meta"):
            shapes = {k: tuple(v.shape) for k, v in classes.causal_lm(config).state_dict().items()}
        if a.tie_word_embeddings:
            shapes.pop("lm_head.weight", None)
        config_dict = config.to_dict()
        config_dict["architectures"] = [classes.causal_lm.__name__]
        return config_dict, shapes

    def reference_model(self, config: dict, source: Path, mapping: dict):
        """transformers' own model of the checkpoint, in float32 with eager attention: what the
        verification compares against."""
        import torch
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32, attn_implementation="eager").eval()

    def export_context(self, kind: str):
        """What the export of a piece kind needs around torch.onnx.export (nothing, by default)."""
        import contextlib

        return contextlib.nullcontext()

    def onnx_fixes(self, kind: str) -> list:
        """Rewrites of an exported piece's graph that the TPU compiler needs, each `fix(model)`
        editing it in place (none, by default)."""
        return []

    def float32_ops(self, kind: str):
        """A predicate on a piece's op names (the transformed MLIR's) for the ops model_deploy keeps
        in float32 whatever the mode (its --quantize_table); None: none."""
        return None

    def onnx_sim(self, kind: str) -> bool:
        """Whether model_transform.py simplifies the piece's graph (pipeline/stages/compile.py: off by default)."""
        return False
