"""The HTTP server over loopback, driven by the official `openai` client and raw HTTP."""
import collections
import contextlib
import json
import random
import socket
import subprocess
import sys
import tempfile
import threading
import time

import httpx
import pytest
from fastapi.testclient import TestClient
from openai import OpenAI, RateLimitError

from runtime.chat_format import Message, chatml_ids
from runtime.engine import Engine
from runtime.serve import ChatService, create_app
from runtime.tokenizer import load_tokenizer

from .conftest import ROOT, run_doit

pytestmark = pytest.mark.fast
MODEL = "bench-qwen2-medium"  # 4 layers, vocab 32768: ~10 ms a token, slow enough to overlap requests


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def _serve(onnx, *options):
    """`python -m runtime.serve` on a free port, as a user starts it; yields its base URL. Its log
    goes to a file: a pipe nobody reads fills up (64 KB of access log) and stops the server."""
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryFile("w+") as log:
        process = subprocess.Popen([sys.executable, "-m", "runtime.serve", "--model", str(onnx), "--port", str(port),
                                    *options], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, text=True)
        try:
            for _ in range(300):
                with contextlib.suppress(httpx.HTTPError):
                    if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                        break
                time.sleep(0.1)
            else:
                pytest.fail("server did not start")
            yield base
        finally:
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:  # a stalled event loop does not see SIGTERM
                process.kill()
                process.wait()
            log.seek(0)
            output = log.read()
    assert "Traceback" not in output, output  # no request made the server fail


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    build_dir = tmp_path_factory.mktemp("serve")
    result = run_doit(build_dir, ["export", "map"], model=MODEL, layers=4, seq=256, history=1, chunk=32)
    assert result.code == 0, result.output
    with _serve(build_dir / f"{MODEL}-4l" / "seq256" / "onnx", "--max-queue", "1", "--name", "medium") as base:
        yield base


@pytest.fixture(scope="module")
def tiny_onnx(tmp_path_factory):
    """The default model: tiny-qwen2 at seq 32."""
    build_dir = tmp_path_factory.mktemp("serve-tiny")
    result = run_doit(build_dir, ["export", "map"], model="tiny-qwen2")
    assert result.code == 0, result.output
    return build_dir / "tiny-qwen2" / "seq32" / "onnx"


@pytest.fixture(scope="module")
def tiny(tiny_onnx):
    """The server on the default model, with its defaults (256 tokens an answer)."""
    with _serve(tiny_onnx) as base:
        yield base


def _client(base):
    return OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=60)


MESSAGES = [{"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": "What is the capital of France?"}]


def test_models_and_health(server):
    assert [m.id for m in _client(server).models.list().data] == ["medium"]
    health = httpx.get(f"{server}/health").json()
    assert health["status"] == "ok" and health["seq_length"] == 256


def test_non_streaming_and_streaming_agree(server):
    client = _client(server)
    full = client.chat.completions.create(model="medium", messages=MESSAGES, max_tokens=12)
    choice = full.choices[0]
    assert choice.finish_reason == "length" and choice.message.role == "assistant"
    assert full.usage.completion_tokens == 12 and full.usage.prompt_tokens > 10
    chunks = list(client.chat.completions.create(model="medium", messages=MESSAGES, max_tokens=12, stream=True))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == choice.message.content  # greedy: the same answer, streamed
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[-1].choices[0].finish_reason == "length"


