"""Build pipeline: Hugging Face checkpoint -> verified ONNX pieces -> bmodel."""
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent
