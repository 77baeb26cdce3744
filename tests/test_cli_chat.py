"""The chat CLI on bad input, as a user meets it: `python -m runtime.chat` on the default model
(tiny-qwen2, seq 32), fed bytes that are not UTF-8, bad options and Ctrl-C. Never a traceback."""
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from runtime.chat import Chat, parse_args
from runtime.chat_format import fit_history

from .conftest import ROOT, run_doit

pytestmark = pytest.mark.fast


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """tiny-qwen2 exported at its default seq (32) and at 128 (room for a few turns)."""
    build_dir = tmp_path_factory.mktemp("chat")
    for seq in (32, 128):
        result = run_doit(build_dir, ["export", "map"], model="tiny-qwen2", seq=seq)
        assert result.code == 0, result.output
    return {seq: build_dir / "tiny-qwen2" / f"seq{seq}" / "onnx" for seq in (32, 128)}


def _chat(model, *options, stdin: bytes = b"", env: dict | None = None):
    process = subprocess.run([sys.executable, "-m", "runtime.chat", "--model", str(model), *options], cwd=ROOT,
                             input=stdin, capture_output=True, timeout=120, env={**os.environ, **(env or {})},
                             check=False)
    out, err = (process.stdout.decode("utf-8", "replace"), process.stderr.decode("utf-8", "replace"))
    assert "Traceback" not in out + err, err
    return process.returncode, out, err


def test_the_default_model_chats_with_its_defaults(models):
    """seq 32: the default system prompt does not fit with a message. It is left out (said once);
    a system prompt given with --system is kept, and refused when it leaves no room."""
    code, out, _ = _chat(models[32], stdin=b"hi\nhello\n/exit\n")
    assert code == 0 and out.count("Assistant: ") == 2 and "error" not in out
    assert out.count("the default system prompt does not fit") == 1
    assert len(re.findall(r"\[\d+ tokens, (?:length|stop); prefilled \d+ of \d+ prompt tokens", out)) == 2
    code, out, err = _chat(models[32], "--prompt", "hi")
    assert code == 0 and "the default system prompt does not fit" in err and "does not fit" not in out  # a note
    code, _, err = _chat(models[32], "--prompt", "hi", "--system", "You are a helpful assistant.")
    assert code == 1 and "with the chat format and the system prompt; the model takes at most 28" in err


@pytest.mark.parametrize("env", [{}, {"LC_ALL": "C"}, {"LC_ALL": "POSIX"}, {"LC_ALL": "C.UTF-8"},
                                 {"LC_ALL": "C", "PYTHONUTF8": "0", "PYTHONCOERCECLOCALE": "0"},
                                 {"PYTHONIOENCODING": "ascii"}],
                         ids=["default", "C", "POSIX", "C.UTF-8", "C-ascii", "ascii"])
def test_bytes_that_are_not_utf8_do_not_end_the_session(models, env):
    code, out, _ = _chat(models[32], stdin=b"\xff\xfehi\n\xc3(\n\xe4\xbd\xa0\xe5\xa5\xbd\n/exit\n", env=env)
    assert code == 0 and out.count("Assistant: ") == 3
    assert re.search(r"\[input: 2 byte\(s\) that are not \S+ replaced by .\]", out)  # \xff\xfe
    assert re.search(r"\[input: 1 byte\(s\) that are not \S+ replaced by .\]", out)  # \xc3


def test_options_with_bytes_that_are_not_utf8(models):
    code, _, err = _chat(models[128], b"--prompt", b"\xffhi", b"--system", b"\xfe")
    assert code == 0 and "[--prompt: 1 byte(s) that are not utf-8 replaced by" in err
    assert "[--system: 1 byte(s) that are not utf-8 replaced by" in err


@pytest.mark.parametrize("options, message", [
    (["--max-new-tokens", "0"], "argument --max-new-tokens: must be at least 1 (got 0)"),
    (["--max-new-tokens", "-5"], "argument --max-new-tokens: must be at least 1 (got -5)"),
    (["--max-new-tokens", "many"], "argument --max-new-tokens: invalid integer value: 'many'"),
    (["--seed", str(2**63)], "argument --seed: seed must be an integer in [-2**63, 2**63 - 1]"),
    (["--seed", "x"], "argument --seed: invalid int value: 'x'"),
    (["--top-k", "-1"], "argument --top-k: top_k must be an integer >= 0 (got -1)"),
    (["--top-p", "0"], "argument --top-p: top_p must be in (0, 1] (got 0.0)"),
    (["--top-p", "nan"], "argument --top-p: top_p must be a finite number (got nan)"),
    (["--temperature", "inf"], "argument --temperature: temperature must be a finite number (got inf)"),
    (["--temperature", "3"], "argument --temperature: temperature must be in [0, 2] (got 3.0)"),
    (["--repetition-penalty", "0"], "argument --repetition-penalty: repetition_penalty must be > 0 (got 0.0)"),
])
def test_bad_options_are_usage_errors(models, options, message):
    code, _, err = _chat(models[32], "--prompt", "hi", *options)
    assert code == 2 and err.startswith("usage: python -m runtime.chat") and message in err