def test_a_request_that_continues_the_conversation_is_prefilled_from_where_the_last_one_ended(server):
    """The server keeps the cache: a request whose tokens extend the previous one's prefills only
    the new ones (usage.prompt_tokens_details.cached_tokens, OpenAI's field); another conversation
    starts over; the answers are a fresh prefill's."""
    client = _client(server)
    first = client.chat.completions.create(model="medium", messages=MESSAGES, max_tokens=8)
    follow = [*MESSAGES, {"role": "assistant", "content": first.choices[0].message.content},
              {"role": "user", "content": "And of Germany?"}]
    continued = client.chat.completions.create(model="medium", messages=follow, max_tokens=8)
    cached = continued.usage.prompt_tokens_details.cached_tokens
    assert first.usage.prompt_tokens - 4 < cached < continued.usage.prompt_tokens, (first.usage, continued.usage)
    other = [{"role": "system", "content": "Answer in French."}, {"role": "user", "content": "Bonjour"}]
    assert client.chat.completions.create(model="medium", messages=other, max_tokens=2).usage \
        .prompt_tokens_details.cached_tokens < 10  # the chat template's start, at most
    again = client.chat.completions.create(model="medium", messages=follow, max_tokens=8)
    assert again.choices[0].message.content == continued.choices[0].message.content


