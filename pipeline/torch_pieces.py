"""torch modules for each piece, wrapping transformers' own layers (no copy of their math).

Weights come one piece at a time from the tensor map (see patch.py), so building a piece needs
the memory of that piece only. Modules are built on the meta device and filled with `assign=True`.
"""
import torch
from torch import nn

from .families import family_classes, load_hf_config


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


def _filled(module: nn.Module, weights: dict) -> nn.Module:
    module.load_state_dict(weights, strict=True, assign=True)
    return module.eval()


def build_piece(kind: str, layer: int | None, config: dict, load) -> nn.Module:
    """The torch module of a piece; `load(canonical_name)` returns a float32 tensor."""
    hf_config = load_hf_config(config)
    classes = family_classes(config["model_type"])
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
        decoder = classes.decoder_layer(hf_config, layer)
    prefix = f"model.layers.{layer}."
    decoder = _filled(decoder, {k: load(prefix + k) for k in decoder.state_dict()})
    rotary = classes.rotary_embedding(hf_config)
    positions = torch.arange(config["seq_length"])[None]
    cos, sin = rotary(torch.zeros(1), positions)
    return BlockNet(decoder, cos[0], sin[0]).eval()
