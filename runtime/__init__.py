"""Runs what the pipeline built. Imports neither torch nor transformers: it installs alone on a
Sophgo board with numpy, the tokenizer libraries and onnxruntime."""
