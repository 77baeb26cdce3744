"""Chat prompts: the checkpoint's own chat template when it has one (rendered with jinja2, as
transformers does), else ChatML as every Qwen family uses it, built segment by segment so that
text typed by a user is never read as special tokens (Qwen's own make_context does the same)."""
from dataclasses import dataclass

DEFAULT_SYSTEM = "You are a helpful assistant."


@dataclass
class Message:
    role: str       # system | user | assistant
    content: str


class PromptTooLong(ValueError):
    """The newest message alone does not fit in the model's seq_length."""


def chatml_ids(tokenizer, messages: list[Message], enable_thinking: bool | None = None) -> list[int]:
    """<|im_start|>role\\ncontent<|im_end|>\\n ... <|im_start|>assistant\\n; every past assistant turn
    keeps its role. enable_thinking=False appends Qwen3's empty think block."""
    start, end = tokenizer.token_to_id("<|im_start|>"), tokenizer.token_to_id("<|im_end|>")
    newline = tokenizer.encode("\n", allow_special=False)
    ids = []
    for m in messages:
        ids += [start] + tokenizer.encode(f"{m.role}\n", allow_special=False) + \
            tokenizer.encode(m.content, allow_special=False) + [end] + newline
    ids += [start] + tokenizer.encode("assistant\n", allow_special=False)
    if enable_thinking is False:
        ids += tokenizer.encode("<think>\n\n</think>\n\n", allow_special=True)
    return ids


def template_ids(tokenizer, messages: list[Message], enable_thinking: bool | None = None) -> list[int]:
    """The checkpoint's own chat template (tokenizer_config.json's chat_template)."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise ValueError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.globals["raise_exception"] = raise_exception
    variables = {"messages": [{"role": m.role, "content": m.content} for m in messages],
                 "add_generation_prompt": True}
    if enable_thinking is not None:
        variables["enable_thinking"] = enable_thinking
    text = env.from_string(tokenizer.chat_template).render(**variables)
    return tokenizer.encode(text, allow_special=True)


def prompt_ids(tokenizer, messages: list[Message], enable_thinking: bool | None = None,
               use_template: bool = True) -> list[int]:
    if use_template and tokenizer.chat_template:
        return template_ids(tokenizer, messages, enable_thinking)
    return chatml_ids(tokenizer, messages, enable_thinking)


def fit_history(tokenizer, system: str | None, history: list[Message], query: str, budget: int,
                **options) -> tuple[list[int], int]:
    """The prompt ids of system + history + query within `budget` tokens, dropping the oldest
    past turns (a user message with its answer) first. Returns (ids, turns dropped)."""
    head = [Message("system", system)] if system else []
    turns = list(history)
    dropped = 0
    while True:
        ids = prompt_ids(tokenizer, head + turns + [Message("user", query)], **options)
        if len(ids) <= budget:
            return ids, dropped
        if not turns:
            raise PromptTooLong(f"the message is {len(ids)} tokens with the chat format; the model takes at most "
                                f"{budget} (seq_length minus the room kept for the answer)")
        cut = 2 if len(turns) >= 2 and turns[1].role == "assistant" else 1
        turns, dropped = turns[cut:], dropped + 1
