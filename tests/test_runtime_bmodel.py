"""The runtime's bmodel backend on the simulator: our bmodels and tpu-mlir's llm_convert ones."""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from pipeline.toolchain.install import ensure_toolchain
from pipeline.verify_sim import TIE_MARGIN, _path
from runtime.isolated_backend import IsolatedBmodelBackend
from runtime.engine import Engine
from runtime.onnx_backend import OnnxBackend

from .conftest import ROOT, run_doit

pytestmark = pytest.mark.compiler
MODEL = "tiny-qwen2"


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    build_dir = tmp_path_factory.mktemp("bmodel-runtime")
    result = run_doit(build_dir, ["build"], model=MODEL, mode="bf16")
    assert result.code == 0, result.output
    seq_dir = build_dir / MODEL / "seq32"
    ids = json.loads((seq_dir / "verify" / "report.json").read_text())["prompt_ids"]
    return build_dir, seq_dir / "onnx", build_dir / "dist" / f"{MODEL}_bf16_seq32_1dev.bmodel", ids


def test_bf16_bmodel_decodes_like_the_onnx_pipeline(built):
    _, onnx, bmodel, ids = built
    # BmodelBackend (the BM runtime's C API) in a child process: in this one, the simulator's threads
    # would spin on both cores for the rest of the tests
    backend = IsolatedBmodelBackend(bmodel)
    assert {k: backend.info[k] for k in ("seq", "num_layers", "kv_heads", "head_dim", "head")} == \
        {"seq": 32, "num_layers": 2, "kv_heads": 2, "head_dim": 16, "head": "logits"}  # read from the file's nets
    with backend:
        assert Engine(backend).greedy(ids, 16) == Engine(OnnxBackend(onnx)).greedy(ids, 16)


def test_chat_cli_runs_a_bmodel(built, tmp_path):
    _, _, bmodel, _ = built
    log = tmp_path / "bmrt.log"
    out = subprocess.run([sys.executable, "-m", "runtime.chat", "--model", str(bmodel), "--prompt", "Hello", "--system", "",
                          "--max-new-tokens", "5"], cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "QWEN_TPU_RUNTIME_LOG": str(log)})
    assert out.returncode == 0, out.stderr
    assert "[5 tokens, length; prompt" in out.stderr  # its tokenizer was found beside it
    # the simulator's own prints (at start, at every launch, at exit) go to the runtime's log, not
    # into the answer: stdout is the answer's text, stderr the stats line alone
    assert "cmodel" in log.read_text() and "do_allreduce" in log.read_text()
    assert "cmodel" not in out.stdout + out.stderr and "do_allreduce" not in out.stdout + out.stderr
    assert out.stderr.startswith("[5 tokens") and out.stderr.count("\n") == 1, out.stderr


def test_llm_convert_bmodel_runs_in_our_runtime(built, tmp_path):
    """A bmodel made by tpu-mlir's own llm_convert.py: its lm_head returns the token, not logits."""
    build_dir, onnx, _, ids = built
    if shutil.which("parallel") is None:
        pytest.fail("llm_convert.py needs GNU parallel (apt-get install parallel; .ci/run installs it)")
    toolchain = ensure_toolchain()
    checkpoint = build_dir / MODEL / "checkpoint"
    out = subprocess.run([str(toolchain.bin / "llm_convert.py"), "-m", str(checkpoint), "-s", "32", "-q", "bf16",
                          "-c", "bm1684x", "-o", str(tmp_path / "out")], cwd=tmp_path, env=toolchain.env(),
                         capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    bmodel = next((tmp_path / "out").glob("*.bmodel"))
    backend = IsolatedBmodelBackend(bmodel)
    assert backend.info["head"] == "token" and backend.info["seq"] == 32 and backend.info["num_layers"] == 2
    # teacher-forced along the ONNX pipeline's greedy path: the same choice wherever it is not a near-tie
    reference = _path(Engine(OnnxBackend(onnx)), ids, None, 16)
    tokens = [int(np.argmax(lg)) for lg in reference]
    margins = [float(np.diff(np.sort(lg)[-2:])[0]) for lg in reference]
    with backend:
        chosen = [int(np.argmax(lg)) for lg in _path(Engine(backend), ids, tokens, 16)]
    decisive = [k for k, m in enumerate(margins) if m >= TIE_MARGIN]
    assert len(decisive) >= 8 and all(chosen[k] == tokens[k] for k in decisive), (chosen, tokens, margins)
