"""Prefill + decode over the fixed-length KV cache of the net interface (see pipeline/pieces.py).

The engine keeps the conversation's length and asks a walk over the nets for each step:
  - a backend with `walk()` gives its own (the bmodel backend's keeps the state on the device:
    runtime/device_walk.py);
  - a backend with only `run(net, feeds) -> outputs` (onnxruntime, the BM runtime's copy path, the
    build's pyruntime_bm and verify's comparing backend) is walked by HostWalk, with the cache in
    host arrays.
Every user of a model (the chat, the server, `doit verify`, the benchmarks) goes through Engine.
The cache holds SEQ slots per layer; the decode mask covers them plus the current token at index SEQ.
"""
import numpy as np

from .traffic import Traffic

MASK_VALUE = -10000.0  # zeroes a softmax term, and stays finite in bf16/f16


class PromptTooLong(ValueError):
    pass


def prefill_mask(n: int, seq: int) -> np.ndarray:
    """[1,1,SEQ,SEQ]: causal over the n prompt tokens; padding rows see only themselves,
    so no softmax row is fully masked."""
    mask = np.triu(np.full((seq, seq), MASK_VALUE, np.float32), 1)
    mask[:, n:] = MASK_VALUE
    np.fill_diagonal(mask, 0.0)
    return mask[None, None]


def decode_mask(pos: int, seq: int) -> np.ndarray:
    """[1,1,1,SEQ+1]: the `pos` filled cache slots and the current token (index SEQ)."""
    mask = np.full((1, 1, 1, seq + 1), MASK_VALUE, np.float32)
    mask[..., :pos] = 0.0
    mask[..., seq] = 0.0
    return mask


def pad_ids(ids: list[int], seq: int) -> np.ndarray:
    padded = np.zeros((1, seq), np.int32)
    padded[0, :len(ids)] = ids
    return padded


def penalty_window(ids: list[int], seq: int) -> np.ndarray:
    """[1,SEQ]: the tokens so far for a sample head's repetition penalty, padded with the first
    (a token already there: penalizing it twice is penalizing it once)."""
    window = np.full((1, seq), ids[0], np.int32)
    window[0, :len(ids)] = ids
    return window


class HostWalk:
    """The nets run from host arrays, the K/V cache kept on the host: `run(net, feeds)` per net."""

    def __init__(self, backend):
        self.backend = backend
        self.info = {**backend.info, "greedy_head": False, "sample_head": 0}  # the host chooses
        self.seq, self.layers = self.info["seq"], self.info["num_layers"]
        shape = (1, self.seq, self.info["kv_heads"], self.info["head_dim"])
        self.k = [np.zeros(shape, np.float32) for _ in range(self.layers)]
        self.v = [np.zeros(shape, np.float32) for _ in range(self.layers)]
        self._logits = None

    @property
    def traffic(self) -> Traffic | None:
        return getattr(self.backend, "traffic", None)

    def prefill(self, ids: list[int]) -> None:
        n, run = len(ids), self.backend.run
        rows = n if self.info.get("dynamic") else self.seq  # a dynamic prefill runs at the prompt's length
        positions, mask = np.arange(rows, dtype=np.int32)[None], prefill_mask(n, rows)
        (hidden,) = run("embedding", {"input_ids": pad_ids(ids, self.seq)})
        hidden = hidden[:, :rows]
        for i in range(self.layers):
            hidden, k, v = run(f"block_{i}", {"input_states": hidden, "position_ids": positions, "attention_mask": mask})
            self.k[i][:, :rows], self.v[i][:, :rows] = k, v
        self._head(hidden[:, n - 1])

    def decode(self, token: int, pos: int) -> None:
        run, mask = self.backend.run, decode_mask(pos, self.seq)
        (hidden,) = run("embedding_cache", {"input_ids": np.array([[token]], np.int32)})
        position = np.array([[pos]], np.int32)
        for i in range(self.layers):
            hidden, k, v = run(f"block_cache_{i}", {
                "input_states": hidden, "position_ids": position, "attention_mask": mask,
                "history_k": self.k[i], "history_v": self.v[i]})
            self.k[i][:, pos], self.v[i][:, pos] = k[:, 0], v[:, 0]
        self._head(hidden[:, 0])

    def _head(self, hidden: np.ndarray) -> None:
        self._hidden, self._logits = np.ascontiguousarray(hidden), None  # lm_head runs when asked for

    def logits(self) -> np.ndarray:
        if self._logits is None:
            (logits,) = self.backend.run("lm_head", {"hidden_states": self._hidden})
            self._logits = logits[0]
        return self._logits

    def token(self) -> int | None:
        return None


