import pytest

from pipeline.errors import PipelineError
from pipeline.graph.build_config import parse_build_config

from .conftest import run_cli

pytestmark = pytest.mark.fast


def test_defaults():
    build = parse_build_config({"model": "tiny-qwen2"})
    assert (build.mode, build.devices, build.seq, build.chip, build.group_size) == ("int8", 1, 32, "bm1684x", 64)
    assert build.sim_tokens == 16 and parse_build_config({"model": "tiny-qwen2", "sim_tokens": "0"}).sim_tokens == 0
    assert parse_build_config({"model": "qwen-14b"}).seq == 512
    assert build.dynamic and build.dist_name == "tiny-qwen2_int8_seq32_1dev_dyn"  # the prefill at the prompt's length


@pytest.fixture
def sigint_restored():
    """doit_config with jobs > 1 installs the build's Ctrl-C handler in this process (as in doit's
    own): put back what was there, or every later test's Ctrl-C would be a SystemExit(130)."""
    import signal

    previous = signal.getsignal(signal.SIGINT)
    yield
    signal.signal(signal.SIGINT, previous)


def test_parallel_by_default_within_the_memory_available(sigint_restored):
    import os

    from pipeline.graph.memory_budget import GIB
    from pipeline.graph.tasks import doit_config

    build = parse_build_config({"model": "tiny-qwen2"})
    assert build.jobs == os.cpu_count() and GIB <= build.memory
    assert doit_config(build).get("num_process") == (build.jobs if build.jobs > 1 else None)
    given = parse_build_config({"model": "tiny-qwen2", "jobs": "3", "memory": "1.5"})
    assert (given.jobs, given.memory) == (3, int(1.5 * GIB)) and doit_config(given)["num_process"] == 3
    assert "num_process" not in doit_config(parse_build_config({"model": "tiny-qwen2", "jobs": "1"}))


def test_dynamic_prefill_is_part_of_the_variant_and_the_file_name():
    build = parse_build_config({"model": "tiny-qwen2"})
    assert build.dynamic and build.variant == "int8_1dev_bm1684x_dyn"
    assert build.dist_name == "tiny-qwen2_int8_seq32_1dev_dyn"
    static = parse_build_config({"model": "tiny-qwen2", "dynamic": "0"})
    assert not static.dynamic and static.variant == "int8_1dev_bm1684x"
    assert static.dist_name == "tiny-qwen2_int8_seq32_1dev"


def test_history_prefill_is_part_of_the_bmodels_key_and_not_of_the_deployed_pieces():
    build = parse_build_config({"model": "tiny-qwen2", "seq": "128", "history": "1", "dynamic": "0"})
    assert (build.history, build.chunk, build.history_chunk) == (True, 32, 32)  # llm_convert's default: seq/4
    assert build.variant == "int8_1dev_bm1684x" and build.target == "int8_1dev_bm1684x_hist_c32"
    assert build.dist_name == "tiny-qwen2_int8_seq128_1dev_hist_c32"
    assert parse_build_config({"model": "tiny-qwen2", "history": "1", "chunk": "8"}).dist_name.endswith("_hist_c8")
    assert parse_build_config({"model": "tiny-qwen2"}).history_chunk == 0
    assert build.stages == (32, 64)  # as llm_convert: the chunk also sets the decode stages


def test_decode_stages_follow_the_chunk_alone():
    build = parse_build_config({"model": "tiny-qwen2", "seq": "128", "chunk": "16", "dynamic": "0"})
    assert (build.history_chunk, build.stages) == (0, (16, 32, 64))  # C, 2C, 4C ... < SEQ
    assert build.target == "int8_1dev_bm1684x_c16" and build.dist_name == "tiny-qwen2_int8_seq128_1dev_c16"
    assert parse_build_config({"model": "tiny-qwen2", "seq": "128"}).stages == ()


@pytest.mark.parametrize("variables, message", [
    ({"model": "nope"}, "unknown model 'nope'; known models:"),
    ({"mode": "int3"}, "mode='int3' is not allowed; use one of: bf16, f16, int8, int4"),
    ({"devices": "3"}, "devices=3 is not allowed; use one of: 1, 2, 4, 8"),
    ({"devices": "two"}, "devices='two' is not a whole number"),
    ({"seq": "1000"}, "seq=1000 is not allowed for tiny-qwen2: use a multiple of 8 from 16 to 256"),
    ({"seq": "33"}, "seq=33 is not allowed"),
    ({"model": "qwen-14b", "seq": "4096"}, "seq=4096 is not allowed for qwen-14b"),
    ({"chip": "bm9999"}, "chip='bm9999' is not allowed; use one of: bm1684x"),
    ({"group_size": "50"}, "group_size=50 is not allowed"),
    ({"path": "/no/such/folder"}, "path='/no/such/folder' is not a folder"),
    ({"modle": "x"}, "unknown variable modle; known variables: model, mode"),
    ({"model": "qwen-7b", "layers": "2"}, "layers= only applies to generated test models"),
    ({"sim_tokens": "17"}, "sim_tokens=17 is not allowed; use 0 (check the pieces only) to 16"),
    ({"sim_tokens": "-1"}, "sim_tokens=-1 is not allowed"),
    ({"dynamic": "yes"}, "dynamic='yes' is not allowed; use one of: 0, 1"),
    ({"history": "2"}, "history='2' is not allowed; use one of: 0, 1"),
    ({"history": "1", "chunk": "17"}, "chunk=17 is not allowed with seq=32: use 1 to 16 (default seq/4)"),
    ({"history": "1", "chunk": "0"}, "chunk=0 is not allowed"),
    ({"chunk": "17"}, "chunk=17 is not allowed with seq=32: use 0 to 16 (default 0: no decode stages)"),
    ({"chunk": "-1"}, "chunk=-1 is not allowed"),
    ({"jobs": "0"}, "jobs=0 is not allowed; use a positive number of tasks at once"),
    ({"jobs": "many"}, "jobs='many' is not a whole number"),
    ({"memory": "lots"}, "memory=lots is not allowed; use the GiB the build may take at once"),
    ({"memory": "inf"}, "memory=inf is not allowed"),
    ({"memory": "-2"}, "memory=-2 is not allowed"),
])
def test_bad_variables_name_variable_value_and_choices(variables, message):
    with pytest.raises(PipelineError) as err:
        parse_build_config({"model": "tiny-qwen2", **variables})
    assert message in str(err.value)


def test_cli_reports_bad_variable_without_traceback(tmp_path):
    result = run_cli(["build", "model=tiny-qwen2", "mode=int3", f"build_dir={tmp_path}"])
    assert result.returncode != 0
    assert "error: mode='int3' is not allowed" in result.stderr
    assert "Traceback" not in result.stderr
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_an_int4_group_size_that_leaves_matmuls_unquantized_is_named():
    from pipeline.graph.build_config import group_size_warning

    def warning(**variables):
        return group_size_warning(parse_build_config({"model": "smollm2-135m", **variables}))

    assert warning(mode="int4") is None and warning(mode="int8", group_size="128") is None
    said = warning(mode="int4", group_size="128")
    assert said.startswith("int4 group_size=128 does not divide hidden_size 576, num_heads x head_dim 576:")
    assert "int4 group_size=128" in warning(mode="bf16", modes="bf16,int4,int4_g128")
