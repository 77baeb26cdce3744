"""Chat prompts: the checkpoint's own chat template when it has one (rendered with jinja2, as
transformers does), else ChatML as every Qwen family uses it, built segment by segment so that
text typed by a user is never read as special tokens (Qwen's own make_context does the same)."""
import functools
from dataclasses import dataclass, field

DEFAULT_SYSTEM = "You are a helpful assistant."


@dataclass
class Message:
    role: str       # system | user | assistant
    content: str


class PromptTooLong(ValueError):
    """The newest message alone does not fit in the model's seq_length."""


@dataclass
class Prompt:
    ids: list[int]
    history: list[Message] = field(default_factory=list)  # the past messages kept: the newest ones
    dropped: int = 0                # past turns left out, oldest first
    system_dropped: bool = False    # the default system prompt was left out to make room


def answer_room(seq: int, max_new_tokens: int) -> tuple[int, int]:
    """(kept, least): the oldest past turns are dropped until `kept` tokens are free for the answer;
    a message that leaves fewer than `least` is refused. seq 32 and 256 new tokens: 16 and 4."""
    return min(max_new_tokens, seq // 2), max(1, min(max_new_tokens, seq // 8))


class _ChatML:
    """ChatML ids message by message: a message's ids do not depend on its neighbours, so each is
    tokenized once (cached) and a prompt is their concatenation. special=True reads special-token
    text in contents as the tokens (as a rendered template is read): the lengths then estimate
    what a ChatML-shaped template renders."""

    def __init__(self, tokenizer, enable_thinking: bool | None = None, special: bool = False):
        self.tokenizer, self.special, self.cache = tokenizer, special, {}
        self.start, self.end = tokenizer.token_to_id("<|im_start|>"), tokenizer.token_to_id("<|im_end|>")
        self.newline = tokenizer.encode("\n", allow_special=False)
        self.tail = [self.start] + tokenizer.encode("assistant\n", allow_special=False)
        if enable_thinking is False:
            self.tail += tokenizer.encode("<think>\n\n</think>\n\n", allow_special=True)

    def message(self, m: Message) -> list[int]:
        if id(m) not in self.cache:
            encode = self.tokenizer.encode
            self.cache[id(m)] = [self.start] + encode(f"{m.role}\n", allow_special=False) + \
                encode(m.content, allow_special=self.special) + [self.end] + self.newline
        return self.cache[id(m)]

    def ids(self, messages: list[Message]) -> list[int]:
        return [i for m in messages for i in self.message(m)] + self.tail


def chatml_ids(tokenizer, messages: list[Message], enable_thinking: bool | None = None) -> list[int]:
    """<|im_start|>role\\ncontent<|im_end|>\\n ... <|im_start|>assistant\\n; every past assistant turn
    keeps its role. enable_thinking=False appends Qwen3's empty think block."""
    return _ChatML(tokenizer, enable_thinking).ids(messages)


@functools.lru_cache(maxsize=8)
def _compiled(template: str):
    """A template compiles once (milliseconds), not once per render."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise ValueError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.globals["raise_exception"] = raise_exception
    return env.from_string(template)


def template_ids(tokenizer, messages: list[Message], enable_thinking: bool | None = None) -> list[int]:
    """The checkpoint's own chat template (tokenizer_config.json's chat_template)."""
    from jinja2 import TemplateError

    variables = {"messages": [{"role": m.role, "content": m.content} for m in messages],
                 "add_generation_prompt": True}
    if enable_thinking is not None:
        variables["enable_thinking"] = enable_thinking
    try:
        text = _compiled(tokenizer.chat_template).render(**variables)
    except TemplateError as err:  # a template that cannot take these messages: the caller's error
        raise ValueError(f"the model's chat template failed on these messages: {err}") from None
    return tokenizer.encode(text, allow_special=True)


def prompt_ids(tokenizer, messages: list[Message], enable_thinking: bool | None = None,
               use_template: bool = True) -> list[int]:
    if use_template and tokenizer.chat_template:
        return template_ids(tokenizer, messages, enable_thinking)
    return chatml_ids(tokenizer, messages, enable_thinking)


def _turns(history: list[Message]) -> list[list[Message]]:
    """Past turns, oldest first: a message, with the assistant message that answers it."""
    turns, k = [], 0
    while k < len(history):
        size = 2 if k + 1 < len(history) and history[k + 1].role == "assistant" else 1
        turns.append(history[k:k + size])
        k += size
    return turns


def fit_history(tokenizer, system: str | None, history: list[Message], query: str, seq: int,
                max_new_tokens: int, optional_system: bool = False, enable_thinking: bool | None = None,
                use_template: bool = True) -> Prompt:
    """The prompt of system + history + query in `seq` tokens, with room for the answer
    (answer_room): the oldest past turns go first, then an optional (default) system prompt if
    it does not fit with the query; a query that still leaves too little room is refused.

    Linear in the history: messages are tokenized once each, newest first, only until the budget
    is spent; their ChatML lengths guess how many turns fit, and prompts are rendered around that
    guess only: ChatML is put together from those pieces (no tokenizing again); a template is
    rendered twice when the guess is right (it fits, one more turn does not), O(log n) times if not."""
    kept, least = answer_room(seq, max_new_tokens)
    budget, template = seq - kept, use_template and bool(tokenizer.chat_template)
    chatml = _ChatML(tokenizer, enable_thinking, special=template)
    render = (lambda messages: template_ids(tokenizer, messages, enable_thinking)) if template else chatml.ids
    head, new = [Message("system", system)] if system else [], Message("user", query)
    base = render(head + [new])
    system_dropped = bool(head) and optional_system and len(base) > budget
    if system_dropped:
        head, base = [], render([new])
    if len(base) > seq - least:
        raise PromptTooLong(f"the message is {len(base)} tokens with the chat format"
                            f"{' and the system prompt' if head else ''}; the model takes at most {seq - least} "
                            f"(seq_length {seq} minus {least} kept for the answer)")
    turns, rendered = _turns(history), {0: base}

    def fits(count: int) -> bool:
        if count not in rendered:
            rendered[count] = render(head + _flat(turns[len(turns) - count:]) + [new])
        return len(rendered[count]) <= budget

    count = _largest(fits, _newest_within(turns, budget - len(base), chatml), len(turns))
    return Prompt(rendered[count], _flat(turns[len(turns) - count:]), len(turns) - count, system_dropped)


def _flat(turns: list[list[Message]]) -> list[Message]:
    return [m for turn in turns for m in turn]


def _newest_within(turns: list[list[Message]], free: int, chatml: _ChatML) -> int:
    """How many of the newest turns fit in `free` tokens by their ChatML length."""
    count = 0
    for turn in reversed(turns):
        free -= sum(len(chatml.message(m)) for m in turn)
        if free < 0:
            break
        count += 1
    return count


def _largest(fits, guess: int, most: int) -> int:
    """The largest count in [0, most] that fits (fits(0) is taken as true; fits holds up to some
    count): galloping away from the guess, then bisecting. Two calls when the guess is right."""
    low, high, step = 0, most + 1, 1  # fits(low); not fits(high)
    guess = min(guess, most)
    up = guess == 0 or fits(guess)
    low, high = (guess, high) if up else (low, guess)
    while high - low > 1:
        probe = min(low + step, high - 1) if up else max(high - step, low + 1)
        if fits(probe):
            low = probe
            if not up:
                break
        else:
            high = probe
            if up:
                break
        step *= 2
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if fits(middle) else (low, middle)
    return low
