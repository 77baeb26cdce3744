"""Random-weight test checkpoints, written by the project itself (deterministic from a seed).

They are real Hugging Face checkpoint folders (config.json, sharded safetensors with an index,
tokenizer.json), in the layout of their family: Qwen v1 tensors for `qwen`, transformers' own
layout for `qwen2` / `qwen3`. Weights are spread wide (initializer_range ~0.2) so greedy choices
are not near-ties, and every bias and norm is random, so no mapping is tested against zeros.
"""
import json
from pathlib import Path

from .fsutil import atomic_dir
from .model_config import ModelConfig

# Text the tiny tokenizer is trained on: English, Chinese, code, so real prompts encode sensibly.
TOKENIZER_CORPUS = """\
The capital of France is Paris. The capital of China is Beijing. Tell me a story about a dragon.
What is the history of Shenzhen? Write a short essay about it. Hello, how are you? I am fine, thank you.
深圳是中国广东省的一个城市，历史悠久。你知道深圳的历史吗？写一段小作文介绍下。你好，很高兴认识你。
def fibonacci(n):\n    return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)\n
for (int i = 0; i < 10; ++i) { printf("%d\\n", i); }  // count to ten
Large language models run on Sophgo TPUs after compilation with TPU-MLIR into a bmodel.
The quick brown fox jumps over the lazy dog. 1234567890 + - * / = ( ) [ ] { } < > ! ? : ;
"""
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def generate_checkpoint(model: ModelConfig, folder: Path) -> None:
    """Write the model's random checkpoint to `folder` (atomically: whole or not at all)."""
    import torch

    spec = model.source.generate
    gen = torch.Generator().manual_seed(spec.seed)
    with atomic_dir(folder) as tmp:
        if model.family == "qwen":
            config, tensors = _qwen_v1(model, gen)
        else:
            config, tensors = _canonical(model, gen)
        dtype = getattr(torch, spec.dtype)
        tensors = {k: v.to(dtype).contiguous() for k, v in tensors.items()}
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        _write_shards(tensors, tmp, spec.shards)
        _write_tokenizer(tmp, model.architecture.vocab_size)


def _rand(gen, shape, scale):
    import torch
    return torch.randn(shape, generator=gen) * scale


def _norm(gen, n):
    return 1.0 + _rand(gen, (n,), 0.1)


def _qwen_v1(model: ModelConfig, gen):
    """Qwen v1 names and shapes (FACTS.md section 5), written without the mapping under test."""
    a, r = model.architecture, model.source.generate.initializer_range
    h, f, v = a.hidden_size, a.intermediate_size, a.vocab_size
    assert a.num_kv_heads == a.num_heads and a.head_dim * a.num_heads == h, "Qwen v1 has no GQA"
    t = {"transformer.wte.weight": _rand(gen, (v, h), r)}
    for i in range(a.num_layers):
        p = f"transformer.h.{i}."
        t[p + "ln_1.weight"] = _norm(gen, h)
        t[p + "attn.c_attn.weight"] = _rand(gen, (3 * h, h), r)
        t[p + "attn.c_attn.bias"] = _rand(gen, (3 * h,), r)
        t[p + "attn.c_proj.weight"] = _rand(gen, (h, h), r)
        t[p + "ln_2.weight"] = _norm(gen, h)
        t[p + "mlp.w1.weight"] = _rand(gen, (f, h), r)
        t[p + "mlp.w2.weight"] = _rand(gen, (f, h), r)
        t[p + "mlp.c_proj.weight"] = _rand(gen, (h, f), r)
    t["transformer.ln_f.weight"] = _norm(gen, h)
    t["lm_head.weight"] = _rand(gen, (v, h), r)
    config = {
        "architectures": ["QWenLMHeadModel"],
        "auto_map": {"AutoConfig": "configuration_qwen.QWenConfig",
                     "AutoModelForCausalLM": "modeling_qwen.QWenLMHeadModel"},
        "model_type": "qwen", "hidden_size": h, "intermediate_size": 2 * f,
        "num_attention_heads": a.num_heads, "num_hidden_layers": a.num_layers, "kv_channels": a.head_dim,
        "layer_norm_epsilon": a.rms_norm_eps, "rotary_emb_base": a.rope_theta, "rotary_pct": 1.0,
        "seq_length": a.max_position_embeddings, "max_position_embeddings": a.max_position_embeddings,
        "vocab_size": v, "no_bias": True, "use_dynamic_ntk": True, "use_logn_attn": True,
        "bf16": False, "fp16": False, "fp32": False, "tie_word_embeddings": False,
        "initializer_range": model.source.generate.initializer_range,
    }
    return config, t


def _canonical(model: ModelConfig, gen):
    """transformers' own layout: names from the real model class (built on the meta device)."""
    import torch

    from .families import family_classes

    a, r = model.architecture, model.source.generate.initializer_range
    classes = family_classes(model.family)
    config = classes.config(
        hidden_size=a.hidden_size, intermediate_size=a.intermediate_size, num_hidden_layers=a.num_layers,
        num_attention_heads=a.num_heads, num_key_value_heads=a.num_kv_heads, head_dim=a.head_dim,
        vocab_size=a.vocab_size, tie_word_embeddings=a.tie_word_embeddings, rms_norm_eps=a.rms_norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": a.rope_theta},
        max_position_embeddings=a.max_position_embeddings, initializer_range=r,
        bos_token_id=None, eos_token_id=2, pad_token_id=0)
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in classes.causal_lm(config).state_dict().items()}
    if a.tie_word_embeddings:
        shapes.pop("lm_head.weight", None)
    tensors = {k: _norm(gen, s[0]) if k.endswith("norm.weight") else _rand(gen, s, r)
               for k, s in sorted(shapes.items())}
    config_dict = config.to_dict()
    config_dict["architectures"] = [classes.causal_lm.__name__]
    return config_dict, tensors


def _write_shards(tensors: dict, folder: Path, shards: int) -> None:
    from safetensors.torch import save_file

    names = sorted(tensors)
    if shards <= 1:
        save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
        return
    per = -(-len(names) // shards)
    weight_map, total = {}, 0
    for k in range(shards):
        part = names[k * per:(k + 1) * per]
        file = f"model-{k + 1:05d}-of-{shards:05d}.safetensors"
        save_file({n: tensors[n] for n in part}, folder / file, metadata={"format": "pt"})
        weight_map.update({n: file for n in part})
        total += sum(tensors[n].numel() * tensors[n].element_size() for n in part)
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")


def _write_tokenizer(folder: Path, vocab_size: int) -> None:
    """A small byte-level BPE (any text encodes) with Qwen's special tokens, as tokenizer.json."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(TOKENIZER_CORPUS.splitlines(), trainer=trainer)
    tok.save(str(folder / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|im_end|>",
              "pad_token": "<|endoftext|>", "model_max_length": 1 << 20}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
