"""Download stage: find the checkpoint (generated, `path=`, a package's weights, or the Hugging
Face hub) and check it.

The result is source.json: which folder, its cheap stat signature (to notice edits without
hashing gigabytes), and what was checked. The user's folder is only ever read.
"""
from pathlib import Path

from .build_config import BuildConfig
from .checkpoint import Checkpoint
from .errors import PipelineError
from .generate import generate_checkpoint
from .patch import canonical_config, check_against_model_config

# Only what the pipeline and the runtime read: config, weights, tokenizer, generation settings.
HUB_PATTERNS = ["*.json", "*.safetensors", "*.tiktoken", "*.txt", "*.model", "*.jinja"]


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
        from .package_weights import package_checkpoint

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


def check(build: BuildConfig, folder: Path) -> list:
    """Completeness (index vs shards, every header sound) and agreement with the model's YAML."""
    ckpt = Checkpoint(folder)
    ckpt.validate()
    config = canonical_config(ckpt.config, build.model.family)
    check_against_model_config(config, build.model, folder)
    return ckpt.stat_signature()


def current_signature(folder: str) -> list | None:
    try:
        return Checkpoint(Path(folder)).stat_signature()
    except (PipelineError, OSError):
        return None
