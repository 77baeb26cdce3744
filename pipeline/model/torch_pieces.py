"""torch modules for each piece, wrapping transformers' own layers (no copy of their math).

Weights come one piece at a time from the tensor map (see patch.py), so building a piece needs
the memory of that piece only. Modules are built on the meta device and filled with `assign=True`.
"""
import torch
from torch import nn

from runtime.nets import LINEAR_KINDS, TOP_K_MAX

from ..families import canonical_classes, hf_config


class _RecordingCache:
    """Stands in for transformers' Cache: keeps the new K/V (after RoPE) and, for decode,
    returns them appended to the history, as the attention expects."""

    def __init__(self, history_k=None, history_v=None):
        self.history_k, self.history_v = history_k, history_v

    def update(self, key, value, layer_idx, *args, **kwargs):
        self.key, self.value = key, value
        if self.history_k is None:
            return key, value
        return torch.cat([self.history_k, key], dim=2), torch.cat([self.history_v, value], dim=2)


class _StateCache:
    """Stands in for transformers' cache for one linear-attention layer: gives it the conv and
    recurrent states of the net's inputs and keeps what it writes back. It answers that it records
    the past, so transformers takes its out-of-place path (cat, then convolve) for one token too."""

    def __init__(self, conv_state, recurrent_state):
        self.conv_state, self.recurrent_state = conv_state, recurrent_state

    def get_conv_state(self, layer_idx, state_idx=0):
        return self.conv_state

    def get_recurrent_state(self, layer_idx, state_idx=0):
        return self.recurrent_state

    def is_recording_past(self, layer_idx):
        return True

    def update_conv_state(self, new_columns, layer_idx, state_idx=0, conv_kernel_size=None, **kwargs):
        full = torch.cat([self.conv_state, new_columns], dim=-1)
        self.next_conv_state = full[..., -self.conv_state.shape[-1]:]  # the last K columns, as transformers keeps
        return full

    def update_recurrent_state(self, recurrent_state, layer_idx, state_idx=0, **kwargs):
        self.next_recurrent_state = recurrent_state
        return recurrent_state


