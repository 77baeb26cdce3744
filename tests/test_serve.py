"""The HTTP server over loopback, driven by the official `openai` client and raw HTTP."""
import json
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest
from openai import OpenAI, RateLimitError

from .conftest import ROOT, run_doit

pytestmark = pytest.mark.fast
MODEL = "bench-qwen2-medium"  # 4 layers, vocab 32768: ~10 ms a token, slow enough to overlap requests


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    build_dir = tmp_path_factory.mktemp("serve")
    result = run_doit(build_dir, ["export", "patch"], model=MODEL, layers=4, seq=256)
    assert result.code == 0, result.output
    onnx = build_dir / f"{MODEL}-4l" / "seq256" / "onnx"
    port = _free_port()
    process = subprocess.Popen([sys.executable, "-m", "runtime.serve", "--model", str(onnx), "--port", str(port),
                                "--max-queue", "1", "--name", "medium"], cwd=ROOT,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    for _ in range(300):
        try:
            if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.1)
    else:
        process.kill()
        pytest.fail(f"server did not start:\n{process.stdout.read()}")
    yield base
    process.terminate()
    process.wait(timeout=10)


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
    first.close()  # the client goes away: its generation stops
    second.join(timeout=60)
    assert waiting["r"].usage.completion_tokens == 4
    health = httpx.get(f"{server}/health").json()
    assert health["finished"]["cancelled"] == before + 1 and not health["busy"]
