"""Qwen1.5, Qwen2, Qwen2.5: transformers' own Qwen2 layers, tensors used as they are."""
from .base import Family

QWEN2 = Family(name="qwen2", model_type="qwen2", canonical="qwen2", prefix="Qwen2", test_model="tiny-qwen2")