class LinearBlockNet(nn.Module):
    """block_i and block_cache_i of a linear-attention layer (Qwen3.5's Gated DeltaNet): one
    transformers decoder layer over the given tokens, from the given states to the next ones."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer

    def forward(self, input_states, conv_state, recurrent_state):
        cache = _StateCache(conv_state, recurrent_state)
        hidden = self.layer(input_states, position_embeddings=None, attention_mask=None, past_key_values=cache)
        return hidden, cache.next_conv_state, cache.next_recurrent_state


class EmbeddingNet(nn.Module):
    def __init__(self, embed: nn.Embedding):
        super().__init__()
        self.embed = embed

    def forward(self, input_ids):
        return self.embed(input_ids)


class BlockNet(nn.Module):
    """block_i (no history) and block_cache_i (with history): one transformers decoder layer.
    RoPE comes from tables of cos/sin for positions 0..SEQ-1 computed by transformers' own
    rotary module, gathered by position_ids (robust once quantized: no cos of large angles)."""

    def __init__(self, layer: nn.Module, cos: torch.Tensor, sin: torch.Tensor):
        super().__init__()
        self.layer = layer
        self.register_buffer("cos_table", cos)
        self.register_buffer("sin_table", sin)

    def forward(self, input_states, position_ids, attention_mask, history_k=None, history_v=None):
        # The net interface keeps K/V as [1, S, KVH, D]; transformers works in [1, KVH, S, D].
        cache = _RecordingCache(None if history_k is None else history_k.transpose(1, 2),
                                None if history_v is None else history_v.transpose(1, 2))
        position_embeddings = (self.cos_table[position_ids], self.sin_table[position_ids])
        hidden = self.layer(input_states, attention_mask=attention_mask, past_key_values=cache,
                            position_embeddings=position_embeddings)
        return hidden, cache.key.transpose(1, 2), cache.value.transpose(1, 2)


class LmHeadNet(nn.Module):
    def __init__(self, norm: nn.Module, head: nn.Linear):
        super().__init__()
        self.norm, self.head = norm, head

    def forward(self, hidden_states):
        return self.head(self.norm(hidden_states))


class GreedyHeadNet(nn.Module):
    """The argmax of the logits, as a [1,1] int32 token."""

    def forward(self, logits):
        return torch.topk(logits, 1, dim=1).indices.to(torch.int32)


class SampleHeadNet(nn.Module):
    """runtime/sampling.py's rule on the device, up to the draw: the repetition penalty on the
    tokens so far, the top TOP_K_MAX + 1 by value, temperature, top-k (1..TOP_K_MAX), then the
    smallest set whose probability reaches top_p. Returns the candidates' probabilities (0 where
    cut) and ids. Where the last candidate is kept, equally likely tokens may lie beyond it: the
    runtime then samples on the host."""
    MASKED = -1e30

    def __init__(self, vocab: int):
        super().__init__()
        self.k = min(TOP_K_MAX + 1, vocab)  # one more than the largest top-k: a tie there shows

    def forward(self, logits, input_ids, penalty, temperature, top_k, top_p):
        ids = input_ids.to(torch.int64)
        seen = torch.gather(logits, 1, ids)  # repeated ids write the same value twice: harmless
        logits = logits.scatter(1, ids, torch.where(seen > 0, seen / penalty, seen * penalty))
        values, indices = torch.topk(logits, self.k, dim=1)
        # top-k keeps every candidate as large as the k-th (ties too, as the host and transformers do)
        kth = torch.gather(values, 1, (top_k.to(torch.int64) - 1).clamp(0, self.k - 1).reshape(1, 1))
        values = torch.where(values >= kth, values / temperature, self.MASKED)
        probs = torch.softmax(values, dim=1)
        # top-p: a candidate stays if what is more likely than it sums to less than top_p. Ties stay
        # or go together, whatever order TopK gave them: every candidate as likely as the last one
        # kept stays (the same gather as top-k's; a pairwise comparison miscompiles)
        above = torch.cumsum(probs, dim=1) - probs
        last = ((above < top_p).to(torch.float32).sum(dim=1, keepdim=True) - 1).clamp(0, self.k - 1)
        values = torch.where(probs >= torch.gather(probs, 1, last.to(torch.int64)), values, self.MASKED)
        return torch.softmax(values, dim=1), indices.to(torch.int32)


def _filled(module: nn.Module, weights: dict) -> nn.Module:
    module.load_state_dict(weights, strict=True, assign=True)
    return module.eval()


def build_piece(kind: str, layer: int | None, config: dict, load) -> nn.Module:
    """The torch module of a piece; `load(canonical_name)` returns a float32 tensor."""
    if kind == "greedy_head":
        return GreedyHeadNet().eval()
    if kind == "sample_head":
        return SampleHeadNet(config["vocab_size"]).eval()
    hf = hf_config(config)
    classes = canonical_classes(config["model_type"])
    if kind in ("embedding", "embedding_cache"):
        with torch.device("meta"):
            embed = nn.Embedding(config["vocab_size"], config["hidden_size"])
        return EmbeddingNet(_filled(embed, {"weight": load("model.embed_tokens.weight")}))
    if kind == "lm_head":
        with torch.device("meta"):
            norm = classes.rms_norm(config["hidden_size"], eps=config["rms_norm_eps"])
            head = nn.Linear(config["hidden_size"], config["vocab_size"], bias=False)
        head_name = "model.embed_tokens.weight" if config.get("tie_word_embeddings") else "lm_head.weight"
        return LmHeadNet(_filled(norm, {"weight": load("model.norm.weight")}),
                         _filled(head, {"weight": load(head_name)}))
    with torch.device("meta"):
        decoder = classes.decoder_layer(hf, layer)
    prefix = f"model.layers.{layer}."
    decoder = _filled(decoder, {k: load(prefix + k) for k in decoder.state_dict()})
    if kind in LINEAR_KINDS:
        return LinearBlockNet(decoder).eval()
    rotary = classes.rotary_embedding(hf)
    positions = torch.arange(config["seq_length"])[None]
    cos, sin = rotary(torch.zeros(1), positions)
    return BlockNet(decoder, cos[0], sin[0]).eval()
