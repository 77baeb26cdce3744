"""The net interface (DESIGN.md): which pieces a model is cut into, their inputs and outputs,
and the torch modules that wrap transformers' own layers for each piece.

SEQ = seq_length, H = hidden, KVH = key/value heads, D = head dim, V = vocabulary.
  embedding        input_ids [1,SEQ] int32                        -> hidden_states [1,SEQ,H]
  embedding_cache  input_ids [1,1] int32                          -> hidden_states [1,1,H]
  block_i          input_states [1,SEQ,H], position_ids [1,SEQ], attention_mask [1,1,SEQ,SEQ]
                                                                   -> hidden_states, past_k, past_v [1,SEQ,KVH,D]
  block_cache_i    input_states [1,1,H], position_ids [1,1], attention_mask [1,1,1,SEQ+1],
                   history_k, history_v [1,SEQ,KVH,D]             -> hidden_states [1,1,H], past_k, past_v [1,1,KVH,D]
  block_kv_i       input_states [1,C,H], position_ids [1,C], attention_mask [1,1,C,SEQ+C],
                   history_k, history_v [1,SEQ,KVH,D]             -> hidden_states [1,C,H], past_k, past_v [1,C,KVH,D]
  lm_head          hidden_states [1,H] (final norm inside)        -> logits [1,V]
  greedy_head      logits [1,V]                                   -> token_id [1,1] int32
  sample_head      logits [1,V], input_ids [1,SEQ] int32 (the tokens so far, padded with the first),
                   penalty, temperature [1], top_k [1] int32, top_p [1]
                                                                   -> probs, token_ids [1,TOP_K_MAX+1]
The heads choose the next token on the device, as tpu-mlir's llm_convert.py --do_sample builds them:
greedy_head the argmax, sample_head the candidates the host draws from (runtime/sampling.py's rule).
block_kv_i (`history=1`, llm_convert --use_history_kv) prefills C = `chunk` new tokens against the
history already in the cache: a chat's later turns, and prompts longer than a chunk, chunk by chunk.
Decode stages (`chunk=C`, llm_convert --chunk_length): block_cache_i also at cache lengths C, 2C,
4C ... < SEQ (history [1,K,KVH,D], mask [1,1,1,K+1]), combined as stages of the one net and
sharing its io_alone memory: a step attends over the shortest stage that holds the cache.
Masks are additive: 0 attends, runtime.engine.MASK_VALUE masks (see its mask builders).
"""
from dataclasses import dataclass, replace

# the kinds compiled dynamic with `dynamic=1` (llm_convert --dynamic): the prefill, run at the
# prompt's length; the export frees their lengths (export.free_prefill_lengths)
DYNAMIC_KINDS = ("block", "block_kv")
TOP_K_MAX = 50  # the sample head's top-k (llm_convert's too); it returns one candidate more, to see a tie at the cut


@dataclass(frozen=True)
class Piece:
    name: str
    kind: str            # embedding | embedding_cache | block | block_cache | lm_head
    group: str           # the weight group it reads (see patch.weight_groups)
    layer: int | None = None
    chunk: int = 0       # block_kv: the new tokens per run
    stage: int = 0       # block_cache: a decode stage's cache length (0: the whole SEQ)

    @property
    def file(self) -> str:
        """Its artifacts' name: a block_kv of each chunk length and a block_cache of each stage have
        their own (switching back is free); the net's name stays the piece's."""
        if self.chunk:
            return f"{self.name}_c{self.chunk}"
        return f"{self.name}_kv{self.stage}" if self.stage else self.name


def decode_stages(seq: int, chunk: int) -> tuple[int, ...]:
    """The decode stages' cache lengths below SEQ, as llm_convert makes them: C, 2C, 4C ... < SEQ."""
    stages = []
    while 0 < chunk < seq:
        stages.append(chunk)
        chunk *= 2
    return tuple(stages)


