"""HTTP API for a built model: OpenAI-compatible chat completions (streaming and not), the model
list, a health check, and the seed's `POST /chat/completions {question, history, stream}`.

    python -m runtime.serve --model dist/<name>.bmodel --port 8000     (or an ONNX folder)

One generation runs at a time per loaded model; others wait in a bounded queue. When the queue
is full the answer is 429 with Retry-After. A client that disconnects stops its generation.
Every error has OpenAI's shape, {"error": {"message", "type", "param", "code"}}; bodies over
MAX_BODY_BYTES get 413. Tokenizing and trimming run in worker threads, never on the event loop.
"""
import argparse
import asyncio
import gc
import json
import threading
import time
import uuid
from pathlib import Path
from typing import Annotated, Literal

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException
from typing_extensions import TypedDict  # pydantic needs it on Python < 3.12

from .chat import at_least, default_tokenizer, open_backend
from .chat_format import DEFAULT_SYSTEM, Message, Prompt, PromptTooLong, fit_history
from .engine import Engine
from .generate import Result, generate
from .sampling import SamplingParams
from .tokenizer import load_tokenizer
from .traffic import Traffic

# FastAPI parses and validates a body on the event loop (pydantic holding the GIL): 1 MiB of
# one-character messages takes 25-40 ms. A conversation longer than any model's context is
# trimmed anyway, so clients need no more.
MAX_BODY_BYTES = 1 << 20

# No string is longer than the body. The length check also makes pydantic-core read the string as
# UTF-8, which refuses a lone surrogate ("\ud800" in JSON: no text a tokenizer can encode) as
# `string_unicode`, in Rust: 30,000 messages cost no Python call each.
Text = Annotated[str, Field(max_length=MAX_BODY_BYTES)]


def _listed(value):
    """OpenAI's `stop` is a string or a list of them: one type, so errors name `stop.1`."""
    return [value] if isinstance(value, str) else value


class ChatMessage(TypedDict):  # a TypedDict validates twice as fast as a model
    role: Literal["system", "user", "assistant"]
    content: Text


class ChatCompletionRequest(BaseModel):
    """Sampling fields are typed here and ranged by SamplingParams (the CLI's rule too)."""
    model_config = ConfigDict(extra="ignore")  # OpenAI clients send fields we do not use
    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1, fail_fast=True)  # fail_fast: one error, not 30,000
    stream: bool = False
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: Annotated[list[Text], BeforeValidator(_listed), Field(max_length=4)] | None = None  # OpenAI's limit: 4
    n: int = Field(default=1, ge=1, le=1)


class SeedRequest(BaseModel):
    """The body of the seed's api.py: history alternates user and assistant texts."""
    question: Text
    history: list[Text] = Field(default=[], fail_fast=True)
    stream: bool = False


class Busy(Exception):
    pass


class ChatService:
    """One model, one generation at a time, a bounded queue of waiting requests."""

    def __init__(self, model: Path, name: str, tokenizer: Path | None = None, max_queue: int = 4,
                 default_max_tokens: int = 256, devid: str = "0"):
        self.backend = open_backend(model, devid)
        # one engine: the device state is made once, and a request that continues the previous
        # conversation (the same tokens first) prefills only what is new (Engine.prefill)
        self.engine = Engine(self.backend)
        self.traffic = {"prefill": Traffic(), "decode": Traffic(), "decode_steps": 0}  # totals, for /health
        self.tokenizer = load_tokenizer(tokenizer or default_tokenizer(model))
        self.name, self.seq = name, self.backend.info.seq
        self.max_queue, self.default_max_tokens = max_queue, default_max_tokens
        self.slot = asyncio.Semaphore(1)
        self.waiting = 0
        self.busy = False
        self.finished = {"stop": 0, "length": 0, "cancelled": 0}  # generations, by how they ended
        self.average_seconds = 5.0  # for Retry-After; updated as generations finish

    def prompt(self, system: str | None, history: list[Message], query: str, max_tokens: int,
               optional_system: bool = False) -> Prompt:
        """Tokenizes and trims: call it in a worker thread (a long conversation takes a while)."""
        return fit_history(self.tokenizer, system, history, query, self.seq, max_tokens,
                           optional_system=optional_system)

    def reserve(self) -> None:
        """A place in the queue, taken before anything is awaited (so the bound is exact)."""
        if self.waiting >= self.max_queue:
            raise Busy()
        self.waiting += 1

    async def run(self, ids: list[int], max_tokens: int, params: SamplingParams, stop: list[str], on_piece,
                  cancelled: threading.Event) -> Result:
        """With a place reserved: waits for the model, then generates in a thread; `on_piece` gets text."""
        try:
            await self.slot.acquire()
        finally:
            self.waiting -= 1
        loop, result = asyncio.get_running_loop(), Result()

        def work():
            if cancelled.is_set():  # the client left while waiting in the queue
                result.finish_reason = "cancelled"
                return
            start = time.perf_counter()
            for piece in generate(self.engine, self.tokenizer, ids, max_tokens, params, stop, result,
                                  cancelled.is_set):
                loop.call_soon_threadsafe(on_piece, piece)
            self.average_seconds = 0.7 * self.average_seconds + 0.3 * (time.perf_counter() - start)

        self.busy = True
        try:
            await asyncio.to_thread(work)
        finally:
            self.busy = False
            self.slot.release()
        self.finished[result.finish_reason] = self.finished.get(result.finish_reason, 0) + 1
        self.traffic["prefill"] += result.prefill_traffic
        self.traffic["decode"] += result.decode_traffic
        self.traffic["decode_steps"] += result.decode_steps
        return result


