"""The net contract, the one place both sides read it: which pieces (nets) a model is cut into,
their names, inputs and outputs (the export writes them so, the compiler keeps them, the runtime
runs them); what the engine knows of a model's nets (ModelInfo), read from an LLM bmodel's nets
(describe_nets) or from an ONNX folder's manifest; and what a head that returns the chosen token
means as logits. Torch-free (the torch modules of each piece: pipeline/model/torch_pieces.py).

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

A linear-attention layer (Qwen3.5's Gated DeltaNet, `layer_types`) carries a state of fixed size
instead of a K/V cache: a convolution state CS = [1, CONV, K] (the last K input columns of its
short convolution) and a recurrent state RS = [1, VH, DK, DV]. Its nets take and return both:
  block_i          input_states [1,W,H], conv_state CS, recurrent_state RS
                                                                   -> hidden_states, next_conv_state, next_recurrent_state
  block_cache_i    input_states [1,1,H], conv_state CS, recurrent_state RS -> the same, for one token
block_i runs W = LINEAR_WINDOW tokens at a time (static: transformers' chunked rule unrolls its
chunks at export, so no length can vary); the runtime runs a prompt's whole windows through it and
the rest through block_cache_i, token by token, the state carried from one run to the next. A
linear layer has no history prefill net and no decode stages: its state is the whole history.
"""
import re
from dataclasses import dataclass, fields, replace
from pathlib import Path

import numpy as np

from .toolchain import ToolchainError

# the kinds compiled dynamic with `dynamic=1` (llm_convert --dynamic): the prefill, run at the
# prompt's length; the export frees their lengths (export.free_prefill_lengths)
DYNAMIC_KINDS = ("block", "block_kv")
LINEAR_KINDS = ("linear_block", "linear_cache")  # a linear-attention layer's two nets (Qwen3.5)
LINEAR_WINDOW = 16  # a linear-attention prefill net's tokens: one chunk of transformers' rule (export binds 16)
TOP_K_MAX = 50  # the sample head's top-k (llm_convert's too); it returns one candidate more, to see a tie at the cut


@dataclass(frozen=True)
class Piece:
    name: str
    kind: str            # embedding | embedding_cache | block | block_cache | block_kv | linear_block |
    #                      linear_cache | lm_head | greedy_head | sample_head
    group: str           # the weight group it reads (see pipeline/stages/mapping.py: weight_groups)
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


def model_pieces(num_layers: int, history: int = 0, stages: tuple[int, ...] = (),
                 linear_layers: tuple[int, ...] = ()) -> list[Piece]:
    """The pieces of a model; `history` = C adds the block_kv_i that prefill C tokens against the
    cache, `stages` the block_cache_i that attend over a shorter cache (each after its SEQ one:
    the combined net's stage 0 is the whole cache). `linear_layers` have their own two nets."""
    pieces = [Piece("embedding", "embedding", "embed"), Piece("embedding_cache", "embedding_cache", "embed")]
    for i in range(num_layers):
        if i in linear_layers:
            pieces += [Piece(block_net(i), "linear_block", f"layer_{i}", i),
                       Piece(block_cache_net(i), "linear_cache", f"layer_{i}", i)]
            continue
        pieces.append(Piece(block_net(i), "block", f"layer_{i}", i))
        pieces.append(Piece(block_cache_net(i), "block_cache", f"layer_{i}", i))
        pieces += [Piece(block_cache_net(i), "block_cache", f"layer_{i}", i, stage=k) for k in stages]
        if history:
            pieces.append(Piece(block_kv_net(i), "block_kv", f"layer_{i}", i, history))
    pieces.append(Piece("lm_head", "lm_head", "head"))
    pieces += [Piece("greedy_head", "greedy_head", "head"), Piece("sample_head", "sample_head", "head")]
    return pieces


@dataclass(frozen=True)
class LinearDims:
    """A linear-attention layer's state: conv [1, conv_dim, kernel], recurrent [1, v_heads, k_dim, v_dim]."""
    conv_dim: int
    kernel: int
    v_heads: int
    k_dim: int
    v_dim: int

    @classmethod
    def from_config(cls, config: dict) -> "LinearDims":
        k_heads, v_heads = config["linear_num_key_heads"], config["linear_num_value_heads"]
        k_dim, v_dim = config["linear_key_head_dim"], config["linear_value_head_dim"]
        return cls(2 * k_heads * k_dim + v_heads * v_dim, config["linear_conv_kernel_dim"], v_heads, k_dim, v_dim)


