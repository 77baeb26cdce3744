"""A checkpoint given by its folder alone (`doit build path=DIR` without `model=`): its family and
every number come from its config.json, and the build is named after the folder (or `name=`)."""
import re
from pathlib import Path

from ..errors import PipelineError
from ..families import family_of_config
from ..stages.mapping import canonical_config
from .checkpoint import Checkpoint
from .config import Architecture, LocalSource, ModelConfig, SeqSpec, known_models

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
SEQ_DEFAULT = 512  # as the registered models; less where the checkpoint's context is shorter


def local_model(folder: Path, name: str | None = None) -> ModelConfig:
    """The model of the checkpoint in `folder`, as a registered model would describe it."""
    origin = folder / "config.json"
    source = Checkpoint(folder).config
    family = family_of_config(source, origin=str(origin))
    canonical = canonical_config(source, family.name, origin=str(origin))
    name = name or folder.name
    if not NAME.fullmatch(name):
        raise PipelineError(f"name={name!r} cannot name a build: use letters, digits, '.', '_' and '-' "
                            f"(it names the folder of the build and the bmodel's file)")
    if name in known_models():
        raise PipelineError(f"name={name!r} is a registered model: build that model from this folder with "
                            f"model={name} path={folder} (its numbers are then checked), or choose another name=")
    try:
        architecture = Architecture(**family.architecture(canonical))
    except (KeyError, TypeError, ValueError) as err:
        raise PipelineError(f"{origin}: cannot read the model's numbers from it ({err})") from None
    context = architecture.max_position_embeddings
    return ModelConfig(name=name, display_name=folder.name, family=family.name,
                       source=LocalSource(folder=str(folder)), architecture=architecture,
                       seq=SeqSpec(default=min(SEQ_DEFAULT, context // 8 * 8), max=context))
