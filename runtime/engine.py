"""Prefill + decode over the fixed-length KV cache of the net interface (see runtime/nets.py).

The engine keeps the conversation's length and asks a walk over the nets for each step:
  - a backend with `walk()` gives its own (the bmodel backend's keeps the state on the device:
    runtime/device_walk.py);
  - a backend with only `run(net, feeds) -> outputs` (onnxruntime, the BM runtime's copy path, the
    build's pyruntime_bm and verify's comparing backend) is walked by HostWalk, with the cache in
    host arrays.
Every user of a model (the chat, the server, `doit verify`, the benchmarks) goes through Engine.
The cache holds SEQ slots per layer; the decode mask covers them plus the current token at index SEQ
(a decode stage, built with chunk=C, attends over the first K slots only: decode_stage).

The engine remembers which tokens the cache holds: a prompt that extends them (a chat's next turn,
a server request that continues a conversation) prefills only what is new, with the history
prefill nets (`block_kv_i`, built with `history=1`) against the cache; a prompt longer than a chunk
goes in chunks (prefill_plan).
"""
from dataclasses import dataclass, replace

import numpy as np

from .nets import ModelInfo, block_cache_net, block_kv_net, block_net
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
    """[1,1,1,SEQ+1]: the `pos` filled cache slots and the current token (index SEQ); for a decode
    stage, SEQ is its cache length."""
    mask = np.full((1, 1, 1, seq + 1), MASK_VALUE, np.float32)
    mask[..., :pos] = 0.0
    mask[..., seq] = 0.0
    return mask


def history_mask(begin: int, length: int, rows: int, history: int) -> np.ndarray:
    """[1,1,rows,history+rows] for block_kv: each of the `length` new tokens sees the `begin`
    tokens in the cache (the first `history` slots are given) and the new ones up to itself;
    padding rows see only themselves."""
    mask = np.full((rows, history + rows), MASK_VALUE, np.float32)
    mask[:length, :begin] = 0.0
    mask[:, history:] = np.triu(np.full((rows, rows), MASK_VALUE, np.float32), 1)
    mask[length:, history:] = MASK_VALUE
    mask[np.arange(rows), history + np.arange(rows)] = 0.0
    return mask[None, None]


@dataclass(frozen=True)
class Chunk:
    """One prefill run: tokens [begin, end) through `net` ("block" or "block_kv")."""
    net: str
    begin: int
    end: int
    rows: int      # the rows the net runs: the chunk's length (dynamic), else the net's own length
    history: int   # block_kv: the cache slots it is given (`begin` if dynamic, else SEQ)

    def positions(self, seq: int) -> np.ndarray:
        """[1,rows]: the tokens' positions (padding rows stay inside the RoPE table)."""
        return np.minimum(self.begin + np.arange(self.rows, dtype=np.int32), seq - 1)[None]

    def mask(self) -> np.ndarray:
        if self.net == "block":
            return prefill_mask(self.end, self.rows)
        return history_mask(self.begin, self.end - self.begin, self.rows, self.history)


