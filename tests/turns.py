"""A 4-turn conversation, checked turn by turn against a fresh prefill of the whole conversation
(shared by the onnxruntime and the simulator tests)."""
from runtime.generate import Result, generate
from runtime.sampling import SamplingParams


def four_turns(kept, fresh, tokenizer, user_turns: list[list[int]], max_new: int) -> list[Result]:
    """`kept` keeps its cache from turn to turn; `fresh` forgets it and prefills everything. At
    every turn both must answer the same greedy tokens, and `kept` must have prefilled only what
    the last turn did not leave in its cache (its prompt and the answer tokens it decoded)."""
    conversation, results, before = [], [], None
    for turn, user in enumerate(user_turns, 1):
        conversation = conversation + user
        answers = []
        for engine in (kept, fresh):
            if engine is fresh:
                engine.forget()
            result = Result()
            list(generate(engine, tokenizer, conversation, max_new, SamplingParams(), [], result))
            answers.append(result)
        got, again = answers
        assert (got.tokens, got.finish_reason) == (again.tokens, again.finish_reason), f"turn {turn}"
        assert again.cached_tokens == 0
        expected = 0 if before is None else before[0] + before[1].decode_steps
        assert got.cached_tokens == expected, (turn, got.cached_tokens, expected)
        before = (len(conversation), got)
        conversation = conversation + got.tokens
        results.append(got)
    return results
