"""The net contract as the runtime reads it: what an LLM bmodel's nets say about the model (the
engine's dims), and what a head that returns the chosen token means as logits."""
import re
from pathlib import Path

import numpy as np

from .toolchain import ToolchainError


def describe_nets(nets: dict, bmodel: Path) -> dict:
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
    info = {"model": Path(bmodel).stem, "seq": seq, "num_layers": len(blocks), "kv_heads": history[2],
            "head_dim": history[3], "hidden_size": prefill["inputs"][0]["shape"][2],
            "head": "token" if token_head else "logits", "bmodel": str(bmodel), "first_attention": attn,
            # prefill nets compiled dynamic run at the prompt's length (llm_convert --dynamic, ours dynamic=1)
            "dynamic": bool(prefill.get("dynamic")),
            # block_i's length (SEQ, or llm_convert's --max_input_length), and the embedding's
            "prefill_rows": prefill["inputs"][0]["shape"][1],
            "embed_rows": nets["embedding"]["inputs"][0]["shape"][1],
            "history": kv["inputs"][0]["shape"][1] if kv else 0, "history_dynamic": bool(kv and kv.get("dynamic")),
            "history_unusable": unusable, "stages": tuple(sorted(stages)),
            # the heads that choose on the device (llm_convert --do_sample's, and ours)
            "greedy_head": "greedy_head" in nets and not token_head,
            "sample_head": nets["sample_head"]["outputs"][0]["shape"][-1] if "sample_head" in nets and not token_head
            else 0}
    if linear:  # their window of tokens and their states' shapes (pipeline/model/pieces.py)
        step = nets[f"block_cache_{linear[0]}"]["inputs"]
        info.update(linear_layers=linear, window=nets[f"block_{linear[0]}"]["inputs"][0]["shape"][1],
                    conv_state=step[1]["shape"], recurrent_state=step[2]["shape"])
    return info


def token_as_logits(token: np.ndarray) -> np.ndarray:
    """A head that returns the greedy token: logits that any sampler reads as that token."""
    chosen = int(token.ravel()[0])
    logits = np.full((1, chosen + 1), -np.inf, np.float32)
    logits[0, chosen] = 0.0
    return logits
