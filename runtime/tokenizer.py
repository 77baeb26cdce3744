"""Tokenizers of a checkpoint folder, without transformers:
  - `tokenizer.json` (Qwen1.5/2/2.5/3, and the project's test models) through `tokenizers`;
  - Qwen v1's `qwen.tiktoken` through tiktoken, with Qwen's exact split pattern, NFC
    normalization and special tokens (as Qwen's own tokenization_qwen.py does).
Plus a streaming decoder that never emits half of a multi-byte character."""
import base64
import json
import unicodedata
from pathlib import Path

# Qwen's exact split pattern (a near miss round-trips text but gives other ids).
QWEN_PATTERN = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"""
                r"""\s*[\r\n]+|\s+(?!\S)|\s+""")
QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] + [f"<|extra_{i}|>" for i in range(205)]
QWEN_SPECIAL_START = 151643


class Tokenizer:
    """encode(text) -> ids (special tokens in the text are recognized); decode(ids) -> text."""

    def __init__(self, folder: Path, encode, decode, token_to_id, special_ids: set[int]):
        self.folder = folder
        self._encode, self._decode, self.token_to_id = encode, decode, token_to_id  # encode(text, allow_special)
        self.special_ids = special_ids
        config = folder / "tokenizer_config.json"
        self.config = json.loads(config.read_text(encoding="utf-8")) if config.is_file() else {}

    def encode(self, text: str, allow_special: bool = True) -> list[int]:
        """allow_special=False reads "<|im_start|>" in the text as plain text (for what users type)."""
        return self._encode(text, allow_special)

    def decode(self, ids: list[int], skip_special: bool = False) -> str:
        if skip_special:
            ids = [i for i in ids if i not in self.special_ids]
        return self._decode(list(ids))

    @property
    def chat_template(self) -> str | None:
        """tokenizer_config.json's chat_template, or chat_template.jinja (where transformers 5 saves it)."""
        jinja = self.folder / "chat_template.jinja"
        return self.config.get("chat_template") or (jinja.read_text(encoding="utf-8") if jinja.is_file() else None)


def load_tokenizer(folder: Path) -> Tokenizer:
    folder = Path(folder)
    if (folder / "tokenizer.json").is_file():
        from tokenizers import Tokenizer as HFTokenizer

        tok = HFTokenizer.from_file(str(folder / "tokenizer.json"))
        plain = HFTokenizer.from_file(str(folder / "tokenizer.json"))
        plain.encode_special_tokens = True  # special-token text encoded as ordinary text
        specials = {t["id"] for t in _added_tokens(folder) if t["special"]}
        # encode_batch_fast gives encode's ids but lets go of the GIL while it works: a 1 MB
        # message tokenized in a worker thread then does not stall the server's event loop
        return Tokenizer(folder, lambda text, special: (tok if special else plain).encode_batch_fast(
                             [text], add_special_tokens=False)[0].ids,
                         lambda ids: tok.decode(ids, skip_special_tokens=False), tok.token_to_id,
                         specials or {i for i in (tok.token_to_id(s) for s in QWEN_SPECIALS[:3]) if i is not None})
    if (folder / "qwen.tiktoken").is_file():
        import tiktoken

        ranks = {}
        for line in (folder / "qwen.tiktoken").read_bytes().splitlines():
            if line:
                token, rank = line.split()
                ranks[base64.b64decode(token)] = int(rank)
        specials = {t: QWEN_SPECIAL_START + i for i, t in enumerate(QWEN_SPECIALS)}
        enc = tiktoken.Encoding("qwen", pat_str=QWEN_PATTERN, mergeable_ranks=ranks, special_tokens=specials)
        return Tokenizer(folder, lambda text, special: enc.encode(
                             unicodedata.normalize("NFC", text), allowed_special="all" if special else set(),
                             disallowed_special=()),
                         lambda ids: enc.decode(ids, errors="replace"), specials.get, set(specials.values()))
    raise FileNotFoundError(f"{folder} has neither tokenizer.json nor qwen.tiktoken")


def _added_tokens(folder: Path):
    data = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
    return [{"id": t["id"], "special": t.get("special", False)} for t in data.get("added_tokens", [])]


class StreamDecoder:
    """Turns a growing list of ids into text pieces; holds back an incomplete UTF-8 character
    (decoded as U+FFFD at the end) until the token that completes it arrives."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer, self.ids, self.emitted = tokenizer, [], 0

    def push(self, token: int) -> str:
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids, skip_special=True)
        if text.endswith("\ufffd"):
            return ""
        piece, self.emitted = text[self.emitted:], len(text)
        return piece

    def flush(self) -> str:
        text = self.tokenizer.decode(self.ids, skip_special=True)
        piece, self.emitted = text[self.emitted:], len(text)
        return piece
