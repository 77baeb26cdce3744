"""Generation over an Engine: streaming text pieces, stop tokens and stop strings, finish reason,
and the figures users ask for (first-token latency, decode tokens/s)."""
import time
from dataclasses import dataclass, field

from .engine import Engine
from .sampling import Sampler, SamplingParams
from .tokenizer import StreamDecoder
from .traffic import Traffic

STOP_TOKENS = ("<|im_end|>", "<|endoftext|>", "<|im_start|>")


@dataclass
class Result:
    text: str = ""
    tokens: list[int] = field(default_factory=list)
    finish_reason: str = ""         # stop | length
    prompt_tokens: int = 0
    cached_tokens: int = 0          # of the prompt, found in the cache from the previous turn (not prefilled)
    first_token_seconds: float = 0.0
    decode_tokens_per_second: float = 0.0
    prefill_traffic: Traffic = field(default_factory=Traffic)  # what crossed to and from the device
    decode_traffic: Traffic = field(default_factory=Traffic)
    decode_steps: int = 0


def stop_ids(tokenizer) -> set[int]:
    return {i for i in (tokenizer.token_to_id(t) for t in STOP_TOKENS) if i is not None}


def generate(engine: Engine, tokenizer, prompt: list[int], max_new_tokens: int, params: SamplingParams,
             stop: list[str] = (), result: Result | None = None, cancelled=lambda: False):
    """Yields text pieces as they are decoded; `result` is filled in as it goes (and at the end).
    Never yields part of a stop string, nor half of a multi-byte character. `cancelled()` is
    asked between tokens (a client that went away): the generation then ends at once."""
    result = result if result is not None else Result()
    result.prompt_tokens = len(prompt)
    sampler, stream, stops = Sampler(params), StreamDecoder(tokenizer), stop_ids(tokenizer)
    hold = max((len(s) for s in stop), default=1) - 1  # text that might still become a stop string
    pending, seen = "", list(prompt)
    start = time.perf_counter()
    engine.prefill(prompt)
    result.cached_tokens = engine.reused
    result.first_token_seconds = time.perf_counter() - start
    decode_start = time.perf_counter()
    while True:
        token = engine.next_token(sampler, seen)
        if token in stops:
            result.finish_reason = "stop"
            break
        result.tokens.append(token)
        seen.append(token)
        pending += stream.push(token)
        cut = min((pending.find(s) for s in stop if s in pending), default=-1)
        if cut >= 0:
            pending, result.finish_reason = pending[:cut], "stop"
            break
        safe = len(pending) - hold
        if safe > 0:
            result.text += pending[:safe]
            yield pending[:safe]
            pending = pending[safe:]
        if len(result.tokens) >= max_new_tokens or engine.length >= engine.seq:
            result.finish_reason = "length"
            break
        if cancelled():
            result.finish_reason = "cancelled"
            break
        engine.decode(token)
    pending += stream.flush() if result.finish_reason == "length" else ""
    if pending:
        result.text += pending
        yield pending
    decode_seconds = time.perf_counter() - decode_start
    result.prefill_traffic, result.decode_traffic = engine.prefill_traffic, engine.decode_traffic
    result.decode_steps = engine.decoded
    if len(result.tokens) > 1 and decode_seconds > 0:
        result.decode_tokens_per_second = (len(result.tokens) - 1) / decode_seconds
    return result
