"""doit entry point: `doit build model=qwen-7b mode=int8 devices=2 seq=1024`, `doit verify ...`.

Thin on purpose: the variables are validated and the graph is built in pipeline/.
"""
import sys

from pipeline.errors import PipelineError
from pipeline.graph.build_config import parse_build_config, variables_given
from pipeline.graph.tasks import doit_config, make_tasks

try:
    BUILD = parse_build_config(variables_given())
    DOIT_CONFIG = doit_config(BUILD)
except PipelineError as err:
    sys.exit(f"error: {err}")

globals().update(make_tasks(BUILD))