def linear_layers_of(config: dict) -> tuple[int, ...]:
    """The layers a config makes linear attention (transformers' `layer_types`)."""
    return tuple(i for i, t in enumerate(config.get("layer_types") or ()) if t == "linear_attention")


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
    linear_layers: tuple[int, ...] = ()  # the linear-attention layers (Qwen3.5), with their state's dims
    linear: LinearDims | None = None

    @classmethod
    def from_config(cls, config: dict, chunk: int = 0, stages: tuple[int, ...] = ()) -> "Dims":
        head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
        linear = linear_layers_of(config)
        return cls(config["seq_length"], config["num_hidden_layers"], config["hidden_size"],
                   config["num_key_value_heads"], head_dim, config["vocab_size"], chunk, tuple(stages),
                   linear, LinearDims.from_config(config) if linear else None)

    def pieces(self) -> list[Piece]:
        return model_pieces(self.num_layers, self.chunk, self.stages, self.linear_layers)

    def runtime_info(self) -> dict:
        """What the runtime's engine reads about the net interface (the ONNX folder's model.json):
        ModelInfo.from_manifest reads it, and the same from a bmodel's nets."""
        info = {"seq": self.seq, "num_layers": self.num_layers, "hidden_size": self.hidden,
                "kv_heads": self.kv_heads, "head_dim": self.head_dim, "vocab_size": self.vocab}
        if self.linear_layers:
            lin = self.linear
            info.update(linear_layers=list(self.linear_layers), window=LINEAR_WINDOW,
                        conv_state=[1, lin.conv_dim, lin.kernel], recurrent_state=[1, lin.v_heads, lin.k_dim, lin.v_dim])
        return info

    @property
    def first_attention(self) -> int:
        """The first layer with a K/V cache (the runtime reads the cache's dims from its nets)."""
        return next(i for i in range(self.num_layers) if i not in self.linear_layers)

    def of(self, piece: Piece) -> "Dims":
        """The dims a piece's shapes follow: a decode stage's cache is shorter than SEQ."""
        return replace(self, seq=piece.stage) if piece.stage else self


def io_spec(kind: str, d: Dims) -> tuple[list[tuple[str, tuple, str]], list[str]]:
    """(inputs as (name, shape, dtype), output names) of a piece kind."""
    kv = (1, d.seq, d.kv_heads, d.head_dim)
    block_out = ["hidden_states", "past_k", "past_v"]
    if kind in LINEAR_KINDS:
        rows, lin = LINEAR_WINDOW if kind == "linear_block" else 1, d.linear
        return ([("input_states", (1, rows, d.hidden), "float32"),
                 ("conv_state", (1, lin.conv_dim, lin.kernel), "float32"),
                 ("recurrent_state", (1, lin.v_heads, lin.k_dim, lin.v_dim), "float32")],
                ["hidden_states", "next_conv_state", "next_recurrent_state"])
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

def block_net(layer: int) -> str:
    """A layer's prefill net (block_i): the prompt's rows, or a linear layer's window."""
    return f"block_{layer}"


def block_cache_net(layer: int) -> str:
    """A layer's decode net (block_cache_i): one token against the cache, or a linear layer's step."""
    return f"block_cache_{layer}"


def block_kv_net(layer: int) -> str:
    """A layer's history prefill net (block_kv_i): a chunk of new tokens against the cache."""
    return f"block_kv_{layer}"


@dataclass(frozen=True)
class ModelInfo:
    """What the engine's walk needs to know of a model's nets. Never changed in place: a backend that
    chooses among the nets (a history chunk, decode stages) gives a copy with its choice
    (dataclasses.replace)."""
    seq: int                             # SEQ: the window, the K/V cache's slots
    num_layers: int
    hidden_size: int
    kv_heads: int
    head_dim: int
    vocab_size: int = 0                  # 0 where the head returns the chosen token
    model: str = ""                      # a bmodel's name (its file's stem)
    bmodel: str = ""
    first_attention: int = 0             # the first layer with a K/V cache: its nets' shapes every one shares
    dynamic: bool = False                # the prefill nets run at the prompt's length (dynamic=1, --dynamic)
    prefill_rows: int = 0                # block_i's length: SEQ, or llm_convert's --max_input_length (0: SEQ)
    embed_rows: int = 0                  # the embedding's length (0: SEQ)
    history: int = 0                     # block_kv_i's new tokens per run; 0: no history prefill nets
    history_dynamic: bool = False
    history_unusable: str | None = None  # why history nets there are cannot be used
    stages: tuple[int, ...] = ()         # the decode stages' cache lengths, SEQ last (empty: SEQ alone)
    head: str = "logits"                 # "token": lm_head returns the chosen token (llm_convert's)
    greedy_head: bool = False            # the heads that choose on the device
    sample_head: int = 0                 # the sample head's candidates (0: none)
    linear_layers: tuple[int, ...] = ()  # linear-attention layers (Qwen3.5), with their window and states
    window: int = 0
    conv_state: tuple[int, ...] = ()
    recurrent_state: tuple[int, ...] = ()

    def __post_init__(self):
        for name in ("prefill_rows", "embed_rows"):
            if not getattr(self, name):
                object.__setattr__(self, name, self.seq)

    @classmethod
    def from_manifest(cls, manifest: dict) -> "ModelInfo":
        """From an ONNX folder's model.json (the export's Dims.runtime_info)."""
        known = {f.name for f in fields(cls)}
        given = {k: tuple(v) if isinstance(v, list) else v for k, v in manifest.items() if k in known}
        linear = given.get("linear_layers", ())
        return cls(**given, first_attention=next(i for i in range(given["num_layers"]) if i not in linear))


