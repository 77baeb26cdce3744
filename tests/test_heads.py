"""The heads that choose the next token on the device (pipeline/model/torch_pieces.py, exported and
compiled like every piece) follow the host's rule (runtime/sampling.py) exactly, ties included:
bf16 logits tie often, and a tie at a top-k or top-p cut must not depend on the order a TopK
happens to give equal values."""
import numpy as np
import pytest
import torch

from pipeline.model.torch_pieces import GreedyHeadNet, SampleHeadNet
from runtime.engine import penalty_window
from runtime.nets import TOP_K_MAX
from runtime.sampling import Sampler, SamplingParams

pytestmark = pytest.mark.fast  # the heads in torch, against the host's rule: no compiler
VOCAB, SEQ = 512, 32


def bf16_logits(seed: int) -> np.ndarray:
    """Random logits rounded to bf16, as a bf16 lm_head gives them: many exact ties."""
    logits = torch.from_numpy(np.random.default_rng(seed).normal(0, 3, (1, VOCAB)).astype(np.float32))
    return logits.to(torch.bfloat16).to(torch.float32).numpy()


def device_distribution(logits, seen, penalty, temperature, top_k, top_p) -> np.ndarray:
    probs, ids = SampleHeadNet(VOCAB)(torch.from_numpy(logits), torch.from_numpy(penalty_window(seen, SEQ)),
                                      torch.tensor([penalty]), torch.tensor([temperature]),
                                      torch.tensor([top_k], dtype=torch.int32), torch.tensor([top_p]))
    full = np.zeros(VOCAB)
    full[ids[0].numpy()] = probs[0].numpy()
    return full, bool(probs[0, -1] > 0)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("penalty,temperature,top_k,top_p", [
    (1.0, 1.0, 50, 1.0), (1.3, 0.8, 20, 0.9), (2.0, 0.5, 5, 0.5), (1.1, 1.5, 1, 1.0), (0.8, 0.7, 40, 0.95),
    (1.0, 2.0, 50, 0.3)])
def test_the_sample_head_gives_the_host_rules_distribution(seed, penalty, temperature, top_k, top_p):
    logits = bf16_logits(seed)
    seen = [int(i) for i in np.random.default_rng(100 + seed).integers(0, VOCAB, 12)]
    host = Sampler(SamplingParams(temperature, top_k, top_p, penalty)).distribution(logits[0], seen)
    device, last_kept = device_distribution(logits, seen, penalty, temperature, top_k, top_p)
    if last_kept:  # the engine samples on the host then: there can be ties beyond the candidates
        assert np.count_nonzero(host) >= TOP_K_MAX + 1
        return
    assert set(np.flatnonzero(device)) == set(np.flatnonzero(host))
    assert np.abs(device - host).max() < 1e-6


def test_equally_likely_tokens_stay_or_go_together_at_the_top_p_cut():
    logits = np.log(np.array([0.4, 0.2, 0.2, 0.1, 0.1]))
    # 0.4 + 0.2 reaches 0.5: the other 0.2 is as likely as the last one kept, so it stays
    probs = Sampler(SamplingParams(1.0, 0, 0.5)).distribution(logits, [])
    assert np.flatnonzero(probs).tolist() == [0, 1, 2]
    assert np.allclose(probs[:3], [0.5, 0.25, 0.25])


def test_the_greedy_head_is_the_argmax():
    logits = bf16_logits(7)
    assert int(GreedyHeadNet()(torch.from_numpy(logits))[0, 0]) == int(np.argmax(logits))