class Engine:
    def __init__(self, backend, walk=None):
        """`walk`: instead of the backend's own (e.g. HostWalk(backend), to compare the two)."""
        self.backend = backend
        self.walk = walk or (backend.walk() if hasattr(backend, "walk") else HostWalk(backend))
        self.seq, self.layers = self.walk.info["seq"], self.walk.info["num_layers"]
        self.length = 0
        # what the device was asked for, per phase (None where the backend has no device)
        self.prefill_traffic, self.decode_traffic, self.decoded = Traffic(), Traffic(), 0

    def _counted(self, step, *args) -> tuple:
        """step(*args), and what it made cross between host and device."""
        before = self.walk.traffic.copy() if self.walk.traffic is not None else None
        result = step(*args)
        return result, (self.walk.traffic - before if before is not None else Traffic())

    def prefill(self, ids: list[int]) -> None:
        """Run the prompt from position 0; the next token is then read with logits() or next_token()."""
        n = len(ids)
        if not 0 < n < self.seq:
            raise PromptTooLong(f"prompt of {n} tokens does not fit seq_length {self.seq} (at most {self.seq - 1})")
        _, self.prefill_traffic = self._counted(self.walk.prefill, ids)
        self.decode_traffic, self.decoded = Traffic(), 0
        self.length = n

    def decode(self, token: int) -> None:
        """Feed one token at position `length`."""
        pos = self.length
        if pos >= self.seq:
            raise PromptTooLong(f"the KV cache is full ({self.seq} tokens)")
        self.decode_traffic += self._counted(self.walk.decode, token, pos)[1]
        self.decoded += 1
        self.length = pos + 1

    def logits(self) -> np.ndarray:
        """The last step's logits [V], float32 (all of them cross to the host: the checks use it)."""
        return self.walk.logits()

    def next_token(self, sampler, seen: list[int]) -> int:
        """The next token: chosen on the device where the bmodel can, else by `sampler` on the host.
        Its reads count towards the step just run."""
        token, traffic = self._counted(self._choose, sampler, seen)
        if self.decoded:
            self.decode_traffic += traffic
        else:
            self.prefill_traffic += traffic
        return token

    def _choose(self, sampler, seen: list[int]) -> int:
        p, token, head = sampler.params, None, self.walk.info.get("sample_head", 0)
        if sampler.greedy:
            token = self.walk.token()
        elif p.temperature == 0 and head:  # greedy after the repetition penalty: the head's top 1
            probs, ids = self.walk.candidates(p.repetition_penalty, 1.0, 1, 1.0)
            if probs[1] == 0:  # else tokens tie for the top, and the host's rule picks among them
                token = int(ids[0])
        elif p.temperature > 0 and 0 < p.top_k < head:
            probs, ids = self.walk.candidates(p.repetition_penalty, p.temperature, p.top_k, p.top_p)
            if probs[-1] == 0:  # else the last candidate ties with tokens it had no room for
                token = sampler.draw(probs, ids)
        if token is None:
            token = sampler(self.walk.logits(), seen)
        return token

    def greedy(self, ids: list[int], new_tokens: int, stops=()) -> list[int]:
        """The greedy continuation of `ids`: `new_tokens` long, or up to and including a stop token."""
        from .sampling import Sampler, SamplingParams

        sampler, out = Sampler(SamplingParams()), []
        self.prefill(ids)
        while True:
            out.append(self.next_token(sampler, ids + out))
            if len(out) == new_tokens or out[-1] in stops:
                return out
            self.decode(out[-1])

    def logits_along(self, ids: list[int], steps: int, fed: list[int] | None = None) -> list[np.ndarray]:
        """The logits of `steps` steps after `ids`, each step's argmax fed back, or `fed[k]` at step k
        (teacher forcing: two models compared on the same path)."""
        self.prefill(ids)
        logits = [self.logits()]
        for k in range(steps - 1):
            self.decode(int(np.argmax(logits[-1])) if fed is None else fed[k])
            logits.append(self.logits())
        return logits
