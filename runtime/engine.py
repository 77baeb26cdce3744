"""Prefill + decode over the fixed-length KV cache of the net interface (see pipeline/pieces.py).

Backend-agnostic: a backend has `info` (seq, num_layers, kv_heads, head_dim) and
`run(net, feeds) -> outputs`. The cache holds SEQ slots per layer; the decode mask covers them
plus the current token at index SEQ.
"""
import numpy as np

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


class Engine:
    def __init__(self, backend):
        self.backend = backend
        info = backend.info
        self.seq, self.layers = info["seq"], info["num_layers"]
        shape = (1, self.seq, info["kv_heads"], info["head_dim"])
        self.k = [np.zeros(shape, np.float32) for _ in range(self.layers)]
        self.v = [np.zeros(shape, np.float32) for _ in range(self.layers)]
        self.length = 0

    def prefill(self, ids: list[int]) -> np.ndarray:
        """Run the prompt; returns the logits of its last token."""
        n = len(ids)
        if not 0 < n < self.seq:
            raise PromptTooLong(f"prompt of {n} tokens does not fit seq_length {self.seq} (at most {self.seq - 1})")
        positions = np.arange(self.seq, dtype=np.int32)[None]
        mask = prefill_mask(n, self.seq)
        (hidden,) = self.backend.run("embedding", {"input_ids": pad_ids(ids, self.seq)})
        for i in range(self.layers):
            hidden, self.k[i], self.v[i] = self.backend.run(
                f"block_{i}", {"input_states": hidden, "position_ids": positions, "attention_mask": mask})
        self.length = n
        return self._head(hidden[:, n - 1])

    def decode(self, token: int) -> np.ndarray:
        """Feed one token at position `length`; returns the next logits."""
        pos = self.length
        if pos >= self.seq:
            raise PromptTooLong(f"the KV cache is full ({self.seq} tokens)")
        mask = decode_mask(pos, self.seq)
        (hidden,) = self.backend.run("embedding_cache", {"input_ids": np.array([[token]], np.int32)})
        position = np.array([[pos]], np.int32)
        for i in range(self.layers):
            hidden, k, v = self.backend.run(f"block_cache_{i}", {
                "input_states": hidden, "position_ids": position, "attention_mask": mask,
                "history_k": self.k[i], "history_v": self.v[i]})
            self.k[i][:, pos], self.v[i][:, pos] = k[:, 0], v[:, 0]
        self.length = pos + 1
        return self._head(hidden[:, 0])

    def _head(self, hidden: np.ndarray) -> np.ndarray:
        (logits,) = self.backend.run("lm_head", {"hidden_states": np.ascontiguousarray(hidden)})
        return logits[0]

    def greedy(self, ids: list[int], new_tokens: int) -> list[int]:
        """The greedy continuation of `ids`, exactly `new_tokens` long (no stop token)."""
        logits = self.prefill(ids)
        out = []
        for step in range(new_tokens):
            out.append(int(np.argmax(logits)))
            if step + 1 < new_tokens:
                logits = self.decode(out[-1])
        return out
