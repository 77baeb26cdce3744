"""Quantize modes: the names users type (`mode=`) and what TPU-MLIR's model_deploy calls them.
Embedding and lm_head stay in the float type of the mode (pipeline/stages/compile.py)."""
MODES = {
    "bf16": "BF16",
    "f16": "F16",
    "int8": "W8BF16",
    "int4": "W4BF16",
    "int8f16": "W8F16",
    "int4f16": "W4F16",
}
