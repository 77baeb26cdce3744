"""Random-weight test checkpoints, written by the project itself (deterministic from a seed).

They are real Hugging Face checkpoint folders (config.json, sharded safetensors with an index,
tokenizer.json), in the layout of their family (its Family.test_checkpoint: Qwen v1 tensors for
`qwen`, transformers' own layout for the others). Weights are spread wide (initializer_range ~0.2)
so greedy choices are not near-ties, and every bias and norm is random, so no mapping is tested
against zeros.
"""
import json
import zlib
from pathlib import Path

from ..families import get_family
from ..fsutil import atomic_dir
from .config import ModelConfig

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
    """Write the model's random checkpoint to `folder` (atomically: whole or not at all).
    Each tensor has its own seed (from its name), so shards are made and written one at a time
    and memory stays at one shard, whatever the model's size."""
    config, shapes = get_family(model.family).test_checkpoint(model)
    with atomic_dir(folder) as tmp:
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        _write_shards(model.source.generate, shapes, tmp)
        _write_tokenizer(tmp, model.architecture.vocab_size)


def _random_tensor(spec, name: str, shape: tuple):
    """Deterministic in (seed, name): norms near 1, everything else spread by initializer_range."""
    import torch

    gen = torch.Generator().manual_seed(spec.seed * 1_000_003 + zlib.crc32(name.encode()))
    if name.endswith("norm.weight") or name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight")):
        values = 1.0 + torch.randn(shape, generator=gen) * 0.1
    else:
        values = torch.randn(shape, generator=gen) * spec.initializer_range
    return values.to(getattr(torch, spec.dtype))


def _write_shards(spec, shapes: dict, folder: Path) -> None:
    from safetensors.torch import save_file

    names = sorted(shapes)
    if spec.shards <= 1:
        save_file({n: _random_tensor(spec, n, shapes[n]) for n in names}, folder / "model.safetensors",
                  metadata={"format": "pt"})
        return
    per = -(-len(names) // spec.shards)
    weight_map, total = {}, 0
    for k in range(spec.shards):
        file = f"model-{k + 1:05d}-of-{spec.shards:05d}.safetensors"
        part = {n: _random_tensor(spec, n, shapes[n]) for n in names[k * per:(k + 1) * per]}
        save_file(part, folder / file, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, file))
        total += sum(t.numel() * t.element_size() for t in part.values())
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
    # A small corpus cannot fill a large vocabulary: the ids left get plain word-like tokens, so
    # that every id the model can produce decodes to visible text.
    missing = vocab_size - tok.get_vocab_size()
    if missing > 0:
        tok.add_tokens([f" w{i}" for i in range(missing)])
    tok.save(str(folder / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|im_end|>",
              "pad_token": "<|endoftext|>", "model_max_length": 1 << 20}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