def prefill_plan(info: ModelInfo, start: int, n: int) -> list[Chunk]:
    """The runs that prefill tokens [start, n) when the cache holds the first `start`.
    info: seq; prefill_rows (block_i's length, SEQ unless built shorter) and dynamic; history
    (block_kv's chunk length, 0 without those nets) and history_dynamic. From position 0 a static
    build prefers block_kv chunks when they run fewer rows than block_i's whole window."""
    seq, block_rows, chunk = info.seq, info.prefill_rows, info.history
    runs, pos = [], start
    if pos == 0 and not (chunk and not info.dynamic and -(-n // chunk) * chunk < block_rows):
        end = min(n, block_rows)
        runs.append(Chunk("block", 0, end, end if info.dynamic else block_rows, 0))
        pos = end
    while pos < n:
        if not chunk:
            why = info.history_unusable or "the bmodel has no history nets to prefill the rest"
            raise PromptTooLong(f"prompt of {n} tokens is longer than the prefill net ({block_rows} tokens), and {why} "
                                "(build it with this project's history=1)")
        end, dynamic = min(n, pos + chunk), info.history_dynamic
        runs.append(Chunk("block_kv", pos, end, end - pos if dynamic else chunk, pos if dynamic else seq))
        pos = end
    return runs


def decode_stage(info: ModelInfo, pos: int) -> int:
    """The cache length a step at `pos` attends over: the shortest decode stage that holds the `pos`
    filled slots (info.stages, built with chunk=C: C, 2C, 4C ... and SEQ), else SEQ."""
    return min((k for k in info.stages if k >= pos), default=info.seq)


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


def scored_rows(first: int, begin: int, end: int) -> range:
    """The rows of a prefill's last run (positions begin .. end-1) that hold positions first .. end-1."""
    if not begin <= first < end:
        raise ValueError(f"positions {first}..{end - 1} are not all in the prefill's last run ({begin}..{end - 1}): a "
                         "bmodel that prefills in chunks (history=1) keeps only the last chunk's hidden states")
    return range(first - begin, end - begin)


class HostWalk:
    """The nets run from host arrays, the K/V cache kept on the host: `run(net, feeds)` per net."""

    def __init__(self, backend):
        self.backend = backend
        self.info = replace(backend.info, greedy_head=False, sample_head=0)  # the host chooses
        self.seq, self.layers = self.info.seq, self.info.num_layers
        self.linear = set(self.info.linear_layers)
        shape = (1, self.seq, self.info.kv_heads, self.info.head_dim)
        self.k = [None if i in self.linear else np.zeros(shape, np.float32) for i in range(self.layers)]
        self.v = [None if i in self.linear else np.zeros(shape, np.float32) for i in range(self.layers)]
        self.states = {}  # a linear-attention layer's (conv, recurrent) state
        self._logits = None

    @property
    def traffic(self) -> Traffic | None:
        return getattr(self.backend, "traffic", None)

    def prefill(self, ids: list[int], start: int = 0) -> None:
        """Tokens ids[start:] at their positions, the cache holding the first `start` (prefill_plan)."""
        run, embed_rows = self.backend.run, self.info.embed_rows
        if start == 0:
            self.states = {i: (np.zeros(self.info.conv_state, np.float32),
                               np.zeros(self.info.recurrent_state, np.float32)) for i in self.linear}
        for c in prefill_plan(self.info, start, len(ids)):
            (hidden,) = run("embedding", {"input_ids": pad_ids(ids[c.begin:c.end], embed_rows)})
            hidden, feeds = hidden[:, :c.rows], {"position_ids": c.positions(self.seq), "attention_mask": c.mask()}
            for i in range(self.layers):
                if i in self.linear:
                    hidden = self._linear(i, hidden, c.end - c.begin)
                elif c.net == "block":
                    hidden, k, v = run(block_net(i), {"input_states": hidden, **feeds})
                    self.k[i][:, :c.rows], self.v[i][:, :c.rows] = k, v
                else:
                    hidden, k, v = run(block_kv_net(i), {"input_states": hidden, **feeds,
                                                         "history_k": self.k[i][:, :c.history],
                                                         "history_v": self.v[i][:, :c.history]})
                    new = c.end - c.begin  # the real rows: padding rows never reach the cache
                    self.k[i][:, c.begin:c.end], self.v[i][:, c.begin:c.end] = k[:, :new], v[:, :new]
        self._last_run = (c.begin, hidden[:, :c.end - c.begin])  # its rows' hidden states: prompt_logits
        self._head(hidden[:, c.end - c.begin - 1])

    def prompt_logits(self, first: int = 0) -> np.ndarray:
        """The logits [n - first, V] of positions first .. n-1 of the last prefill: each row of its
        last run through lm_head (teacher forcing in one prefill: pipeline/stages/quality.py)."""
        begin, hidden = self._last_run
        logits = []
        for row in scored_rows(first, begin, begin + hidden.shape[1]):
            self._head(hidden[:, row])
            logits.append(self.logits())
        return np.stack(logits)

    def decode(self, token: int, pos: int) -> None:
        stage = decode_stage(self.info, pos)
        run, mask = self.backend.run, decode_mask(pos, stage)
        (hidden,) = run("embedding_cache", {"input_ids": np.array([[token]], np.int32)})
        position = np.array([[pos]], np.int32)
        for i in range(self.layers):
            if i in self.linear:
                hidden = self._linear_step(i, hidden)
                continue
            hidden, k, v = run(block_cache_net(i), {
                "input_states": hidden, "position_ids": position, "attention_mask": mask,
                "history_k": self.k[i][:, :stage], "history_v": self.v[i][:, :stage]})
            self.k[i][:, pos], self.v[i][:, pos] = k[:, 0], v[:, 0]
        self._head(hidden[:, 0])

    def _linear(self, i: int, hidden: np.ndarray, n: int) -> np.ndarray:
        """A linear-attention layer over the first n rows: whole windows through block_i, the rest
        through block_cache_i token by token, its state carried along (padding rows pass as they are)."""
        out, window, t = hidden.copy(), self.info.window, 0
        while t + window <= n:
            out[:, t:t + window] = self._linear_step(i, hidden[:, t:t + window], block_net(i))
            t += window
        for t in range(t, n):
            out[:, t:t + 1] = self._linear_step(i, hidden[:, t:t + 1])
        return out

    def _linear_step(self, i: int, hidden: np.ndarray, net: str = "") -> np.ndarray:
        conv, recurrent = self.states[i]
        hidden, conv, recurrent = self.backend.run(net or block_cache_net(i), {
            "input_states": np.ascontiguousarray(hidden), "conv_state": conv, "recurrent_state": recurrent})
        self.states[i] = (conv, recurrent)
        return hidden

    def _head(self, hidden: np.ndarray) -> None:
        self._hidden, self._logits = np.ascontiguousarray(hidden), None  # lm_head runs when asked for

    def logits(self) -> np.ndarray:
        if self._logits is None:
            (logits,) = self.backend.run("lm_head", {"hidden_states": self._hidden})
            self._logits = logits[0]
        return self._logits

    def token(self) -> int | None:
        return None

    def rewind(self, tokens: list[int]) -> None:
        """The cache keeps `tokens` (Engine.rewind): until the next step, no logits to read."""
        self._hidden = self._logits = None


class Engine:
    def __init__(self, backend, walk=None):
        """`walk`: instead of the backend's own (e.g. HostWalk(backend), to compare the two)."""
        self.backend = backend
        self.walk = walk or (backend.walk() if hasattr(backend, "walk") else HostWalk(backend))
        self.seq, self.layers = self.walk.info.seq, self.walk.info.num_layers
        self.length = 0
        self.tokens: list[int] = []  # what the cache holds, from position 0
        self.reused = 0  # the last prompt's tokens found in the cache (not run again)
        self.missed = 0  # ... and those a model without history nets ran again
        # what the device was asked for, per phase (None where the backend has no device)
        self.prefill_traffic, self.decode_traffic, self.decoded = Traffic(), Traffic(), 0

    def _counted(self, step, *args) -> tuple:
        """step(*args), and what it made cross between host and device."""
        before = self.walk.traffic.copy() if self.walk.traffic is not None else None
        result = step(*args)
        return result, (self.walk.traffic - before if before is not None else Traffic())

    def prefill(self, ids: list[int]) -> None:
        """Run the prompt; the next token is then read with logits() or next_token(). What the cache
        already holds of it (the longest common start) is not run again, where the bmodel has the
        history nets; `reused` says how much that was."""
        n = len(ids)
        if not 0 < n < self.seq:
            raise PromptTooLong(f"prompt of {n} tokens does not fit seq_length {self.seq} (at most {self.seq - 1})")
        start = self.reusable(ids)
        self.forget()  # until the prefill is done, the cache holds nothing certain
        _, self.prefill_traffic = self._counted(self.walk.prefill, ids, start)
        self.decode_traffic, self.decoded = Traffic(), 0
        self.tokens, self.length, self.reused = list(ids), n, start

    def reusable(self, ids: list[int]) -> int:
        """How many of `ids` the cache holds and the walk can keep (at least the last one runs again:
        its logits are the answer's start)."""
        same = 0
        for a, b in zip(self.tokens, ids[:-1]):
            if a != b:
                break
            same += 1
        if same < len(self.tokens) and self.walk.info.linear_layers:
            same = 0  # a linear-attention state holds every token so far: it cannot go back to fewer
        self.missed = 0 if self.walk.info.history else same  # a model without history nets runs them again
        return same - self.missed

    def forget(self) -> None:
        """The next prompt prefills from position 0 (the cache's content is then overwritten)."""
        self.tokens, self.length = [], 0

    def rewind(self, n: int) -> None:
        """Keep the cache's first n tokens: the next decode runs at position n as after a prefill of
        those alone, since a KV cache's later slots stay masked until a step overwrites them (the
        simulator's verify continues an answer's teacher-forced prefill from its question). A
        linear-attention state holds every token so far: it cannot go back."""
        if self.walk.info.linear_layers:
            raise ValueError("a linear-attention layer's state holds every token so far: it cannot go back")
        if not 0 < n <= self.length:
            raise ValueError(f"cannot keep {n} tokens of a cache that holds {self.length}")
        self.tokens, self.length = self.tokens[:n], n
        self.walk.rewind(self.tokens)

    def decode(self, token: int) -> None:
        """Feed one token at position `length`."""
        pos = self.length
        if pos >= self.seq:
            raise PromptTooLong(f"the KV cache is full ({self.seq} tokens)")
        try:
            self.decode_traffic += self._counted(self.walk.decode, token, pos)[1]
        except BaseException:  # a step cut short (Ctrl-C, a failure): what the cache holds is not known
            self.forget()
            raise
        self.decoded += 1
        self.tokens.append(token)
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
        p, token, head = sampler.params, None, self.walk.info.sample_head
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

    def prompt_logits(self, ids: list[int], first: int = 0) -> np.ndarray:
        """The logits [len(ids) - first, V] at positions first .. len(ids)-1 of `ids`, after one
        prefill from position 0: the logits at position p score ids[p + 1] (teacher forcing)."""
        self.forget()  # every position's hidden state is wanted: none from the cache
        self.prefill(ids)
        return self.walk.prompt_logits(first)

    def logits_along(self, ids: list[int], steps: int, fed: list[int] | None = None) -> list[np.ndarray]:
        """The logits of `steps` steps after `ids`, each step's argmax fed back, or `fed[k]` at step k
        (teacher forcing: two models compared on the same path)."""
        self.prefill(ids)
        logits = [self.logits()]
        for k in range(steps - 1):
            self.decode(int(np.argmax(logits[-1])) if fed is None else fed[k])
            logits.append(self.logits())
        return logits
