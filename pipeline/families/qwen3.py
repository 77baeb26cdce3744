"""Qwen3 (dense): transformers' own Qwen3 layers (q_norm / k_norm inside attention), tensors as they are."""
from .base import Family

QWEN3 = Family(name="qwen3", model_type="qwen3", canonical="qwen3", prefix="Qwen3", test_model="tiny-qwen3",
               own_head_dim=True)
