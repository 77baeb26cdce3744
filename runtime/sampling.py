"""Choosing the next token from logits (numpy): greedy, or sampling with temperature, top-k,
top-p and a repetition penalty, reproducible with a seed."""
import math
from dataclasses import dataclass, fields

import numpy as np

SEED_RANGE = (-2**63, 2**63 - 1)  # OpenAI's: a signed 64-bit integer


# field: (test, the range it states); each also has to be a finite number
_RANGES = {"temperature": (lambda v: 0 <= v <= 2, "in [0, 2]"),  # OpenAI's range; above 2 is noise
           "top_p": (lambda v: 0 < v <= 1, "in (0, 1]"),
           "repetition_penalty": (lambda v: v > 0, "> 0")}


def _shown(value) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _integer(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def sampling_problem(name: str, value) -> str | None:
    """What is wrong with one sampling field's value, or None: the one rule for the CLI's options
    (checked by argparse) and the server's fields (checked per request)."""
    if name in _RANGES:
        test, stated = _RANGES[name]
        finite = _integer(value) or (isinstance(value, float) and math.isfinite(value))
        if not finite:
            return f"{name} must be a finite number (got {_shown(value)})"
        return None if test(value) else f"{name} must be {stated} (got {_shown(value)})"
    if name == "top_k":
        return None if _integer(value) and value >= 0 else f"top_k must be an integer >= 0 (got {_shown(value)})"
    if name == "seed":
        low, high = SEED_RANGE
        ok = value is None or (_integer(value) and low <= value <= high)
        return None if ok else f"seed must be an integer in [-2**63, 2**63 - 1] (got {_shown(value)})"
    raise KeyError(name)


@dataclass
class SamplingParams:
    temperature: float = 0.0        # 0 = greedy
    top_k: int = 0                  # 0 = no limit
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int | None = None         # any 64-bit integer; a negative one is read as its two's complement

    def __post_init__(self):
        problems = [p for f in fields(self) if (p := sampling_problem(f.name, getattr(self, f.name)))]
        if problems:
            raise ValueError("; ".join(problems))


class Sampler:
    def __init__(self, params: SamplingParams):
        self.params = params
        # numpy wants a seed >= 0: -1 becomes 2**64 - 1, so every 64-bit seed is one fixed stream
        self.rng = np.random.default_rng(None if params.seed is None else params.seed % 2**64)

    @property
    def greedy(self) -> bool:
        """The choice is the argmax of the raw logits: a device's greedy head can make it."""
        return self.params.temperature == 0 and self.params.repetition_penalty == 1.0

    def __call__(self, logits: np.ndarray, seen: list[int]) -> int:
        if self.params.temperature == 0:
            return int(np.argmax(self._penalized(logits, seen)))
        probs = self.distribution(logits, seen)
        return int(self.rng.choice(probs.shape[0], p=probs))

    def draw(self, probs: np.ndarray, ids: np.ndarray) -> int:
        """One of a device's candidates (a sample head's top-k ids and their probabilities)."""
        probs = np.asarray(probs, np.float64)
        return int(ids[self.rng.choice(probs.shape[0], p=probs / probs.sum())])

    def _penalized(self, logits: np.ndarray, seen: list[int]) -> np.ndarray:
        p = self.params
        logits = logits.astype(np.float64, copy=True)
        if p.repetition_penalty != 1.0 and seen:
            # as in CTRL and transformers: push every token already seen away from being chosen
            ids = np.unique(np.asarray(seen))
            ids = ids[ids < logits.shape[0]]
            values = logits[ids]
            logits[ids] = np.where(values > 0, values / p.repetition_penalty, values * p.repetition_penalty)
        return logits

    def distribution(self, logits: np.ndarray, seen: list[int]) -> np.ndarray:
        """The probability of each token under the rule (temperature > 0): what is drawn from, and
        what a device's sample head (pipeline/model/torch_pieces.py SampleHeadNet) must reproduce."""
        p = self.params
        logits = self._penalized(logits, seen)
        # extreme penalties or temperatures overflow to inf: clip, then subtract the maximum before
        # dividing, so the best token stays at 0 and the others go to -inf at worst (never NaN)
        top = np.finfo(np.float64).max
        logits = np.clip(logits, -top, top)
        with np.errstate(over="ignore"):
            logits = (logits - logits.max()) / p.temperature
        if p.top_k and p.top_k < logits.shape[0]:
            kth = np.partition(logits, -p.top_k)[-p.top_k]
            logits[logits < kth] = -np.inf
        probs = np.exp(logits)
        probs /= probs.sum()
        if p.top_p < 1.0:
            # the smallest set reaching top_p: a token stays if what is more likely than it sums to
            # less than top_p (equally likely tokens stay or go together, whatever order sorts them)
            ranked = np.sort(probs)[::-1]
            more_likely = np.cumsum(ranked) - ranked  # before each rank; a tie's first rank counts for all
            first_of_tie = np.searchsorted(-ranked, -probs, side="left")
            probs = np.where(more_likely[first_of_tie] < p.top_p, probs, 0.0)
            probs /= probs.sum()
        return probs