def test_stop_string_and_sampling_fields(server):
    client = _client(server)
    base = client.chat.completions.create(model="medium", messages=MESSAGES, max_tokens=12).choices[0].message.content
    stop = base[len(base) // 2:len(base) // 2 + 2]
    stopped = client.chat.completions.create(model="medium", messages=MESSAGES, max_tokens=12, stop=[stop])
    assert stopped.choices[0].finish_reason == "stop" and base.startswith(stopped.choices[0].message.content)
    a, b = (client.chat.completions.create(model="medium", messages=MESSAGES, max_tokens=8, temperature=1.0,
                                           top_p=0.9, seed=42).choices[0].message.content for _ in range(2))
    assert a == b  # the same seed, the same sample


def test_bad_requests_get_clear_4xx(server):
    bad = httpx.post(f"{server}/v1/chat/completions", content=b'{"messages": [', headers={"content-type": "application/json"})
    assert bad.status_code == 400 and "JSON" in bad.json()["error"]["message"]
    wrong = httpx.post(f"{server}/v1/chat/completions", json={"messages": MESSAGES, "temperature": -1})
    assert wrong.status_code == 400 and "temperature" in wrong.json()["error"]["message"]
    empty = httpx.post(f"{server}/v1/chat/completions", json={"messages": []})
    assert empty.status_code == 400 and "messages" in empty.json()["error"]["message"]
    last = httpx.post(f"{server}/v1/chat/completions", json={"messages": [{"role": "assistant", "content": "x"}]})
    assert last.status_code == 400 and "the last message must be the user's" in last.json()["error"]["message"]
    long = httpx.post(f"{server}/v1/chat/completions",
                      json={"messages": [{"role": "user", "content": "hello " * 400}], "max_tokens": 16})
    assert long.status_code == 400 and "takes at most 240" in long.json()["error"]["message"]


def test_seed_api(server):
    one = httpx.post(f"{server}/chat/completions", json={"question": "你好", "history": ["Hi", "Hello!"]}, timeout=60)
    assert one.status_code == 200 and isinstance(one.json()["data"], str) and one.json()["data"]
    with httpx.stream("POST", f"{server}/chat/completions", json={"question": "你好", "history": ["Hi", "Hello!"],
                                                                   "stream": True}, timeout=60) as response:
        events = [json.loads(line[6:]) for line in response.iter_lines() if line.startswith("data: ")]
    assert events[-1]["data"] == one.json()["data"]  # cumulative answers, as the seed's API sent them
    assert all(events[-1]["data"].startswith(e["data"]) for e in events)


def test_queue_bound_and_disconnect(server):
    client = _client(server)
    before = httpx.get(f"{server}/health").json()["finished"]["cancelled"]
    first = client.chat.completions.create(model="medium", messages=MESSAGES, max_tokens=200, stream=True)
    next(iter(first))  # the first generation is running
    waiting = {}
    second = threading.Thread(target=lambda: waiting.update(
        r=client.chat.completions.create(model="medium", messages=MESSAGES, max_tokens=4)))
    second.start()
    for _ in range(100):
        if httpx.get(f"{server}/health").json()["waiting"] == 1:
            break
        time.sleep(0.02)
    with pytest.raises(RateLimitError) as err:  # one running, one waiting: the queue (1) is full
        client.chat.completions.create(model="medium", messages=MESSAGES, max_tokens=4)
    assert int(err.value.response.headers["retry-after"]) >= 1
    assert _error(err.value.response, 429, "rate_limit_error").startswith("the model is busy")
    first.close()  # the client goes away: its generation stops
    second.join(timeout=60)
    assert waiting["r"].usage.completion_tokens == 4
    health = httpx.get(f"{server}/health").json()
    assert health["finished"]["cancelled"] == before + 1 and not health["busy"]


# --- bad input: never a 5xx, never a hang, always OpenAI's error shape ----------------------------

V1, SEED = "/v1/chat/completions", "/chat/completions"
HI = [{"role": "user", "content": "hi"}]


def _error(response, status: int, kind: str = "invalid_request_error") -> str:
    """The message of an error answer, after checking its status and OpenAI's shape."""
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and body["error"]["type"] == kind, body
    assert {"message", "type", "param", "code"} <= set(body["error"]), body
    return body["error"]["message"]


def _raw(base, path, content, **headers):
    return httpx.post(base + path, content=content, headers={"content-type": "application/json", **headers},
                      timeout=60)


def _events(response) -> list[str]:
    return [line[6:] for line in response.text.splitlines() if line.startswith("data: ")]


def test_any_64_bit_seed_and_numbers_that_are_not_finite(tiny):
    body = {"messages": HI, "temperature": 1.0, "max_tokens": 8, "seed": -1}
    answers = [httpx.post(tiny + V1, json=body, timeout=60) for _ in range(2)]
    assert [a.status_code for a in answers] == [200, 200]
    text = answers[0].json()["choices"][0]["message"]["content"]
    assert answers[1].json()["choices"][0]["message"]["content"] == text  # -1 is a seed like any other
    streamed = httpx.post(tiny + V1, json={**body, "stream": True}, timeout=60)  # was cut off mid-body
    events = _events(streamed)
    assert streamed.status_code == 200 and events[-1] == "[DONE]"
    assert "".join(json.loads(e)["choices"][0]["delta"].get("content", "") for e in events[:-1]) == text
    assert "seed must be an integer in [-2**63, 2**63 - 1]" in _error(
        httpx.post(tiny + V1, json={**body, "seed": 2**63}), 400)
    for field in ("temperature", "top_p", "repetition_penalty"):
        for literal in ("NaN", "Infinity", "-Infinity", "1e999"):  # JSON parsers read these as floats
            raw = f'{{"messages": [{{"role": "user", "content": "hi"}}], "{field}": {literal}}}'
            assert f"{field} must be a finite number" in _error(_raw(tiny, V1, raw), 400)


@pytest.mark.parametrize("path, raw, field", [
    (V1, r'{"messages": [{"role": "user", "content": "a\ud800"}]}', "messages.0.content"),
    (V1, r'{"messages": [{"role": "system", "content": "\udfff"}, {"role": "user", "content": "a"}]}',
     "messages.0.content"),
    (V1, r'{"messages": [{"role": "user", "content": "a"}], "stop": ["x", "\udc80"]}', "stop.1"),
    (SEED, r'{"question": "\ud800"}', "question"),
    (SEED, r'{"question": "hi", "history": ["ok", "\udbff"]}', "history.1"),
])
def test_lone_surrogates_are_refused_by_name(tiny, path, raw, field):
    for stream in ("false", "true"):
        message = _error(_raw(tiny, path, raw[:-1] + f', "stream": {stream}}}'), 400)
        assert message == f"{field}: not valid Unicode text (it holds a lone surrogate, such as \\ud800)"


def _poll_health(base, stop: threading.Event, seconds: list):
    with httpx.Client(timeout=30) as client:
        while not stop.is_set():
            start = time.perf_counter()
            ok = client.get(f"{base}/health").status_code == 200
            seconds.append(time.perf_counter() - start if ok else float("inf"))
            time.sleep(0.01)


HEALTH_BOUND = 0.3  # seconds; measured at most 0.02 (before: no answer for over 5 minutes)


@pytest.mark.parametrize("kind", ["10000 messages", "1 MB message", "32000 messages (near the body limit)"])
def test_big_bodies_do_not_stall_the_server(tiny, kind):
    """The body is parsed on the event loop (bounded by the body limit); tokenizing and trimming
    run in a thread, and tokenizers let go of the GIL: /health keeps answering meanwhile."""
    if kind == "1 MB message":
        body = {"messages": [{"role": "user", "content": "hello world " * 83_000}]}
    else:
        count = 10_000 if kind.startswith("10000") else 32_000
        body = {"messages": [{"role": "assistant" if (count - k) % 2 == 0 else "user", "content": "a"}
                             for k in range(count)]}  # ... user, assistant, user
    raw = json.dumps(body, separators=(",", ":")).encode()
    assert len(raw) < 1 << 20
    stop, seconds = threading.Event(), []
    poller = threading.Thread(target=_poll_health, args=(tiny, stop, seconds))
    poller.start()
    time.sleep(0.1)
    try:
        answer = _raw(tiny, V1, raw)
        time.sleep(0.05)
    finally:
        stop.set()
        poller.join()
    if kind == "1 MB message":
        assert "the model takes at most 28" in _error(answer, 400) and answer.json()["error"]["code"] == \
            "context_length_exceeded"
    else:  # every past turn dropped: on seq 32 the newest message alone fits
        assert answer.status_code == 200 and answer.json()["usage"]["prompt_tokens"] <= 28
    assert len(seconds) >= 3 and max(seconds) < HEALTH_BOUND, seconds


def test_every_error_has_openais_shape(tiny):
    assert "invalid start byte" in _error(_raw(tiny, V1, b'{"messages": [{"role": "user", "content": "\xff"}]}'), 400)
    assert "recursion" in _error(_raw(tiny, SEED, b"[" * 3000 + b"]" * 3000), 400)
    assert "not valid JSON" in _error(_raw(tiny, V1, b'{"messages": ['), 400)
    assert "the body is empty" in _error(_raw(tiny, SEED, b""), 400)
    assert "messages: Input should be a valid list" in _error(httpx.post(tiny + V1, json={"messages": "x"}), 400)
    assert "Not Found" in _error(httpx.get(tiny + "/v2/anything"), 404)
    assert "Method Not Allowed" in _error(httpx.get(tiny + V1), 405)
    over = json.dumps({"messages": [{"role": "user", "content": "x" * (1 << 20)}]}).encode()
    assert "over the server's limit of 1048576 bytes" in _error(_raw(tiny, V1, over), 413)  # Content-Length

    def chunks():
        for k in range(0, len(over), 1 << 16):
            yield over[k:k + (1 << 16)]

    assert "over the server's limit" in _error(_raw(tiny, SEED, chunks()), 413)  # chunked, counted as it comes


def test_the_default_model_chats_with_its_defaults(tiny, tiny_onnx):
    """seq 32: the default system prompt (it was always added to the seed's endpoint) does not fit
    with a message, so it is left out; a system prompt the client gives is kept, or refused."""
    one = httpx.post(tiny + SEED, json={"question": "hi", "history": []}, timeout=60)
    assert one.status_code == 200 and one.json()["data"]
    streamed = httpx.post(tiny + SEED, json={"question": "hi", "history": [], "stream": True}, timeout=60)
    assert json.loads(_events(streamed)[-1])["data"] == one.json()["data"]
    plain = httpx.post(tiny + V1, json={"messages": HI}, timeout=60)
    alone = chatml_ids(load_tokenizer(tiny_onnx), [Message("user", "hi")])  # no system prompt was given
    assert plain.status_code == 200 and plain.json()["usage"]["prompt_tokens"] == len(alone)
    given = httpx.post(tiny + V1, json={"messages": [{"role": "system", "content": "You are a helpful assistant."},
                                                     *HI]})
    assert "tokens with the chat format and the system prompt; the model takes at most 28" in _error(given, 400)


class _FailingDecode:
    """The model's backend, failing at the first decode step (as a lost device would)."""

    def __init__(self, backend):
        self.backend = backend

    def __getattr__(self, name):
        return getattr(self.backend, name)

    def run(self, name, inputs):
        if name == "embedding_cache":
            raise RuntimeError("device lost")
        return self.backend.run(name, inputs)


def test_a_model_that_fails_mid_answer_ends_the_stream_with_an_error(tiny_onnx):
    """A stream has said 200 before the model fails: it ends with an error event, not cut off."""
    service = ChatService(tiny_onnx, "tiny")
    service.engine = Engine(_FailingDecode(service.backend))
    with TestClient(create_app(service), raise_server_exceptions=False) as client:
        streamed = client.post(V1, json={"messages": HI, "max_tokens": 8, "stream": True})
        last = json.loads(_events(streamed)[-1])
        assert streamed.status_code == 200 and last["error"]["type"] == "server_error"
        assert "device lost" in last["error"]["message"]
        assert "device lost" in _error(client.post(V1, json={"messages": HI, "max_tokens": 8}), 500, "server_error")
        assert client.get("/health").json()["busy"] is False


# --- fuzz: random bodies against both POST endpoints -----------------------------------------------

TEXTS = ["", "hi", "你好", "🙂", "<|im_start|>system", "\x00\x01\x1b[2J\x7f", "\u202e\ufeff", "x" * 3000, "\n" * 20,
         "e\u0301", "a b c"]
ODD_TEXTS = ["\ud800", "a\udfffb", "\udbff\udc00"]  # a lone surrogate, and a pair (not JSON's way to write it)
NUMBERS = [0, 1, -1, 2, 0.5, -0.0, 2**31, 2**63, -2**63 - 1, 10**30, 1e308, -1e308, 5e-324, float("nan"),
           float("inf"), float("-inf"), True, False]
V1_FIELDS = ["messages", "model", "stream", "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k",
             "repetition_penalty", "seed", "stop", "n"]
SEED_FIELDS = ["question", "history", "stream"]


def _text(rng):
    base = rng.choice(ODD_TEXTS) if rng.random() < 0.05 else rng.choice(TEXTS)
    return base + "".join(chr(rng.randrange(32, 0x250) if rng.random() < 0.7 else rng.randrange(0x250, 0x10ffff))
                          for _ in range(rng.randrange(3)))


def _value(rng: random.Random, depth: int = 0):
    """Any JSON value: scalars of every type, odd strings and numbers, nested lists and objects."""
    kind = rng.randrange(6 if depth < 3 else 4)
    if kind == 0:
        return _text(rng) if rng.random() < 0.7 else rng.choice(ODD_TEXTS)
    if kind == 1:
        return rng.choice(NUMBERS)
    if kind == 2:
        return rng.choice([None, True, False])
    if kind == 3:
        return rng.choice([[], {}, "", 0])
    if kind == 4:
        return [_value(rng, depth + 1) for _ in range(rng.randrange(5))]
    return {rng.choice(V1_FIELDS + SEED_FIELDS + ["role", "content", "x"]): _value(rng, depth + 1)
            for _ in range(rng.randrange(5))}


def _valid(rng, path):
    """A body the server answers (or refuses as too long for seq 32), with random sampling fields."""
    if path == SEED:
        return {"question": _text(rng), "history": [_text(rng) for _ in range(rng.randrange(4))],
                "stream": rng.random() < 0.5}
    roles = ["system", "user", "assistant", "assistant"]
    messages = [{"role": rng.choice(roles), "content": _text(rng)} for _ in range(rng.randrange(4))]
    body = {"messages": messages + [{"role": "user", "content": _text(rng)}], "stream": rng.random() < 0.5,
            rng.choice(["max_tokens", "max_completion_tokens"]): rng.choice([1, 4, 10**9])}
    sampling = {"temperature": rng.uniform(0, 2), "top_p": rng.uniform(1e-9, 1), "top_k": rng.randrange(600),
                "repetition_penalty": rng.choice([0.01, 1.0, 1.3, 100.0]), "seed": rng.randint(-2**63, 2**63 - 1),
                "stop": rng.choice([_text(rng), [_text(rng) for _ in range(rng.randrange(5))]])}
    return body | {k: v for k, v in sampling.items() if rng.random() < 0.5}


def _fuzz_body(rng: random.Random, path: str) -> bytes:
    """A valid body, one with fields of wrong types or values, or bytes that are not JSON at all."""
    kind, body = rng.randrange(10), _valid(rng, path)
    if kind <= 3:  # valid, or with one or two fields set to anything
        for _ in range(max(0, kind - 1)):
            body[rng.choice(V1_FIELDS if path == V1 else SEED_FIELDS)] = _value(rng)
        return json.dumps(body).encode()  # NaN and Infinity as JSON's unofficial literals
    if kind == 4:
        return json.dumps(_value(rng)).encode()  # any JSON value as the whole body
    if kind == 5:  # sound JSON cut short, or with bytes that are not UTF-8
        raw = json.dumps(body, ensure_ascii=rng.random() < 0.5).encode("utf-8", "surrogatepass")
        cut = rng.randrange(len(raw) + 1)
        return raw[:cut] + bytes(rng.randrange(128, 256) for _ in range(rng.randrange(4))) + raw[cut:]
    if kind == 6:
        return bytes(rng.randrange(256) for _ in range(rng.randrange(200)))
    if kind == 7:  # deep nesting, a huge number, whitespace, a byte-order mark, ...
        return rng.choice([b"[" * rng.randrange(500, 5000), b'{"a":' * 2000, b"1" + b"0" * 5000, b"  \n\t ", b"",
                           b"\xef\xbb\xbf" + json.dumps(body).encode(), b"null", b'"\\ud800"', b"NaN"])
    key = "messages" if path == V1 else "history"  # long conversations, to trim
    body[key] = body[key] * rng.randrange(1, 400)
    return json.dumps(body).encode()


def _check_answer(response, path, raw) -> str:
    """Checks one answer; says what it was: 'error', 'answer' or 'stream'."""
    context = f"{path} {raw[:300]!r}: {response.status_code} {response.text[:300]}"
    assert response.status_code < 500, context
    if response.status_code >= 400:
        _error(response, response.status_code, "rate_limit_error" if response.status_code == 429
               else "invalid_request_error")
        return "error"
    if "text/event-stream" in response.headers["content-type"]:
        events = _events(response)
        assert events and all('"error"' not in e for e in events), context
        assert events[-1] == "[DONE]" if path == V1 else "data" in json.loads(events[-1]), context
        return "stream"
    assert ("choices" in response.json()) if path == V1 else isinstance(response.json()["data"], str), context
    return "answer"


def test_fuzz_never_a_5xx_and_health_answers_after_each(tiny):
    """250 seeded random bodies for each POST endpoint; after each answer, /health answers."""
    rng, seen = random.Random(20261125), collections.Counter()
    with httpx.Client(base_url=tiny, timeout=60) as client:
        for _ in range(250):
            for path in (V1, SEED):
                raw = _fuzz_body(rng, path)
                content_type = rng.choice(["application/json"] * 18 + ["text/plain", None])
                response = client.post(path, content=raw, headers={"content-type": content_type} if content_type
                                       else {})
                seen[path, _check_answer(response, path, raw)] += 1
                assert client.get("/health", timeout=5).status_code == 200
    for path in (V1, SEED):  # the fuzz reached generation, streamed and not, as well as refusals
        assert min(seen[path, "answer"], seen[path, "stream"], seen[path, "error"]) >= 15, seen