def model_pieces(num_layers: int, history: int = 0, stages: tuple[int, ...] = ()) -> list[Piece]:
    """The pieces of a model; `history` = C adds the block_kv_i that prefill C tokens against the
    cache, `stages` the block_cache_i that attend over a shorter cache (each after its SEQ one:
    the combined net's stage 0 is the whole cache)."""
    pieces = [Piece("embedding", "embedding", "embed"), Piece("embedding_cache", "embedding_cache", "embed")]
    for i in range(num_layers):
        pieces.append(Piece(f"block_{i}", "block", f"layer_{i}", i))
        pieces.append(Piece(f"block_cache_{i}", "block_cache", f"layer_{i}", i))
        pieces += [Piece(f"block_cache_{i}", "block_cache", f"layer_{i}", i, stage=k) for k in stages]
        if history:
            pieces.append(Piece(f"block_kv_{i}", "block_kv", f"layer_{i}", i, history))
    pieces.append(Piece("lm_head", "lm_head", "head"))
    pieces += [Piece("greedy_head", "greedy_head", "head"), Piece("sample_head", "sample_head", "head")]
    return pieces


@dataclass(frozen=True)
class Dims:
    seq: int
    num_layers: int
    hidden: int
    kv_heads: int
    head_dim: int
    vocab: int
    chunk: int = 0  # block_kv's new tokens (not in the config: a build variable)
    stages: tuple[int, ...] = ()  # the decode stages' cache lengths below SEQ (a build variable too)

    @classmethod
    def from_config(cls, config: dict, chunk: int = 0, stages: tuple[int, ...] = ()) -> "Dims":
        head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
        return cls(config["seq_length"], config["num_hidden_layers"], config["hidden_size"],
                   config["num_key_value_heads"], head_dim, config["vocab_size"], chunk, tuple(stages))

    def pieces(self) -> list[Piece]:
        return model_pieces(self.num_layers, self.chunk, self.stages)

    def of(self, piece: Piece) -> "Dims":
        """The dims a piece's shapes follow: a decode stage's cache is shorter than SEQ."""
        return replace(self, seq=piece.stage) if piece.stage else self


def io_spec(kind: str, d: Dims) -> tuple[list[tuple[str, tuple, str]], list[str]]:
    """(inputs as (name, shape, dtype), output names) of a piece kind."""
    kv = (1, d.seq, d.kv_heads, d.head_dim)
    block_out = ["hidden_states", "past_k", "past_v"]
    return {
        "embedding": ([("input_ids", (1, d.seq), "int32")], ["hidden_states"]),
        "embedding_cache": ([("input_ids", (1, 1), "int32")], ["hidden_states"]),
        "block": ([("input_states", (1, d.seq, d.hidden), "float32"), ("position_ids", (1, d.seq), "int32"),
                   ("attention_mask", (1, 1, d.seq, d.seq), "float32")], block_out),
        "block_kv": ([("input_states", (1, d.chunk, d.hidden), "float32"), ("position_ids", (1, d.chunk), "int32"),
                      ("attention_mask", (1, 1, d.chunk, d.seq + d.chunk), "float32"),
                      ("history_k", kv, "float32"), ("history_v", kv, "float32")], block_out),
        "block_cache": ([("input_states", (1, 1, d.hidden), "float32"), ("position_ids", (1, 1), "int32"),
                         ("attention_mask", (1, 1, 1, d.seq + 1), "float32"),
                         ("history_k", kv, "float32"), ("history_v", kv, "float32")], block_out),
        "lm_head": ([("hidden_states", (1, d.hidden), "float32")], ["logits"]),
        "greedy_head": ([("logits", (1, d.vocab), "float32")], ["token_id"]),
        "sample_head": ([("logits", (1, d.vocab), "float32"), ("input_ids", (1, d.seq), "int32"),
                         ("penalty", (1,), "float32"), ("temperature", (1,), "float32"), ("top_k", (1,), "int32"),
                         ("top_p", (1,), "float32")], ["probs", "token_ids"]),
    }[kind]