def describe_nets(nets: dict, bmodel: Path) -> ModelInfo:
    """The engine's dims, read from the nets of an LLM bmodel."""
    blocks = sorted(int(m[1]) for n in nets if (m := re.fullmatch(r"block_(\d+)", n)))
    missing = [n for n in ("embedding", "embedding_cache", "lm_head", "block_0", "block_cache_0") if n not in nets]
    if missing or blocks != list(range(len(blocks))):
        raise ToolchainError(f"{bmodel} does not hold the nets of an LLM bmodel (missing {missing})")
    # linear-attention layers (Qwen3.5): a decode net of three inputs, the hidden state and two states
    linear = [i for i in blocks if len(nets[block_cache_net(i)]["inputs"]) == 3]
    if linear and len(nets[block_cache_net(linear[0])]["outputs"]) < 3:
        raise ToolchainError(f"{bmodel}: its linear-attention nets update their recurrent state in place, with "
                             "TPU-MLIR's own delta-rule ops (tpu-mlir's llm_convert.py builds Qwen3.5 so); this runtime "
                             "runs this project's Qwen3.5 bmodels, whose nets return the new state")
    attn = next((i for i in blocks if i not in linear), None)
    if attn is None:
        raise ToolchainError(f"{bmodel} has no attention layer (block_cache_i with a K/V history)")
    history = nets[block_cache_net(attn)]["inputs"][3]["shape"]  # [1, SEQ, KVH, D]
    seq = history[1]
    kv = nets.get(block_kv_net(attn))  # history prefill nets (ours with history=1, llm_convert --use_history_kv)
    unusable = None
    if kv and not any(t["name"] == "attention_mask" for t in kv["inputs"]):
        unusable = ("its history prefill nets (block_kv_i) take no attention mask (llm_convert.py --dynamic "
                    "--use_history_kv builds them so): run on the simulator they attend to the cache wrongly (their "
                    "hidden states at cosine 0.90 against onnxruntime's), so this runtime does not use them")
        kv = None
    cache = nets[block_cache_net(attn)]
    # decode stages (ours with chunk=C, llm_convert --chunk_length): usable where every stage keeps
    # the cache at the one io_alone memory, as both deploy them
    stages = ({shapes[3][1] for shapes in cache["stages"]} if cache.get("io_alone") and cache.get("shared_inputs")
              else {seq})
    head_out = nets["lm_head"]["outputs"][0]
    token_head = "i" in head_out["dtype"] or head_out["shape"][-1] == 1  # int32 [1, 1]: the chosen token
    prefill = nets[block_net(attn)]
    linear_dims = {}
    if linear:  # their window of tokens and their states' shapes (LinearDims above)
        step = nets[block_cache_net(linear[0])]["inputs"]
        linear_dims = dict(linear_layers=tuple(linear), window=nets[block_net(linear[0])]["inputs"][0]["shape"][1],
                           conv_state=tuple(step[1]["shape"]), recurrent_state=tuple(step[2]["shape"]))
    return ModelInfo(
        seq=seq, num_layers=len(blocks), hidden_size=prefill["inputs"][0]["shape"][2], kv_heads=history[2],
        head_dim=history[3], vocab_size=0 if token_head else head_out["shape"][-1], model=Path(bmodel).stem,
        bmodel=str(bmodel), first_attention=attn, dynamic=bool(prefill.get("dynamic")),
        prefill_rows=prefill["inputs"][0]["shape"][1], embed_rows=nets["embedding"]["inputs"][0]["shape"][1],
        history=kv["inputs"][0]["shape"][1] if kv else 0, history_dynamic=bool(kv and kv.get("dynamic")),
        history_unusable=unusable, stages=tuple(sorted(stages)), head="token" if token_head else "logits",
        greedy_head="greedy_head" in nets and not token_head,
        sample_head=nets["sample_head"]["outputs"][0]["shape"][-1] if "sample_head" in nets and not token_head else 0,
        **linear_dims)


def token_as_logits(token: np.ndarray) -> np.ndarray:
    """A head that returns the greedy token: logits that any sampler reads as that token."""
    chosen = int(token.ravel()[0])
    logits = np.full((1, chosen + 1), -np.inf, np.float32)
    logits[0, chosen] = 0.0
    return logits
