"""What each mode costs in answers (pipeline/stages/quality.py, `doit quality`): the figures themselves on
known distributions, the text, and the tasks on a tiny model (the ONNX control without the
compiler; the modes' bmodels on the simulator)."""
import json
import math

import numpy as np
import pytest

from pipeline.errors import PipelineError
from pipeline.stages import quality

from .conftest import run_doit

MODEL = "tiny-qwen2"


@pytest.mark.fast
def test_the_same_distribution_costs_nothing():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(200, 50))
    targets = rng.integers(0, 50, size=200)
    same = quality.summarize(quality.compare(quality.log_softmax(logits), logits, targets))
    assert same["ppl_ratio"] == pytest.approx(1.0) and same["kl_mean"] == pytest.approx(0.0, abs=1e-12)
    assert same["same_top1"] == 1.0 and same["rms_dp"] == pytest.approx(0.0, abs=1e-12)
    assert same["ppl"] == pytest.approx(same["ppl_reference"]) and same["scored_tokens"] == 200


@pytest.mark.fast
def test_the_figures_are_llama_cpps_on_a_known_pair_of_distributions():
    # reference: token 0 with p = 0.5, tokens 1 and 2 with 0.25; the model: 0.25, 0.5, 0.25
    ref = np.log(np.array([[0.5, 0.25, 0.25]] * 4))
    model = np.log(np.array([[0.25, 0.5, 0.25]] * 4))
    targets = np.array([0, 1, 0, 2])
    m = quality.summarize(quality.compare(ref, model, targets))
    kl = 0.5 * math.log(0.5 / 0.25) + 0.25 * math.log(0.25 / 0.5)
    assert m["kl_mean"] == pytest.approx(kl) and m["kl_max"] == pytest.approx(kl) and m["kl_mean_se"] == 0
    assert m["same_top1"] == 0.0  # the model's top token is 1, the reference's 0
    nll = -np.log([0.25, 0.5, 0.25, 0.25]).mean()
    nll_ref = -np.log([0.5, 0.25, 0.5, 0.25]).mean()
    assert m["ppl"] == pytest.approx(math.exp(nll)) and m["ppl_reference"] == pytest.approx(math.exp(nll_ref))
    assert m["ppl_ratio"] == pytest.approx(math.exp(nll - nll_ref))
    assert m["rms_dp"] == pytest.approx(math.sqrt(np.mean(np.square([0.25, 0.25, 0.25, 0.0]))))


@pytest.mark.fast
def test_the_text_is_the_pinned_one_and_windows_cover_the_tokens_asked_for():
    text, source = quality.scoring_text()
    assert text.startswith("In the beginning God created the heaven")
    assert source["file_sha256"] == quality.TEXT_SHA256 and len(text) > 100_000
    ids = list(range(1000))
    assert quality.windows(ids, 64, 3) == [ids[:64], ids[64:128], ids[128:192]]
    with pytest.raises(PipelineError, match="1000 tokens: 16 windows of 64 need 1024"):
        quality.windows(ids, 64, 16)


@pytest.mark.fast
def test_the_onnx_control_scores_as_the_reference(tmp_path):
    """The ONNX pieces (fp32) against transformers (fp32): all but exact."""
    name = f"{MODEL}/seq32"
    result = run_doit(tmp_path, [f"quality:{name}/onnx/w0", f"quality:{name}/onnx/w1"], model=MODEL,
                      quality_tokens=40)  # 2 windows of 31 scored positions
    assert result.code == 0, result.output
    folder = tmp_path / MODEL / "seq32" / "quality"
    assert len(json.loads((folder / "text.json").read_text())["windows"]) == 2
    per_position = {k: np.concatenate([np.load(folder / "onnx" / f"w{k2}.npz")[k] for k2 in (0, 1)])
                    for k in ("nll", "nll_ref", "kl", "same_top1", "p", "p_ref")}
    m = quality.summarize(per_position)
    assert m["scored_tokens"] == 62
    assert m["ppl_ratio"] == pytest.approx(1.0, abs=1e-4) and m["kl_mean"] < 1e-6 and m["same_top1"] == 1.0
    again = run_doit(tmp_path, [f"quality:{name}/onnx/w0"], model=MODEL, quality_tokens=40)
    assert again.code == 0 and again.ran == []
