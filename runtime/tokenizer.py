"""Tokenizers of a checkpoint folder: `tokenizer.json` (Qwen1.5/2/2.5/3, and the project's test
models) through `tokenizers`, or Qwen v1's `qwen.tiktoken` through tiktoken."""
import base64
from pathlib import Path

# Qwen's exact split pattern (a near miss round-trips text but gives other ids).
QWEN_PATTERN = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"""
                r"""\s*[\r\n]+|\s+(?!\S)|\s+""")
QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] + [f"<|extra_{i}|>" for i in range(205)]


class Tokenizer:
    def __init__(self, encode, decode, token_to_id):
        self.encode, self.decode, self.token_to_id = encode, decode, token_to_id


def load_tokenizer(folder: Path) -> Tokenizer:
    folder = Path(folder)
    if (folder / "tokenizer.json").is_file():
        from tokenizers import Tokenizer as HFTokenizer

        tok = HFTokenizer.from_file(str(folder / "tokenizer.json"))
        return Tokenizer(lambda text: tok.encode(text, add_special_tokens=False).ids,
                         lambda ids: tok.decode(ids, skip_special_tokens=False), tok.token_to_id)
    if (folder / "qwen.tiktoken").is_file():
        import tiktoken

        ranks = {}
        for line in (folder / "qwen.tiktoken").read_text(encoding="utf-8").splitlines():
            if line:
                token, rank = line.split()
                ranks[base64.b64decode(token)] = int(rank)
        specials = {t: len(ranks) + i for i, t in enumerate(QWEN_SPECIALS)}
        enc = tiktoken.Encoding("qwen", pat_str=QWEN_PATTERN, mergeable_ranks=ranks, special_tokens=specials)
        return Tokenizer(lambda text: enc.encode(text, allowed_special="all"),
                         lambda ids: enc.decode(ids), specials.get)
    raise FileNotFoundError(f"{folder} has neither tokenizer.json nor qwen.tiktoken")
