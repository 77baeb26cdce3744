"""The net contract as the runtime reads it: what the engine knows of a model's nets (ModelInfo),
read from an LLM bmodel's nets (describe_nets) or from an ONNX folder's manifest (from_manifest),
and what a head that returns the chosen token means as logits."""
import re
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np

from .toolchain import ToolchainError


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
    linear = [i for i in blocks if len(nets[f"block_cache_{i}"]["inputs"]) == 3]
    if linear and len(nets[f"block_cache_{linear[0]}"]["outputs"]) < 3:
        raise ToolchainError(f"{bmodel}: its linear-attention nets update their recurrent state in place, with "
                             "TPU-MLIR's own delta-rule ops (tpu-mlir's llm_convert.py builds Qwen3.5 so); this runtime "
                             "runs this project's Qwen3.5 bmodels, whose nets return the new state")
    attn = next((i for i in blocks if i not in linear), None)
    if attn is None:
        raise ToolchainError(f"{bmodel} has no attention layer (block_cache_i with a K/V history)")
    history = nets[f"block_cache_{attn}"]["inputs"][3]["shape"]  # [1, SEQ, KVH, D]
    seq = history[1]
    kv = nets.get(f"block_kv_{attn}")  # history prefill nets (ours with history=1, llm_convert --use_history_kv)
    unusable = None
    if kv and not any(t["name"] == "attention_mask" for t in kv["inputs"]):
        unusable = ("its history prefill nets (block_kv_i) take no attention mask (llm_convert.py --dynamic "
                    "--use_history_kv builds them so): run on the simulator they attend to the cache wrongly (their "
                    "hidden states at cosine 0.90 against onnxruntime's), so this runtime does not use them")
        kv = None
    cache = nets[f"block_cache_{attn}"]
    # decode stages (ours with chunk=C, llm_convert --chunk_length): usable where every stage keeps
    # the cache at the one io_alone memory, as both deploy them
    stages = ({shapes[3][1] for shapes in cache["stages"]} if cache.get("io_alone") and cache.get("shared_inputs")
              else {seq})
    head_out = nets["lm_head"]["outputs"][0]
    token_head = "i" in head_out["dtype"] or head_out["shape"][-1] == 1  # int32 [1, 1]: the chosen token
    prefill = nets[f"block_{attn}"]
    linear_dims = {}
    if linear:  # their window of tokens and their states' shapes (pipeline/model/pieces.py)
        step = nets[f"block_cache_{linear[0]}"]["inputs"]
        linear_dims = dict(linear_layers=tuple(linear), window=nets[f"block_{linear[0]}"]["inputs"][0]["shape"][1],
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
