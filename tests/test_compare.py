"""The verification's comparison of a piece's outputs: NaN and inf are reported as such (count
and side), all-zero outputs agree, and the simulator check words failures the same way."""
import numpy as np
import pytest

from pipeline.families.base import THRESHOLDS
from pipeline.stages import verify, verify_sim

pytestmark = pytest.mark.fast
FINE = np.linspace(-2.0, 2.0, 8, dtype=np.float32)


def _with(values, at=0):
    out = FINE.copy()
    out[at:at + len(values)] = values
    return out


def test_nan_on_both_sides_gives_counts_not_a_cosine():
    r = verify.compare(_with([np.nan, np.nan]), _with([np.nan, np.inf, -np.inf]))
    assert r == {"cosine": None, "max_abs": None, "ref_max": None, "size": 8,
                 "nonfinite": {"reference": 2, "candidate": 3}, "ok": False}
    assert verify.piece_failures({"block_1": {"hidden_states": r}}) == [
        "block_1.hidden_states: NaN or inf: 2 of 8 values in the reference (torch), 3 of 8 values in the "
        "candidate (onnxruntime)"]


def test_simulator_failures_name_their_own_sides():
    r = verify.compare(FINE, _with([np.inf], at=7), *THRESHOLDS["int8"])
    report = {"pieces": {"lm_head": {"logits": r}}, "decode": {"run": False}}
    assert verify_sim.summarize(report) == [
        "lm_head.logits: NaN or inf: none in the reference (onnxruntime), 1 of 8 values in the candidate (simulator)"]
    table = "\n".join(verify.pieces_table(report["pieces"], 6))
    assert "| lm_head | logits | - | - | - | **NO**: NaN or inf in 0 reference and 1 candidate values of 8 |" in table


def test_simulator_decode_with_non_finite_logits_fails():
    steps = [FINE, FINE]
    assert verify_sim._lowest_cosine(steps, [FINE, _with([np.nan])]) is None
    assert verify_sim._lowest_cosine(steps, steps) == 1.0
    report = {"pieces": {}, "decode": {"run": True, "logits_cosine_min": None, "exact_required": False}}
    assert verify_sim.summarize(report) == [
        "the combined bmodel's greedy decode gives NaN or inf logits on the simulator"]


def test_all_zero_outputs_agree_and_zero_against_nonzero_does_not():
    zeros = np.zeros(8, np.float32)
    assert verify.compare(zeros, zeros) == {"cosine": 1.0, "max_abs": 0.0, "ref_max": 1.0, "ok": True}
    r = verify.compare(zeros, FINE)
    assert r["cosine"] == 0.0 and not r["ok"]


def test_finite_outputs_compare_as_before():
    r = verify.compare(FINE, FINE + 1e-6)
    assert r["ok"] and r["cosine"] == pytest.approx(1.0) and r["max_abs"] == pytest.approx(1e-6, rel=0.05)
    assert r["ref_max"] == 2.0 and "nonfinite" not in r