def _usage(result: Result) -> dict:
    # cached_tokens (OpenAI's field): the prompt's start that the previous request left in the cache
    return {"prompt_tokens": result.prompt_tokens, "completion_tokens": len(result.tokens),
            "total_tokens": result.prompt_tokens + len(result.tokens),
            "prompt_tokens_details": {"cached_tokens": result.cached_tokens}}


def _sse(data) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False) if not isinstance(data, str) else data}\n\n"


def error_body(message: str, kind: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def error_response(status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
                   code: str | None = None, headers: dict | None = None) -> JSONResponse:
    return JSONResponse(status_code=status, content=error_body(message, kind, param, code), headers=headers)


class BodyLimit:
    """413 for a body over `limit` bytes: at once when Content-Length says so, else as it streams
    in (raised from `receive`, so the app's HTTPException handler answers)."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit
        self.message = f"the request body is over the server's limit of {limit} bytes"

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = Headers(scope=scope).get("content-length", "")
        if declared.isdigit() and int(declared) > self.limit:
            response = error_response(413, self.message, headers={"Connection": "close"})
            return await response(scope, receive, send)
        seen = 0

        async def counted():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                raise HTTPException(413, self.message)
            return message

        await self.app(scope, counted, send)


def _problem(e: dict) -> tuple[str, str | None]:
    """One of pydantic's errors as (what is wrong, in words; the field's path, if a field)."""
    where = ".".join(str(p) for p in e["loc"][1:])
    if e["type"] == "json_invalid":
        return f"the body is not valid JSON: {e.get('ctx', {}).get('error', e['msg'])} (at character {where})", None
    if e["type"] == "missing" and not where:
        return "the body is empty: a JSON object is expected", None
    if e["type"] == "string_unicode":
        return f"{where}: not valid Unicode text (it holds a lone surrogate, such as \\ud800)", where
    return f"{where or 'body'}: {e['msg']}", where or None


def _split(messages: list[ChatMessage]) -> tuple[str | None, list[Message], str]:
    """OpenAI messages as (system, past messages, the user's new message)."""
    system = next((m["content"] for m in messages if m["role"] == "system"), None)
    rest = [Message(m["role"], m["content"]) for m in messages if m["role"] != "system"]
    if not rest or rest[-1].role != "user":
        raise ValueError("messages: the last message must be the user's")
    return system, rest[:-1], rest[-1].content


def _seed_history(history: list[str]) -> list[Message]:
    return [Message("user" if k % 2 == 0 else "assistant", text) for k, text in enumerate(history)]


def create_app(service: ChatService, max_body: int = MAX_BODY_BYTES) -> FastAPI:
    app = FastAPI(title="qwen-tpu", description=__doc__.splitlines()[0])
    app.add_middleware(BodyLimit, limit=max_body)

    @app.exception_handler(RequestValidationError)
    async def bad_request(request, err):  # 400, where FastAPI says 422
        problems = [_problem(e) for e in err.errors()[:5]]
        return error_response(400, "; ".join(p for p, _ in problems) or "malformed request",
                              param=next((field for _, field in problems if field), None))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, err):  # 400 (unparsable body), 404, 405, 413 ...
        cause = f": {err.__cause__}" if err.__cause__ else ""  # why FastAPI could not parse the body
        kind = "server_error" if err.status_code >= 500 else "invalid_request_error"
        return error_response(err.status_code, f"{err.detail}{cause}", kind, headers=err.headers)

    @app.exception_handler(Exception)
    async def server_error(request, err):  # a bug: still answered in OpenAI's shape
        return error_response(500, f"internal error: {type(err).__name__}: {err}", "server_error")

    def busy_response():
        retry = max(1, round(service.average_seconds * (service.waiting + 1)))
        return error_response(429, f"the model is busy and {service.waiting} requests are waiting; retry in "
                              f"{retry} s", "rate_limit_error", headers={"Retry-After": str(retry)})

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": service.name, "seq_length": service.seq, "busy": service.busy,
                "waiting": service.waiting, "finished": service.finished,
                "device_traffic": {"prefill": service.traffic["prefill"].as_dict(),
                                   "decode": service.traffic["decode"].as_dict(),
                                   "decode_steps": service.traffic["decode_steps"]}}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": service.name, "object": "model", "created": 0,
                                            "owned_by": "qwen-tpu"}]}

    async def respond(request: Request, build, max_tokens: int, params: SamplingParams,
                      stop: list[str], stream: bool, stream_chunk, final, done_marker: bool):
        """Shared by both APIs: the prompt (`build()`, in a thread), queueing, disconnects, streaming or not."""
        try:
            prompt = await asyncio.to_thread(build)
        except PromptTooLong as err:
            return error_response(400, str(err), param="messages", code="context_length_exceeded")
        except ValueError as err:
            return error_response(400, str(err))
        try:
            service.reserve()
        except Busy:
            return busy_response()
        cancelled, queue = threading.Event(), asyncio.Queue()
        task = asyncio.create_task(service.run(prompt.ids, max_tokens, params, stop, queue.put_nowait, cancelled))
        task.add_done_callback(lambda _: queue.put_nowait(None))
        if not stream:
            while not task.done():
                if await request.is_disconnected():
                    cancelled.set()
                await asyncio.wait([task], timeout=0.2)
            return final(task.result())

        async def events():
            try:
                while (piece := await queue.get()) is not None:
                    yield _sse(stream_chunk(piece))
                if task.exception():  # the stream has begun (200): the error goes in it, as OpenAI does
                    yield _sse(error_body(f"generation failed: {task.exception()}", "server_error"))
                    return
                yield _sse(final(task.result(), streaming=True))
                if done_marker:
                    yield _sse("[DONE]")
            finally:
                cancelled.set()  # the client went away (or we are done): stop generating

        return StreamingResponse(events(), media_type="text/event-stream")

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        try:
            params = SamplingParams(body.temperature, body.top_k, body.top_p, body.repetition_penalty, body.seed)
        except ValueError as err:
            return error_response(400, str(err))
        max_tokens = body.max_completion_tokens or body.max_tokens or service.default_max_tokens
        stop = body.stop or []
        ident, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        head = {"id": ident, "created": created, "model": service.name}
        first = [True]

        def chunk(piece):
            delta = {"role": "assistant", "content": piece} if first[0] else {"content": piece}
            first[0] = False
            return {**head, "object": "chat.completion.chunk",
                    "choices": [{"index": 0, "delta": delta, "finish_reason": None}]}

        def final(result, streaming=False):
            reason = "length" if result.finish_reason == "length" else "stop"
            if streaming:
                return {**head, "object": "chat.completion.chunk", "usage": _usage(result),
                        "choices": [{"index": 0, "delta": {}, "finish_reason": reason}]}
            return {**head, "object": "chat.completion", "usage": _usage(result),
                    "choices": [{"index": 0, "finish_reason": reason,
                                 "message": {"role": "assistant", "content": result.text}}]}

        def build():
            return service.prompt(*_split(body.messages), max_tokens)

        return await respond(request, build, max_tokens, params, stop, body.stream, chunk, final, True)

    @app.post("/chat/completions")
    async def seed_chat(body: SeedRequest, request: Request):
        """The seed's API: every event (and the answer) is {"data": the answer so far}. It always had
        the default system prompt: kept when it fits with the question, left out otherwise."""
        so_far = [""]

        def chunk(piece):
            so_far[0] += piece
            return {"data": so_far[0]}

        def final(result, streaming=False):
            return {"data": result.text}

        def build():
            return service.prompt(DEFAULT_SYSTEM, _seed_history(body.history), body.question,
                                  service.default_max_tokens, optional_system=True)

        return await respond(request, build, service.default_max_tokens, SamplingParams(), [], body.stream,
                             chunk, final, False)

    return app


def main(argv=None):
    import uvicorn

    p = argparse.ArgumentParser(prog="python -m runtime.serve", description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, required=True, help="dist/<name>.bmodel, or an ONNX folder")
    p.add_argument("--devid", default="0", help="device id(s) for a bmodel: one, or one per device it was built for (2,3)")
    p.add_argument("--tokenizer", type=Path)
    p.add_argument("--name", help="the model id the API reports (default: from the model)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-queue", type=at_least(0), default=4, help="requests that may wait for the model")
    p.add_argument("--max-tokens", type=at_least(1), default=256, help="default answer length")
    args = p.parse_args(argv)
    service = ChatService(args.model, "", args.tokenizer, args.max_queue, args.max_tokens, args.devid)
    service.name = args.name or service.backend.info.model or args.model.name
    app = create_app(service)
    # Out of the collector's way: the loaded runtime's objects. A full collection, set off by a big
    # body's thousands of objects, then scans only those and holds the GIL (and the event loop)
    # for ~20 ms instead of ~60 ms.
    gc.freeze()
    uvicorn.run(app, host=args.host, port=args.port, log_level="info")


if __name__ == "__main__":
    main()