def test_any_64_bit_seed_samples_reproducibly(models):
    answers = [_chat(models[32], "--prompt", "hi", "--temperature", "1", "--seed", seed) for seed in ("-1", "-1", "7")]
    assert all(code == 0 for code, _, _ in answers)
    assert answers[0][1] == answers[1][1]  # the same seed, the same answer


def _read_until(process, text: bytes, seconds: float = 60) -> bytes:
    seen, deadline = b"", time.monotonic() + seconds
    while not seen.endswith(text):
        assert time.monotonic() < deadline, seen
        seen += os.read(process.stdout.fileno(), 1)
    return seen


@pytest.mark.parametrize("turns", [0, 1])
def test_ctrl_c_at_the_prompt_ends_the_session(models, turns):
    process = subprocess.Popen([sys.executable, "-m", "runtime.chat", "--model", str(models[32])], cwd=ROOT,
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        _read_until(process, b"User: ")
        for _ in range(turns):
            process.stdin.write(b"hi\n")
            process.stdin.flush()
            _read_until(process, b"User: ")
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=30)
    finally:
        process.kill()
    assert process.returncode == 0 and b"Traceback" not in err, err


class _InterruptOnFirstPiece:
    """Stands for the terminal: Ctrl-C (a real SIGINT to this process) as the first piece shows."""

    def __init__(self):
        self.text = ""

    def write(self, text):
        if not self.text and text.strip():
            os.kill(os.getpid(), signal.SIGINT)
        self.text += text

    def flush(self):
        pass


def test_ctrl_c_during_an_answer_stops_it_and_the_chat_goes_on(models):
    chat = Chat(parse_args(["--model", str(models[128]), "--max-new-tokens", "64", "--system", ""]))
    at_the_prompt = signal.getsignal(signal.SIGINT)  # Python's (or SIG_IGN, in a run started in the background)
    full = chat.answer("hi", _Quiet())
    chat.history.clear()
    try:
        stopped = chat.answer("hi", _InterruptOnFirstPiece())
    except KeyboardInterrupt:
        pytest.fail("Ctrl-C during the answer raised KeyboardInterrupt instead of stopping the answer")
    assert stopped.finish_reason == "cancelled" and len(stopped.tokens) < len(full.tokens)
    assert full.text.startswith(stopped.text) and chat.history == []  # the stopped turn is not kept
    assert signal.getsignal(signal.SIGINT) is at_the_prompt  # Ctrl-C at the prompt does what it did before
    assert chat.answer("hi", _Quiet()).text == full.text  # and the next answer is whole


class _Quiet:
    def write(self, text):
        pass

    def flush(self):
        pass


def test_history_keeps_only_what_fits(models):
    """seq 128 and 8 new tokens: 120 for the prompt. The oldest turns go as they stop fitting;
    what is kept gives the prompt the whole conversation would give."""
    chat = Chat(parse_args(["--model", str(models[128]), "--max-new-tokens", "8"]))
    conversation, dropped = [], 0
    for k in range(12):
        query = f"question number {k}"
        full = fit_history(chat.tokenizer, "You are a helpful assistant.", conversation, query, 128, 8,
                           optional_system=True)
        result = chat.answer(query, _Quiet())
        assert result.prompt_tokens == len(full.ids) <= 120  # the trimmed history prompts as the whole would
        conversation += chat.history[-2:]
        assert chat.history == conversation[len(conversation) - len(chat.history):]  # the newest turns
        dropped += full.dropped > 0
    assert dropped >= 5 and len(chat.history) < len(conversation) // 2


def test_a_reader_that_goes_away_ends_it_quietly(models):
    """`... | head -c 0`: the pipe is closed before the first word is written."""
    for stdin in (b"", b"hi\nhi\nhi\n"):
        options = ["--prompt", "hi"] if not stdin else []
        process = subprocess.Popen([sys.executable, "-m", "runtime.chat", "--model", str(models[32]), *options],
                                   cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        process.stdout.close()
        _, err = process.communicate(stdin, timeout=60)
        assert process.returncode == 1 and b"Traceback" not in err and b"Exception ignored" not in err, err
