"""Llama (SmolLM2 and the like): Qwen2's layout without q/k/v biases; transformers' own Llama layers."""
from .base import Family

LLAMA = Family(name="llama", model_type="llama", canonical="llama", prefix="Llama", test_model="tiny-llama")
